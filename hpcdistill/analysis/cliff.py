"""Seed 003, on- vs off-policy distillation and the distribution cliff: tables from shards.

Per run, from the per-step metrics of its shards: the eval curve (`eval/reward@T`, the first eval
temperature), collapse detection, final accuracy, and the cost of what the task measured. Per
method and model family: accuracy mean +/- stderr over seeds and a status in the seed's layout:

- Collapsed: at least half of the seeds collapsed: the eval score had been above `threshold`,
  then fell to <= threshold at some step and stayed there to the end (that step is reported);
- Partial: some seeds collapsed, or the mean is below half of the best method's;
- Best: the highest mean of the remaining methods; Stable: the others.

Cost (seed 003 "Cost Analysis"): device-hours by role from the measured seconds of each stage
(rollout = student sampling; teacher = teacher generation and scoring; trainer = updates; eval),
times the GPUs `launch.gpus` gives that role (1 per role on CPU), and the allocated GPU-hours
(wall time x all GPUs of the task) times `launch.gpu_hour_price`; or, for a student listed in
`launch.run_hour_price`, the run's wall hours times its price per run-hour (the seed's pricing:
~$0.75 per hour for a Qwen run, ~$1.00 for a Llama run, whatever the run's GPUs).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.analysis.prefix_corruption import mean_stderr
from hpcdistill.record import ShardReader, iter_shards
from hpcdistill.spec.load import spec_to_dict

ROLE_SECONDS = {"rollout": ("rollout_seconds",), "teacher": ("teacher_seconds", "scoring_seconds"),
                "trainer": ("train_seconds",), "eval": ("eval_seconds",)}


@dataclass
class RunCurve:
    run_id: str
    method: str
    family: str
    seed: int
    spec: dict  # the run's validated spec as plain data (spec_to_dict of ShardReader.spec)
    metrics: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))


class Collector:
    """Per run, its eval curve and stage seconds, fed one open shard at a time (`add`)."""

    def __init__(self):
        self.runs: dict[str, RunCurve] = {}

    def add(self, reader: ShardReader) -> None:
        run_id = str(reader.attrs.get("run_id"))
        if run_id not in self.runs:
            spec = reader.spec
            self.runs[run_id] = RunCurve(run_id, spec.train.method, f"{spec.model.student} <- {spec.model.teacher}",
                                         int(reader.attrs.get("seed", 0)), spec_to_dict(spec))
        for name, (steps, values) in reader.metrics().items():
            for step, value in zip(steps, values):
                self.runs[run_id].metrics[name][int(step)] = float(value)

    def result(self) -> dict[str, RunCurve]:
        return self.runs


def collect(paths: list[Path], skipped: list | None = None) -> dict[str, RunCurve]:
    collector = Collector()
    for reader in iter_shards(paths, skipped=skipped, spec=True):
        collector.add(reader)
    return collector.result()


def eval_metric(run: RunCurve) -> str | None:
    names = sorted(n for n in run.metrics if n.startswith("eval/reward@"))
    return names[0] if names else None


def collapse_step(curve: dict[int, float], threshold: float) -> int | None:
    """First step from which the score stays <= threshold to the end, having been above it."""
    steps = sorted(curve)
    if not steps:
        return None
    values = [curve[s] for s in steps]
    for i, step in enumerate(steps):
        if all(v <= threshold for v in values[i:]) and any(v > threshold for v in values[:i]):
            return step
    return None


def method_rows(runs: dict[str, RunCurve], threshold: float = 0.02) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per model family: method, accuracy mean ± stderr, collapsed seeds (steps), status."""
    by_family: dict[str, dict[str, list[tuple[float, int | None]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs.values():
        name = eval_metric(run)
        if name is None:
            continue
        curve = run.metrics[name]
        final = curve[max(curve)]
        by_family[run.family][run.method].append((final, collapse_step(curve, threshold)))
    tables = {}
    for family, methods in by_family.items():
        stats = {}
        for method, results in methods.items():
            finals = np.array([r[0] for r in results])
            mean, err, n = mean_stderr(finals[:, None])
            collapsed = [r[1] for r in results if r[1] is not None]
            stats[method] = (mean[0], err[0], int(n[0]), collapsed)
        best_mean = max((s[0] for m, s in stats.items() if len(s[3]) * 2 < s[2]), default=np.nan)
        rows = []
        for method, (mean, err, n, collapsed) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
            if len(collapsed) * 2 >= n:
                status = "Collapsed"
            elif collapsed or (np.isfinite(best_mean) and mean < 0.5 * best_mean):
                status = "Partial"
            elif mean == best_mean:
                status = "Best"
            else:
                status = "Stable"
            rows.append([method, f"{100 * mean:.1f}% ± {100 * err:.1f}" if np.isfinite(err) else f"{100 * mean:.1f}%",
                         f"{len(collapsed)}/{n}" + (f" (steps {', '.join(map(str, sorted(collapsed)))})"
                                                     if collapsed else ""), status])
        tables[family] = (["method", "accuracy (mean ± stderr over seeds)", "collapsed seeds", "status"], rows)
    return tables


def run_cost(run: RunCurve) -> dict[str, float]:
    gpus = run.spec.get("launch", {}).get("gpus", {})
    total_gpus = sum(gpus.get(r, 0) for r in ("rollout", "teacher", "trainer"))
    out = {}
    for role, names in ROLE_SECONDS.items():
        seconds = sum(sum(run.metrics.get(n, {}).values()) for n in names)
        devices = max(gpus.get(role if role != "eval" else "rollout", 0), 1)
        out[f"{role}_device_hours"] = seconds * devices / 3600
    wall = sum(run.metrics.get("step_seconds", {}).values())
    out["allocated_gpu_hours"] = wall * total_gpus / 3600
    out["wall_hours"] = wall / 3600
    out["generated_tokens"] = sum(run.metrics.get("response_tokens", {}).values()) + sum(
        run.metrics.get("teacher_tokens", {}).values())
    out["scored_tokens"] = sum(run.metrics.get("scored_tokens", {}).values())
    launch = run.spec.get("launch", {})
    per_run_hour = launch.get("run_hour_price", {}).get(run.spec.get("model", {}).get("student"))
    if per_run_hour is not None:
        out["cost"] = out["wall_hours"] * per_run_hour
    else:
        out["cost"] = out["allocated_gpu_hours"] * launch.get("gpu_hour_price", 0.0)
    return out


def cost_rows(runs: dict[str, RunCurve]) -> tuple[list[str], list[list[str]]]:
    """Seed 003's cost table, per method: runs, wall hours and device-hours by role, tokens, cost."""
    per_method: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in runs.values():
        per_method[run.method].append(run_cost(run))
    rows = []
    for method, costs in sorted(per_method.items()):
        total = {k: sum(c[k] for c in costs) for k in costs[0]}
        rows.append([method, str(len(costs)), f"{total['wall_hours']:.3f}",
                     f"{total['rollout_device_hours']:.3f}", f"{total['teacher_device_hours']:.3f}",
                     f"{total['trainer_device_hours']:.3f}", f"{total['allocated_gpu_hours']:.2f}",
                     f"{int(total['generated_tokens']):,}", f"{int(total['scored_tokens']):,}",
                     f"${total['cost']:.2f}", f"${total['cost'] / len(costs):.2f}"])
    return ["method", "runs", "wall h", "rollout dev-h", "teacher dev-h", "trainer dev-h", "alloc GPU-h",
            "tokens generated", "tokens scored", "cost", "per run"], rows


def plot_curves(runs: dict[str, RunCurve], path: Path) -> Path:
    """Loss, KL and eval per step, one line per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train/loss_total", "loss"), ("topk_kl_mean", "top-k KL (student || teacher)"), (None, "eval")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (metric, title) in zip(axes, panels):
        by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in runs.values():
            name = metric or eval_metric(run)
            for step, value in run.metrics.get(name or "", {}).items():
                by_method[run.method][step].append(value)
        for method, curve in sorted(by_method.items()):
            steps = sorted(curve)
            ax.plot(steps, [np.mean(curve[s]) for s in steps], marker=".", label=method)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
