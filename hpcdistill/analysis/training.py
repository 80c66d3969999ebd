"""Training studies from shards: seed 000 experiments 3 and 4, and per-arm result tables.

- Experiment 3: delta-KL per decile at every step (one line per decile, mean +/- stderr bands):
  on the fixed evaluation set (step 0's rollouts re-scored each step, `scoring.rescore_step0`)
  when the shards hold it, else on each step's fresh rollouts. "Average across problems showing
  mean +/- stderr": each problem's rollouts are averaged first, then mean +/- stderr over the
  problems (n = number of problems), per step and decile.
- Experiment 4: reward delta per arm = mean reward of the rollouts at the last step minus at
  step 0, per (run, problem), then mean +/- stderr per arm.
- Any sweep with eval: the final eval reward per arm and eval temperature; with eval.benchmarks
  (seed 002), one table per eval temperature: arms x benchmarks, plus the average ("avg").
An arm is a run's sweep overrides without the seed (read from the sweep's manifest).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from hpcdistill.rundir import SweepPaths, read_manifest
from hpcdistill.analysis.prefix_corruption import NUM_DECILES, PrefixCorruption, mean_stderr


def run_arms(sweep_dir: Path) -> dict[str, str]:
    """run_id -> arm label ("mask.kind=full, train.lr=1e-06"), from the sweep's manifest."""
    runs = read_manifest(SweepPaths(sweep_dir)).get("runs", {})
    return {rid: ", ".join(f"{k}={v}" for k, v in sorted(r.get("overrides", {}).items())) or "(base)"
            for rid, r in runs.items()}


def convergence_source(result: PrefixCorruption) -> tuple[str, dict[int, dict[str, list[np.ndarray]]]]:
    """(which rollouts, step -> problem -> per-rollout decile deltas) experiment 3 is read from:
    the fixed evaluation set when any shard recorded one, else the fresh rollouts of each step."""
    if result.fixed_by_step_problem:
        return "fixed", result.fixed_by_step_problem
    return "fresh", result.by_step_problem


