"""Seed 000, prefix corruption in SDPO: experiments 1, 2 and 5 from recorded shards.

- Experiment 1: reward of the regenerated attempts s' vs the original s, per problem and overall.
- Experiment 2: delta-KL = regen KL - standard KL at the same ordinal position t (sequences
  truncated to the shorter of s and s'), position normalised by that length and binned into
  deciles; mean per decile within a rollout, then mean +/- stderr over rollouts.
- Experiment 5: the same curves for the full-vocabulary KL next to the top-k KL.
- Experiment 3 (training.py) reads the per-step, per-problem decile deltas collected here: of the
  fixed evaluation set (kinds fixed / fixed_regenerated, `scoring.rescore_step0`) when recorded,
  else of each step's fresh rollouts.

Everything streams: shards are read one at a time, and only per-rollout decile means are kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.record import ShardReader, iter_shards

NUM_DECILES = 10


def decile_means(values: np.ndarray, num_bins: int = NUM_DECILES) -> np.ndarray:
    """Mean of `values [L]` in each of `num_bins` equal slices of normalised position t / L.

    Bins a short sequence leaves empty are NaN (a rollout of 5 tokens has no value in 5 deciles).
    """
    length = len(values)
    out = np.full(num_bins, np.nan)
    if length == 0:
        return out
    bins = np.minimum((np.arange(length) * num_bins) // length, num_bins - 1)
    sums = np.bincount(bins, weights=values, minlength=num_bins)
    counts = np.bincount(bins, minlength=num_bins)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def mean_stderr(rows: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard error and count over `axis`, ignoring NaN."""
    rows = np.asarray(rows, dtype=np.float64)
    count = np.sum(~np.isnan(rows), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(rows, axis=axis) if rows.size else np.full(rows.shape[1 - axis], np.nan)
        std = np.nanstd(rows, axis=axis, ddof=1) if rows.shape[axis] > 1 else np.full_like(mean, np.nan)
        stderr = std / np.sqrt(np.maximum(count, 1))
    return mean, stderr, count


@dataclass
class PrefixCorruption:
    """What the analysis of one sweep collects (small: per-rollout decile vectors)."""

    rewards: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))  # kind -> problem -> rewards
    delta_topk: list[np.ndarray] = field(default_factory=list)  # per rollout, [10]
    standard_topk: list[np.ndarray] = field(default_factory=list)
    regen_topk: list[np.ndarray] = field(default_factory=list)
    delta_full: list[np.ndarray] = field(default_factory=list)
    standard_full: list[np.ndarray] = field(default_factory=list)
    regen_full: list[np.ndarray] = field(default_factory=list)
    by_step: dict[int, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    # step -> problem -> per-rollout decile deltas [10]: fresh rollouts, and the fixed set (exp. 3)
    by_step_problem: dict[int, dict[str, list[np.ndarray]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    fixed_by_step_problem: dict[int, dict[str, list[np.ndarray]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    # (run_id, step, problem) -> rewards of the original rollouts (experiment 4)
    step_rewards: dict[tuple[str, int, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    # run_id -> metric name -> (steps, values), merged over the run's shards
    metrics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    # kind -> per rollout (teacher early, teacher late, student early, student late) backtrack mass
    backtrack: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=lambda: defaultdict(list))
    skipped: list[tuple[str, str]] = field(default_factory=list)


COLUMNS = ["topk_kl", "full_kl", "teacher_mass_backtrack", "student_mass_backtrack"]


class Collector:
    """PrefixCorruption fed one open shard at a time (`add`), so `analyze` reads each shard once
    for every study; `result()` is what `collect` returns."""

    def __init__(self):
        self.out = PrefixCorruption()

    def add(self, reader: ShardReader) -> None:
        """Pair the original and regenerated rollouts of one shard."""
        out = self.out
        run_id = str(reader.attrs.get("run_id"))
        run_metrics = out.metrics.setdefault(run_id, {})
        for name, (steps, values) in reader.metrics().items():
            old_steps, old_values = run_metrics.get(name, (np.array([]), np.array([])))
            run_metrics[name] = (np.concatenate([old_steps, steps]), np.concatenate([old_values, values]))
        pending: dict[tuple, dict] = {}
        for record in reader.iter_rollouts(columns=COLUMNS):
            row = record.row
            out.rewards[row["kind"]][row["problem_id"]].append(float(row["reward"]))
            if row["kind"] == "original":
                out.step_rewards[(run_id, int(row["step"]), row["problem_id"])].append(float(row["reward"]))
            key = (reader.attrs.get("run_id"), int(row["step"]), row["problem_id"], int(row["sample_idx"]))
            fresh = row["kind"] in ("original", "regenerated")
            backtrack = record.tokens.get("teacher_mass_backtrack")
            if fresh and backtrack is not None and len(backtrack) >= 2:
                out.backtrack[row["kind"]].append(backtrack_halves(record.tokens))
            side = _SIDES.get(row["kind"])
            if side is None:
                continue
            key = key + (fresh,)
            pending.setdefault(key, {})[side] = record.tokens
            pair = pending[key]
            if "regen" in pair and "standard" in pair:
                if fresh:
                    _add_pair(out, key[1], pair["standard"], pair["regen"], problem=key[2])
                else:
                    _add_fixed_pair(out, key[1], key[2], pair["standard"], pair["regen"])
                del pending[key]

    def result(self) -> PrefixCorruption:
        return self.out


def collect(paths: list[Path]) -> PrefixCorruption:
    """Read every shard under `paths` once; pair original and regenerated rollouts."""
    collector = Collector()
    for reader in iter_shards(paths, skipped=collector.out.skipped):
        collector.add(reader)
    return collector.result()


# rollout kind -> which teacher's KL it holds
_SIDES = {"original": "standard", "regenerated": "regen", "fixed": "standard", "fixed_regenerated": "regen"}


def _delta_deciles(standard: dict, regen: dict) -> np.ndarray | None:
    """Per-decile mean of regen KL - standard KL over the shorter of the two lengths."""
    length = min(len(standard["topk_kl"]), len(regen["topk_kl"]))
    if length == 0:
        return None
    return decile_means(regen["topk_kl"][:length] - standard["topk_kl"][:length])


def _add_fixed_pair(out: PrefixCorruption, step: int, problem: str, standard: dict, regen: dict) -> None:
    delta = _delta_deciles(standard, regen)
    if delta is not None:
        out.fixed_by_step_problem[step][problem].append(delta)


def _add_pair(out: PrefixCorruption, step: int, standard: dict, regen: dict, problem: str = "") -> None:
    length = min(len(standard["topk_kl"]), len(regen["topk_kl"]))
    if length == 0:
        return
    std_k, reg_k = standard["topk_kl"][:length], regen["topk_kl"][:length]
    out.standard_topk.append(decile_means(std_k))
    out.regen_topk.append(decile_means(reg_k))
    delta = decile_means(reg_k - std_k)
    out.delta_topk.append(delta)
    out.by_step[step].append(delta)
    out.by_step_problem[step][problem].append(delta)
    if "full_kl" in standard and "full_kl" in regen:
        std_f, reg_f = standard["full_kl"][:length], regen["full_kl"][:length]
        out.standard_full.append(decile_means(std_f))
        out.regen_full.append(decile_means(reg_f))
        out.delta_full.append(decile_means(reg_f - std_f))


def backtrack_halves(tokens: dict) -> tuple[float, float, float, float]:
    """Mean backtracking-token mass over deciles 0-50% and 50-100%, teacher then student."""
    teacher, student = tokens["teacher_mass_backtrack"], tokens["student_mass_backtrack"]
    half = len(teacher) // 2
    return (float(np.mean(teacher[:half])), float(np.mean(teacher[half:])),
            float(np.mean(student[:half])), float(np.mean(student[half:])))


def backtrack_rows(result: PrefixCorruption) -> tuple[list[str], list[list[str]]]:
    """Experiment 5: teacher mass on backtracking tokens, late vs early and vs the student."""
    rows = []
    for kind, values in sorted(result.backtrack.items()):
        arr = np.array(values)  # [n, 4]
        mean, err, _ = mean_stderr(arr)
        late_vs_early = arr[:, 1] - arr[:, 0]
        late_vs_student = arr[:, 1] - arr[:, 3]
        fmt = lambda m, e: f"{m:.2e} ± {e:.1e}" if np.isfinite(e) else f"{m:.2e}"  # noqa: E731
        d1, e1, _ = mean_stderr(late_vs_early[:, None])
        d2, e2, _ = mean_stderr(late_vs_student[:, None])
        teacher = "standard (p + f)" if kind == "original" else "regen (p + s + f)"
        rows.append([teacher, str(len(arr)), fmt(mean[0], err[0]), fmt(mean[1], err[1]), fmt(mean[3], err[3]),
                     fmt(d1[0], e1[0]), fmt(d2[0], e2[0])])
    return ["teacher", "rollouts", "teacher early (0-50%)", "teacher late (50-100%)", "student late",
            "teacher late - early", "teacher late - student late"], rows


def reward_rows(result: PrefixCorruption) -> tuple[list[str], list[list[str]]]:
    """Experiment 1: mean reward (stderr) of s and s' per problem, and overall."""
    original, regen = result.rewards.get("original", {}), result.rewards.get("regenerated", {})
    rows = []
    for problem in sorted(set(original) | set(regen)):
        rows.append([problem, _fmt(original.get(problem, [])), _fmt(regen.get(problem, [])),
                     _delta(original.get(problem, []), regen.get(problem, []))])
    all_o = [r for v in original.values() for r in v]
    all_r = [r for v in regen.values() for r in v]
    rows.append(["overall", _fmt(all_o), _fmt(all_r), _delta(all_o, all_r)])
    return ["problem", "reward s (original)", "reward s' (regenerated)", "delta"], rows


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, err, _ = mean_stderr(np.array(values)[:, None])
    err_text = f"{err[0]:.3f}" if np.isfinite(err[0]) else "n/a"
    return f"{mean[0]:.3f} ± {err_text} (n={len(values)})"


def _delta(a: list[float], b: list[float]) -> str:
    return f"{np.mean(b) - np.mean(a):+.3f}" if a and b else "-"


def decile_rows(series: dict[str, list[np.ndarray]]) -> tuple[list[str], list[list[str]]]:
    """A table with one row per decile and `mean ± stderr` per named series."""
    headers = ["decile"] + list(series)
    stats = {name: mean_stderr(np.array(v)) if v else None for name, v in series.items()}
    rows = []
    for d in range(NUM_DECILES):
        row = [f"{d * 10:>3d}-{(d + 1) * 10}%"]
        for name in series:
            s = stats[name]
            row.append("-" if s is None or np.isnan(s[0][d]) else
                       f"{s[0][d]:+.4f} ± {s[1][d]:.4f}" if np.isfinite(s[1][d]) else f"{s[0][d]:+.4f}")
        rows.append(row)
    return headers, rows


def plot_deciles(series: dict[str, list[np.ndarray]], path: Path, title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(NUM_DECILES) * 10 + 5
    for name, rows in series.items():
        if not rows:
            continue
        mean, err, _ = mean_stderr(np.array(rows))
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, mean - np.nan_to_num(err), mean + np.nan_to_num(err), alpha=0.2)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("relative position in the response (decile midpoint, %)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
