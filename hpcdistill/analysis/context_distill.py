"""Context distillation studies (seed 004): ablation tables, training curves, the loop report.

- `context_distill_report(sweep_dir, ...)`: per arm of a sweep (its sweep overrides, seeds pooled),
  the final eval accuracy (the student alone, no teacher context) as mean +/- stderr over seeds and
  its difference to the baseline arm; the seed's "metrics to watch" (sec. 6.1: teacher_kl,
  reward mean, is_masked fraction, geo_seq_ratio, truncation rate); curves of teacher_kl and
  reward per step (PNG).
- `loop_report(loop_dir, ...)`: per round of `hpcdistill loop`, the candidate prompts with their
  direct scores (current student WITH the prompt) and distilled scores (the student distilled from
  it, WITHOUT the prompt), and the chosen prompt as a unified diff against the last round's.
Both return markdown sections and write their figures to `out_dir`.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.analysis.report_writer import Report
from hpcdistill.errors import LaunchError
from hpcdistill.record import ShardReader, iter_shards
from hpcdistill.rundir import LoopPaths, SweepPaths, read_manifest
from hpcdistill.spec.load import get_dotted
from hpcdistill.spec.sweep import leaves

log = logging.getLogger(__name__)

CURVE_METRICS = {  # shard metric -> label (seed 004 sec. 6.1, "Metrics to watch")
    "train/teacher_kl": "teacher_kl (nats/token)",
    "reward_mean": "reward mean",
    "train/is_masked": "is_masked fraction",
    "train/geo_seq_ratio": "geo_seq_ratio",
    "truncation_rate": "truncation rate",
}
BASELINE = "(baseline)"


@dataclass
class RunMetrics:
    run_id: str
    arm: str
    seed: int | None
    series: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))  # name -> step -> value

    def final(self, name: str) -> float | None:
        values = self.series.get(name)
        return values[max(values)] if values else None


def arm_labels(sweep_dir: Path) -> tuple[dict[str, str], dict[str, int]]:
    """(run_id -> arm label, run_id -> seed) from the manifest. An arm is its sweep overrides as
    dotted leaves; one that sets nothing, or only values the base spec already has, is the baseline."""
    sweep = SweepPaths(sweep_dir)
    runs = read_manifest(sweep).get("runs", {})
    if not runs:
        return {}, {}
    base: dict[str, Any] = {}
    if sweep.spec.exists():
        base = tomllib.loads(sweep.spec.read_text())
        base.pop("sweep", None)
    labels, seeds = {}, {}
    for run_id, info in runs.items():
        dotted = [leaf for k, v in sorted(info.get("overrides", {}).items()) for leaf in leaves(k, v)]
        changed = [(k, v) for k, v in dotted if get_dotted(base, k, object()) != v]
        labels[run_id] = ", ".join(f"{k}={_short(v)}" for k, v in changed) or BASELINE
        seeds[run_id] = info.get("seed")
    return labels, seeds


def _short(value: Any, limit: int = 40) -> str:
    text = str(value).replace("\n", " ").replace("|", "\\|")  # one markdown table cell
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _student_label(student: str) -> str:
    """A bundled/hub id as is; a saved model dir as <round dir>/<run id> (.../round/distill/run/model)."""
    path = Path(student)
    if "/" not in student or len(path.parts) < 4:
        return student
    return f"{path.parents[2].name}/{path.parent.name}"


def is_run_shard(sweep_dir: Path, path: Path) -> bool:
    """A shard of one of the sweep's runs (<sweep>/<run>/shards/...), not of a nested sweep."""
    try:
        parts = Path(path).relative_to(sweep_dir).parts
    except ValueError:
        return False
    return len(parts) > 2 and parts[1] == "shards"


