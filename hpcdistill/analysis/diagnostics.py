"""Teaching-signal diagnostics, summarised per run (issue 11): is the teacher's signal what the loss
assumes it is?

From the per-token columns scoring records (schema 1.1) over every step of a run, the student's own
rollouts only:
    student / teacher top-k mass   how much of each side's distribution its top-k holds (a top-k loss
                                   sees only this much; the rest is the tail)
    cross masses                   each side's mass on the other's top-k ids
    top-k overlap                  |S_k & T_k| / k: do the two sides even talk about the same tokens
    top-k KL error                 topk_kl - full_kl, where the run recorded full_kl (scoring.full_vocab)
    sampler gap                    rollout engine's log p of the sampled token minus the trainer's
                                   recomputation: weight-sync or numerics mismatch (importance ratios
                                   and `train.is_clip` act on it)
    demonstration / signal rate    fractions of rollouts re-prompted with a sibling demonstration, and
                                   with any teacher signal at all (teacher.context = "demonstration")
Shards of schema 1.0 lack the mass and overlap columns: their cells read "-".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from hpcdistill.analysis.training import run_arms
from hpcdistill.record import ShardReader, iter_shards

MEANS = ("student_topk_mass", "teacher_topk_mass", "teacher_mass_at_student_topk", "student_mass_at_teacher_topk",
         "topk_overlap")
COLUMNS = [*MEANS, "topk_kl", "full_kl", "sampler_gap"]


class _Sums:
    def __init__(self):
        self.sum: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self.max_abs_gap = 0.0
        self.rollouts = self.demonstrated = self.signal = 0

    def add(self, name: str, values: np.ndarray) -> None:
        values = values[np.isfinite(values)].astype(np.float64)
        self.sum[name] += float(values.sum())
        self.count[name] += len(values)

    def mean(self, name: str) -> float:
        return self.sum[name] / self.count[name] if self.count[name] else float("nan")


class Collector:
    """Per run, sums over its shards' original rollouts, fed one open shard at a time (`add`)."""

    def __init__(self):
        self.runs: dict[str, _Sums] = defaultdict(_Sums)

    def add(self, shard: ShardReader) -> None:
        sums = self.runs[str(shard.attrs.get("run_id", shard.path.parent.parent.name))]
        for record in shard.iter_rollouts(columns=COLUMNS):
            if record.row["kind"] != "original":
                continue
            tokens = record.tokens
            sums.rollouts += 1
            sums.demonstrated += int(record.row.get("demonstration", -1)) >= 0
            sums.signal += int(record.row.get("teacher_signal", 1)) != 0
            for name in MEANS:
                if name in tokens:
                    sums.add(name, tokens[name])
            if "full_kl" in tokens:
                error = tokens["topk_kl"].astype(np.float64) - tokens["full_kl"]
                sums.add("topk_kl_error", error)
                sums.add("topk_kl_abs_error", np.abs(error))
                sums.add("full_kl", tokens["full_kl"])
            if "sampler_gap" in tokens:
                gap = tokens["sampler_gap"].astype(np.float64)
                sums.add("sampler_gap", gap)
                sums.add("sampler_gap_abs", np.abs(gap))
                finite = np.abs(gap[np.isfinite(gap)])
                sums.max_abs_gap = max(sums.max_abs_gap, float(finite.max()) if len(finite) else 0.0)

    def result(self) -> dict[str, _Sums]:
        return dict(self.runs)


def collect(paths) -> tuple[dict[str, _Sums], list]:
    """run_id -> sums over its shards (streaming, one shard open at a time); skipped shards
    (a shard without a run's spec among them)."""
    collector, skipped = Collector(), []
    for shard in iter_shards(paths, skipped=skipped, spec=True):
        collector.add(shard)
    return collector.result(), skipped


def _cell(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x:.3g}"


def diagnostics_rows(sweep_dir: Path) -> tuple[list[str], list[list[str]]]:
    runs, _ = collect([sweep_dir])
    return diagnostics_table(runs, run_arms(sweep_dir))


def diagnostics_table(runs: dict[str, _Sums], arms: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """One row per run: the token means, the top-k KL error, the sampler gap, the demo/signal rates."""
    headers = ["run", "arm", "S mass@S_k", "T mass@T_k", "T mass@S_k", "S mass@T_k", "overlap",
               "topk-full KL", "|topk-full|/full", "sampler gap", "|gap| mean", "|gap| max", "demo rate",
               "signal rate"]
    rows = []
    for run_id in sorted(runs):
        s = runs[run_id]
        relative = s.mean("topk_kl_abs_error") / s.mean("full_kl") if s.mean("full_kl") > 0 else float("nan")
        rows.append([run_id, arms.get(run_id, "-"), *[_cell(s.mean(n)) for n in MEANS],
                     _cell(s.mean("topk_kl_error")), _cell(relative), _cell(s.mean("sampler_gap")),
                     _cell(s.mean("sampler_gap_abs")), _cell(s.max_abs_gap if s.count["sampler_gap"] else np.nan),
                     _cell(s.demonstrated / s.rollouts if s.rollouts else np.nan),
                     _cell(s.signal / s.rollouts if s.rollouts else np.nan)])
    return headers, rows


__all__ = ["Collector", "collect", "diagnostics_rows", "diagnostics_table"]