def convergence_stats(by_problem: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, stderr and n per decile over PROBLEMS: each problem's rollouts are averaged first
    (ignoring deciles a short rollout leaves empty), then mean +/- stderr over the problems."""
    with warnings.catch_warnings():  # a decile no rollout of a problem reached stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_problem = [np.nanmean(np.array(rows), axis=0) if len(rows) else np.full(NUM_DECILES, np.nan)
                       for _, rows in sorted(by_problem.items())]
    if not per_problem:
        empty = np.full(NUM_DECILES, np.nan)
        return empty, empty, np.zeros(NUM_DECILES, dtype=int)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return mean_stderr(np.array(per_problem))


def convergence_rows(result: PrefixCorruption) -> tuple[list[str], list[list[str]]]:
    """Experiment 3: rows = steps, columns = deciles, cells = mean delta-KL ± stderr over problems."""
    _, by_step = convergence_source(result)
    headers = ["step", "problems"] + [f"d{d}" for d in range(NUM_DECILES)]
    rows = []
    for step in sorted(by_step):
        mean, err, _ = convergence_stats(by_step[step])
        rows.append([str(step), str(len(by_step[step]))] +
                    [f"{m:+.3f}±{e:.3f}" if np.isfinite(e) else f"{m:+.3f}" for m, e in zip(mean, err)])
    return headers, rows


def plot_convergence(result: PrefixCorruption, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source, by_step = convergence_source(result)
    steps = sorted(by_step)
    stats = [convergence_stats(by_step[s]) for s in steps]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 1, NUM_DECILES))
    for d in range(NUM_DECILES):
        mean = np.array([s[0][d] for s in stats])
        err = np.nan_to_num(np.array([s[1][d] for s in stats]))
        ax.plot(steps, mean, color=colors[d], marker=".", label=f"{d * 10}-{(d + 1) * 10}%")
        ax.fill_between(steps, mean - err, mean + err, color=colors[d], alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("delta KL, regen - standard (nats)")
    which = "fixed step-0 rollouts" if source == "fixed" else "fresh rollouts"
    ax.set_title(f"Delta-KL per decile over SDPO steps ({which}; mean ± stderr over problems)")
    ax.legend(fontsize=7, ncol=2, title="decile")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reward_delta_rows(rewards: dict[tuple[str, int, str], list[float]], arms: dict[str, str]
                      ) -> tuple[list[str], list[list[str]]]:
    """Experiment 4: `rewards[(run_id, step, problem)]` original-rollout rewards -> per-arm delta."""
    last = defaultdict(int)
    for run_id, step, _ in rewards:
        last[run_id] = max(last[run_id], step)
    deltas: dict[str, list[float]] = defaultdict(list)
    before: dict[str, list[float]] = defaultdict(list)
    after: dict[str, list[float]] = defaultdict(list)
    for (run_id, step, problem), values in rewards.items():
        if step != 0 or last[run_id] == 0:
            continue
        final = rewards.get((run_id, last[run_id], problem))
        if not final:
            continue
        arm = arms.get(run_id, run_id)
        before[arm].append(float(np.mean(values)))
        after[arm].append(float(np.mean(final)))
        deltas[arm].append(float(np.mean(final) - np.mean(values)))
    rows = []
    for arm in sorted(deltas):
        mean, err, n = mean_stderr(np.array(deltas[arm])[:, None])
        rows.append([arm, f"{np.mean(before[arm]):.3f}", f"{np.mean(after[arm]):.3f}",
                     f"{mean[0]:+.4f} ± {err[0]:.4f}" if np.isfinite(err[0]) else f"{mean[0]:+.4f}",
                     str(int(n[0]))])
    return ["arm", "reward step 0", "reward last step", "delta (mean ± stderr)", "n (run x problem)"], rows


def final_eval_rows(metrics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], arms: dict[str, str]
                    ) -> tuple[list[str], list[list[str]]]:
    """Final eval value of each `eval/...` metric per arm, mean ± stderr over the arm's runs
    (per-benchmark metrics `eval/<benchmark>/...` are `benchmark_rows`')."""
    names = sorted({n for m in metrics.values() for n in m if n.startswith("eval/") and n.count("/") == 1})
    return ["arm"] + names, _final_rows(metrics, arms, names)


def benchmark_rows(metrics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], arms: dict[str, str]
                   ) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Seed 002's results table per eval temperature T: rows = arms, columns = benchmarks (then
    "avg"), cells = the final `eval/<benchmark>/reward@T`, mean ± stderr over the arm's runs."""
    found = {n for m in metrics.values() for n in m
             if n.startswith("eval/") and n.count("/") == 2 and n.split("/")[2].startswith("reward@")}
    tables = {}
    for temperature in sorted({n.split("@", 1)[1] for n in found}, key=float):
        names = sorted((n for n in found if n.endswith(f"@{temperature}")),
                       key=lambda n: (n.split("/")[1] == "avg", n))  # the average last
        tables[temperature] = (["arm"] + [n.split("/")[1] for n in names], _final_rows(metrics, arms, names))
    return tables


def _final_rows(metrics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], arms: dict[str, str],
                names: list[str]) -> list[list[str]]:
    """Per arm, the last-step value of each metric in `names`, mean ± stderr over the arm's runs."""
    per_arm: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run_id, run_metrics in metrics.items():
        for name in names:
            if name in run_metrics and len(run_metrics[name][0]):
                steps, values = run_metrics[name]
                per_arm[arms.get(run_id, run_id)][name].append(float(values[np.argmax(steps)]))
    rows = []
    for arm in sorted(per_arm):
        row = [arm]
        for name in names:
            values = per_arm[arm].get(name, [])
            if not values:
                row.append("-")
                continue
            mean, err, _ = mean_stderr(np.array(values)[:, None])
            row.append(f"{mean[0]:.3f} ± {err[0]:.3f}" if np.isfinite(err[0]) else f"{mean[0]:.3f}")
        rows.append(row)
    return rows