class Collector:
    """Per-step metrics of every run of a sweep, fed one open shard at a time (`add`)."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = Path(sweep_dir)
        self.labels, self.seeds = arm_labels(self.sweep_dir)
        self.runs: dict[str, RunMetrics] = {}

    def add(self, reader: ShardReader) -> None:
        if not is_run_shard(self.sweep_dir, reader.path):
            return
        run_id = reader.path.parent.parent.name
        run = self.runs.setdefault(run_id, RunMetrics(run_id, self.labels.get(run_id, run_id), self.seeds.get(run_id)))
        for name, (steps, values) in reader.metrics().items():
            for step, value in zip(steps, values):
                run.series[name][int(step)] = float(value)

    def result(self) -> list[RunMetrics]:
        return sorted(self.runs.values(), key=lambda r: (r.arm != BASELINE, r.arm, r.seed or 0))


def collect_runs(sweep_dir: Path, skipped: list | None = None) -> list[RunMetrics]:
    """Per-step metrics of every run of a sweep (one shard per step, streamed)."""
    collector = Collector(sweep_dir)
    for reader in iter_shards(sorted(Path(sweep_dir).glob("*/shards")), skipped=skipped):
        collector.add(reader)
    return collector.result()


def eval_metric(runs: list[RunMetrics]) -> str | None:
    """The eval accuracy metric the runs share (eval/reward@T, the lowest T), if any."""
    names = sorted({n for r in runs for n in r.series if n.startswith("eval/reward@")})
    return names[0] if names else None


def mean_stderr(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    err = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return float(arr.mean()), err


def _fmt(mean: float, err: float, digits: int = 4, signed: bool = False) -> str:
    if not np.isfinite(mean):
        return "-"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {err:.{digits}f}" if np.isfinite(err) else f"{mean:{sign}.{digits}f}"


def ablation_rows(runs: list[RunMetrics]) -> tuple[str, list[str], list[list[str]]]:
    """(metric, headers, rows): final eval accuracy per arm vs the baseline, mean ± stderr over seeds."""
    metric = eval_metric(runs) or "reward_mean"
    by_arm: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        value = run.final(metric)
        if value is not None:
            by_arm[run.arm].append(value)
    base = by_arm.get(BASELINE)
    base_mean, base_err = mean_stderr(base) if base else (float("nan"), float("nan"))
    headers = ["arm", "seeds", f"final {metric}", "vs baseline"]
    rows = []
    for arm, values in by_arm.items():
        mean, err = mean_stderr(values)
        if arm == BASELINE or not base:
            delta = "-"
        else:
            combined = float(np.sqrt(np.nan_to_num(err) ** 2 + np.nan_to_num(base_err) ** 2))
            delta = _fmt(mean - base_mean, combined if (np.isfinite(err) or np.isfinite(base_err)) else float("nan"),
                         signed=True)
        rows.append([arm, str(len(values)), _fmt(mean, err), delta])
    return metric, headers, rows


def health_rows(runs: list[RunMetrics]) -> tuple[list[str], list[list[str]]]:
    """Seed 6.1's metrics to watch per arm: first and last teacher_kl, mean of the others."""
    headers = ["arm", "teacher_kl first", "teacher_kl last", "reward mean", "is_masked", "geo_seq_ratio",
               "truncation"]
    arms: dict[str, list[RunMetrics]] = defaultdict(list)
    for run in runs:
        arms[run.arm].append(run)
    rows = []
    for arm, members in arms.items():
        def per_run(name: str, how: str) -> list[float]:
            out = []
            for r in members:
                values = r.series.get(name)
                if values:
                    steps = sorted(values)
                    out.append(values[steps[0]] if how == "first" else values[steps[-1]] if how == "last"
                               else float(np.mean([values[s] for s in steps])))
            return out

        cells = [per_run("train/teacher_kl", "first"), per_run("train/teacher_kl", "last"),
                 per_run("reward_mean", "mean"), per_run("train/is_masked", "mean"),
                 per_run("train/geo_seq_ratio", "mean"), per_run("truncation_rate", "mean")]
        rows.append([arm] + [_fmt(*mean_stderr(c)) for c in cells])
    return headers, rows


