"""`hpcdistill analyze SWEEP_DIR`: tables on the terminal, PNG figures and report.md on disk.

The report holds whatever the sweep's shards support: experiment 1 when regenerated rollouts are
recorded, experiment 2 when both teachers' KLs are, experiment 5 when full-vocabulary KL is.
Every shard is opened once and fed to every study's collector. Shards that cannot be read, or
whose spec no longer validates, are listed, never averaged in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hpcdistill.analysis import prefix_corruption as pc
from hpcdistill.analysis import cliff, context_distill, diagnostics, probing, teachability, training
from hpcdistill.analysis.report_writer import Report
from hpcdistill.errors import LaunchError
from hpcdistill.record import iter_shards
from hpcdistill.rundir import LoopPaths, SweepPaths

log = logging.getLogger(__name__)


def analyze_sweep(sweep_dir: str | Path, *, print_tables: bool = True) -> Path:
    sweep_dir = Path(sweep_dir).absolute()
    if not sweep_dir.exists():
        raise LaunchError(f"{sweep_dir}: no such sweep directory")
    sweep = SweepPaths(sweep_dir)
    sweep.analysis.mkdir(parents=True, exist_ok=True)
    collectors = {"prefix": pc.Collector(), "teach": teachability.Collector(), "cliff": cliff.Collector(),
                  "diag": diagnostics.Collector(), "probe": probing.Collector(),
                  "context": context_distill.Collector(sweep_dir)}
    skipped: list = []
    for reader in iter_shards([sweep_dir], skipped=skipped, spec=True):
        for collector in collectors.values():
            collector.add(reader)
    report = Report(sweep.analysis, path=sweep.report, echo=print_tables)
    report.section(f"# Analysis of `{sweep_dir.name}`\n")
    result = collectors["prefix"].result()
    prefix_corruption_sections(report, result)
    arms = training.run_arms(sweep_dir)
    training_sections(report, result, arms, collectors["teach"])
    runs = collectors["cliff"].result()
    if len({r.method for r in runs.values()}) > 1 or any(r.method not in ("on_policy",) for r in runs.values()):
        for family, (headers, rows) in cliff.method_rows(runs).items():
            report.table(f"Methods: downstream accuracy and status ({family})", headers, rows)
        report.table("Cost per method (measured stage seconds; allocated GPU-hours x launch.gpu_hour_price)",
                     *cliff.cost_rows(runs))
        report.figure("method_curves.png", lambda path: cliff.plot_curves(runs, path), "method curves")
    headers, rows = diagnostics.diagnostics_table(collectors["diag"].result(), arms)
    if rows:
        report.table("Teaching-signal diagnostics per run (token means over the student's rollouts; S = student, "
                     "T = teacher, k = scoring.top_k)", headers, rows)
    probing.probe_sections(report, collectors["probe"].result(), skipped=[])
    if any(r.spec["train"]["objective"] == "context_distill" for r in runs.values()):
        context_distill.context_distill_sections(
            report, collectors["context"].result(),
            [(p, why) for p, why in skipped if context_distill.is_run_shard(sweep_dir, p)])
    if LoopPaths(sweep_dir).record.exists():
        context_distill.loop_sections(report, context_distill.read_loop_record(sweep_dir))
    if skipped:
        report.skipped("Skipped shards", skipped)
        report.say(f"\n{len(skipped)} shard(s) skipped (unreadable or incomplete); see the report")
    return report.write()


def prefix_corruption_sections(report: Report, result: pc.PrefixCorruption) -> None:
    """Seed 000 experiments 1, 2 and 5."""
    if result.rewards:
        report.table("Experiment 1: reward on regeneration (public-test pass rate, mean ± stderr)",
                     *pc.reward_rows(result))
    if result.delta_topk:
        series = {"delta-KL top-k (regen - standard)": result.delta_topk}
        headers, rows = pc.decile_rows(series | {"standard KL": result.standard_topk,
                                                 "regen KL": result.regen_topk})
        report.table(f"Experiment 2: per-decile delta-KL over {len(result.delta_topk)} rollouts "
                     "(mean ± stderr)", headers, rows)
        report.figure("delta_kl_by_decile.png", lambda path: pc.plot_deciles(
            series, path, "Delta-KL by position (regen - standard teacher)", "delta KL (nats)"), "delta-KL by decile")
    if result.delta_full:
        series = {"delta top-k": result.delta_topk[:len(result.delta_full)],
                  "delta full vocabulary": result.delta_full}
        headers, rows = pc.decile_rows(series | {"standard full KL": result.standard_full,
                                                 "regen full KL": result.regen_full})
        report.table("Experiment 5: top-k vs full-vocabulary KL by decile", headers, rows)
        report.figure("topk_vs_full_by_decile.png", lambda path: pc.plot_deciles(
            series, path, "Delta-KL: top-k vs full vocabulary", "delta KL (nats)"), "top-k vs full")
    if result.backtrack:
        report.table("Experiment 5: probability mass on backtracking tokens (mean ± stderr over rollouts)",
                     *pc.backtrack_rows(result))


def training_sections(report: Report, result: pc.PrefixCorruption, arms: dict[str, str],
                      teach_collector: teachability.Collector) -> None:
    """Seed 000 experiments 3 and 4, the per-arm eval tables, and seed 002's teachability."""
    source, by_step = training.convergence_source(result)
    if len(by_step) > 1:
        which = ("the fixed evaluation set (step 0's rollouts re-scored each step)" if source == "fixed"
                 else "each step's fresh rollouts")
        report.table(f"Experiment 3: delta-KL per decile over training steps, on {which} "
                     "(mean ± stderr over problems)", *training.convergence_rows(result))
        report.figure("delta_kl_convergence.png", lambda path: training.plot_convergence(result, path),
                      "convergence")
    if len({step for (_, step, _) in result.step_rewards}) <= 1:
        return
    report.table("Reward delta per arm (last step - step 0; experiment 4)",
                 *training.reward_delta_rows(result.step_rewards, arms))
    headers, rows = training.final_eval_rows(result.metrics, arms)
    if len(headers) > 1:
        report.table("Final eval per arm (mean ± stderr over runs)", headers, rows)
    for temperature, (headers, rows) in training.benchmark_rows(result.metrics, arms).items():
        report.table(f"Final eval reward per benchmark at T={temperature} (mean ± stderr over runs; avg = the "
                     "benchmarks with average = true)", headers, rows)
    teach = teach_collector.result()
    if not teach.advantage:
        return
    report.table("Teachability: sampled-token advantage over 20 position bins (std along each trajectory, "
                 f"averaged over trajectories; {teachability.comparison_note(teach)})",
                 *teachability.bin_rows(teach.advantage, normalise=True))
    report.table("Teachability: teacher top-1/top-2 margin in the student's top-K",
                 *teachability.bin_rows(teach.margin, normalise=False))
    headers, rows = teachability.release_rows(teach)
    if rows:
        report.table("Release rule diagnostics (accepted releases: pre vs post change)", headers, rows)
    report.figure("teachability_bins.png", lambda path: teachability.plot_bins(teach, path))
    if teachability.release_records(teach):
        report.figure("release_diagnostics.png", lambda path: teachability.plot_releases(teach, path))