def plot_curves(runs: list[RunMetrics], path: Path) -> Path:
    """teacher_kl and reward (and the masking/truncation health metrics) per step, one line per arm
    (mean over seeds, stderr band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CURVE_METRICS if any(n in r.series for r in runs)] or ["reward_mean"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    arms: dict[str, list[RunMetrics]] = defaultdict(list)
    for run in runs:
        arms[run.arm].append(run)
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(arms), 2)))
    for ax, name in zip(axes[0], names):
        for color, (arm, members) in zip(colors, arms.items()):
            steps = sorted({s for r in members for s in r.series.get(name, {})})
            if not steps:
                continue
            stats = [mean_stderr([r.series[name][s] for r in members if s in r.series.get(name, {})]) for s in steps]
            mean = np.array([m for m, _ in stats])
            err = np.nan_to_num(np.array([e for _, e in stats]))
            ax.plot(steps, mean, marker=".", color=color, label=_short(arm, 30),
                    linewidth=2.2 if arm == BASELINE else 1.2)
            ax.fill_between(steps, mean - err, mean + err, color=color, alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_title(CURVE_METRICS.get(name, name), fontsize=10)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def context_distill_report(sweep_dir: Path, out_dir: Path, print_tables: bool) -> list[str]:
    """Markdown sections for a context-distillation sweep (baseline, ablations, recommended configs)."""
    skipped: list = []
    report = Report(out_dir, echo=print_tables)
    context_distill_sections(report, collect_runs(Path(sweep_dir), skipped), skipped)
    return report.sections


def context_distill_sections(report: Report, runs: list[RunMetrics], skipped: list) -> None:
    """The ablation table, the metrics to watch and their curves, into `report`."""
    if not runs:
        return
    metric, headers, rows = ablation_rows(runs)
    what = "eval accuracy of the student alone" if metric.startswith("eval/") else \
        "training reward (no eval recorded; set eval.every > 0)"
    report.table(f"Context distillation: final {what} per arm vs the baseline (mean ± stderr over seeds)",
                 headers, rows)
    headers, rows = health_rows(runs)
    report.table("Context distillation: metrics to watch (seed 004 sec. 6.1; mean ± stderr over seeds)",
                 headers, rows)
    report.figure("context_distill_curves.png", lambda path: plot_curves(runs, path),
                  "teacher_kl and reward per step")
    report.skipped("Skipped shards (context distillation)", skipped)


# ---------------------------------------------------------------------------- the loop


def read_loop_record(loop_dir: Path) -> dict[str, Any]:
    """The loop record: `loop_dir` itself when it is a file, else the JSON in it that has rounds."""
    loop_dir = Path(loop_dir)
    if loop_dir.is_file():
        return json.loads(loop_dir.read_text())
    candidates = [LoopPaths(loop_dir).record] + sorted(loop_dir.glob("*.json"))
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "rounds" in data and "spec_hash" in data:
                return data
    raise LaunchError(f"{loop_dir}: no loop record (loop.json) here; was it made by `hpcdistill loop`?")


def prompt_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), old_name, new_name, lineterm=""))
    return "\n".join(lines) if lines else "(unchanged)"


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def plot_loop(rounds: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(xs, [r.get("student_score", np.nan) for r in rounds], marker="o", label="student (no context)")
    ax.plot(xs, [r["chosen"]["direct_score"] for r in rounds], marker="s", label="chosen prompt, direct")
    ax.plot(xs, [r["chosen"]["distilled_score"] for r in rounds], marker="^", label="distilled student")
    ax.set_xlabel("round")
    ax.set_ylabel("validation reward")
    ax.set_xticks(xs)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loop_report(loop_dir: Path, out_dir: Path, print_tables: bool) -> list[str]:
    """Markdown sections for `hpcdistill loop`: per round the prompt (diffed against the last
    round's), its direct score and the distilled student's score."""
    report = Report(out_dir, echo=print_tables)
    loop_sections(report, read_loop_record(Path(loop_dir)))
    return report.sections


def loop_sections(report: Report, record: dict[str, Any]) -> None:
    rounds = [r for r in record["rounds"] if r.get("state") == "completed"]
    headers = ["round", "student", "student score", "candidates", "distilled", "chosen", "direct score",
               "distilled score", "gain"]
    rows = []
    for r in rounds:
        chosen = r["chosen"]
        # distilled students are scored on the held-out problems (loop.heldout_*): so is the baseline
        gain = chosen["distilled_score"] - r.get("student_heldout_score", r["student_score"])
        rows.append([str(r["round"]), _short(_student_label(r["student"]), 48),
                     _score(r["student_score"]), str(len(r["candidates"])), str(len(r["distilled"])),
                     f"#{chosen['candidate']}", _score(chosen["direct_score"]), _score(chosen["distilled_score"]),
                     f"{gain:+.4f}"])
    report.table(f"Prompt-optimization loop `{record.get('name')}`: per round (student / direct = validation "
                 "reward of the current student without / WITH the prompt; distilled = the distilled student "
                 "WITHOUT it on the held-out problems; gain = distilled minus the current student on those)",
                 headers, rows)
    unfinished = [r["round"] for r in record["rounds"] if r.get("state") != "completed"]
    if unfinished:
        report.section(f"Rounds not completed: {unfinished}\n")
    previous = rounds[0]["seed_prompt"] if rounds else ""
    previous_name = "seed prompt"
    for r in rounds:
        chosen = r["chosen"]["candidate"]
        cand_rows = [[f"#{c['index']}", ",".join(f"#{p}" for p in c["parents"]) or "-", _score(c["direct_score"]),
                      _score(c.get("distilled_score")), "yes" if c["index"] in r["top_k"] else "",
                      "chosen" if c["index"] == chosen else "", _short(c["prompt"], 60)]
                     for c in r["candidates"]]
        report.table(f"Round {r['round']}: candidate prompts", ["candidate", "parents", "direct score",
                                                               "distilled score", "top-k", "", "prompt"], cand_rows)
        diff = prompt_diff(previous, r["chosen_prompt"], previous_name, f"round {r['round']} chosen")
        title = f"Round {r['round']}: chosen prompt vs {previous_name}"
        report.section(f"### {title}\n\n```diff\n{diff}\n```\n", f"\n{title}\n{diff}")
        previous, previous_name = r["chosen_prompt"], f"round {r['round']} chosen"
    if rounds:
        report.figure("loop_scores.png", lambda path: plot_loop(rounds, path), "loop scores per round")


__all__ = ["Collector", "context_distill_report", "context_distill_sections", "loop_report", "loop_sections",
           "collect_runs", "is_run_shard", "ablation_rows", "health_rows",
           "arm_labels", "prompt_diff", "read_loop_record"]
