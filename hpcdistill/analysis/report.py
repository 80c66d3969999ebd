"""`hpcdistill analyze SWEEP_DIR`: tables on the terminal, PNG figures and report.md on disk.

The report holds whatever the sweep's shards support: experiment 1 when regenerated rollouts are
recorded, experiment 2 when both teachers' KLs are, experiment 5 when full-vocabulary KL is.
Shards that cannot be read are listed, never averaged in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hpcdistill.analysis import prefix_corruption as pc
from hpcdistill.analysis import cliff, teachability, training
from hpcdistill.analysis.tables import format_table, markdown_table
from hpcdistill.errors import LaunchError

log = logging.getLogger(__name__)


def analyze_sweep(sweep_dir: str | Path, *, print_tables: bool = True) -> Path:
    sweep_dir = Path(sweep_dir).absolute()
    if not sweep_dir.exists():
        raise LaunchError(f"{sweep_dir}: no such sweep directory")
    out_dir = sweep_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = pc.collect([sweep_dir])
    sections: list[str] = [f"# Analysis of `{sweep_dir.name}`\n"]

    def emit(title: str, headers: list[str], rows: list[list[str]]) -> None:
        sections.append(f"## {title}\n\n{markdown_table(headers, rows)}\n")
        if print_tables:
            print(f"\n{title}\n{format_table(headers, rows)}")

    if result.rewards:
        headers, rows = pc.reward_rows(result)
        emit("Experiment 1: reward on regeneration (public-test pass rate, mean ± stderr)", headers, rows)
    if result.delta_topk:
        series = {"delta-KL top-k (regen - standard)": result.delta_topk}
        headers, rows = pc.decile_rows(series | {"standard KL": result.standard_topk,
                                                 "regen KL": result.regen_topk})
        emit(f"Experiment 2: per-decile delta-KL over {len(result.delta_topk)} rollouts "
             "(mean ± stderr)", headers, rows)
        fig = pc.plot_deciles(series, out_dir / "delta_kl_by_decile.png",
                              "Delta-KL by position (regen - standard teacher)", "delta KL (nats)")
        sections.append(f"![delta-KL by decile]({fig.name})\n")
        if print_tables:
            print(f"figure: {fig}")
    if result.delta_full:
        series = {"delta top-k": result.delta_topk[:len(result.delta_full)],
                  "delta full vocabulary": result.delta_full}
        headers, rows = pc.decile_rows(series | {"standard full KL": result.standard_full,
                                                 "regen full KL": result.regen_full})
        emit("Experiment 5: top-k vs full-vocabulary KL by decile", headers, rows)
        fig = pc.plot_deciles(series, out_dir / "topk_vs_full_by_decile.png",
                              "Delta-KL: top-k vs full vocabulary", "delta KL (nats)")
        sections.append(f"![top-k vs full]({fig.name})\n")
        if print_tables:
            print(f"figure: {fig}")
    if result.backtrack:
        headers, rows = pc.backtrack_rows(result)
        emit("Experiment 5: probability mass on backtracking tokens (mean ± stderr over rollouts)",
             headers, rows)
    steps = {step for (_, step, _) in result.step_rewards}
    arms = training.run_arms(sweep_dir)
    source, by_step = training.convergence_source(result)
    if len(by_step) > 1:
        headers, rows = training.convergence_rows(result)
        which = ("the fixed evaluation set (step 0's rollouts re-scored each step)" if source == "fixed"
                 else "each step's fresh rollouts")
        emit(f"Experiment 3: delta-KL per decile over training steps, on {which} "
             "(mean ± stderr over problems)", headers, rows)
        fig = training.plot_convergence(result, out_dir / "delta_kl_convergence.png")
        sections.append(f"![convergence]({fig.name})\n")
        if print_tables:
            print(f"figure: {fig}")
    if len(steps) > 1:
        headers, rows = training.reward_delta_rows(result.step_rewards, arms)
        emit("Reward delta per arm (last step - step 0; experiment 4)", headers, rows)
        headers, rows = training.final_eval_rows(result.metrics, arms)
        if len(headers) > 1:
            emit("Final eval per arm (mean ± stderr over runs)", headers, rows)
        for temperature, (headers, rows) in training.benchmark_rows(result.metrics, arms).items():
            emit(f"Final eval reward per benchmark at T={temperature} (mean ± stderr over runs; avg = the "
                 "benchmarks with average = true)", headers, rows)
        teach = teachability.collect([sweep_dir])
        if teach.advantage:
            headers, rows = teachability.bin_rows(teach.advantage, normalise=True)
            emit("Teachability: sampled-token advantage over 20 position bins (std along each trajectory, "
                 f"averaged over trajectories; {teachability.comparison_note(teach)})", headers, rows)
            headers, rows = teachability.bin_rows(teach.margin, normalise=False)
            emit("Teachability: teacher top-1/top-2 margin in the student's top-K", headers, rows)
            headers, rows = teachability.release_rows(teach)
            if rows:
                emit("Release rule diagnostics (accepted releases: pre vs post change)", headers, rows)
            for fig in teachability.plot(teach, out_dir):
                sections.append(f"![{fig.stem}]({fig.name})\n")
                if print_tables:
                    print(f"figure: {fig}")
    runs = cliff.collect([sweep_dir])
    if len({r.method for r in runs.values()}) > 1 or any(r.method not in ("on_policy",) for r in runs.values()):
        for family, (headers, rows) in cliff.method_rows(runs).items():
            emit(f"Methods: downstream accuracy and status ({family})", headers, rows)
        headers, rows = cliff.cost_rows(runs)
        emit("Cost per method (measured stage seconds; allocated GPU-hours x launch.gpu_hour_price)",
             headers, rows)
        fig = cliff.plot_curves(runs, out_dir / "method_curves.png")
        sections.append(f"![method curves]({fig.name})\n")
        if print_tables:
            print(f"figure: {fig}")
    from hpcdistill.analysis.diagnostics import diagnostics_rows

    headers, rows = diagnostics_rows(sweep_dir)
    if rows:
        emit("Teaching-signal diagnostics per run (token means over the student's rollouts; S = student, "
             "T = teacher, k = scoring.top_k)", headers, rows)
    from hpcdistill.analysis.context_distill import context_distill_report, loop_report
    from hpcdistill.analysis.probing import probe_report

    sections += probe_report([sweep_dir], out_dir, print_tables=print_tables)
    if any(r.spec.get("train", {}).get("objective") == "context_distill" for r in runs.values()):
        sections += context_distill_report(sweep_dir, out_dir, print_tables)
    if (sweep_dir / "loop.json").exists():
        sections += loop_report(sweep_dir, out_dir, print_tables)
    if result.skipped:
        lines = "\n".join(f"- `{path}`: {reason}" for path, reason in result.skipped)
        sections.append(f"## Skipped shards\n\n{lines}\n")
        if print_tables:
            print(f"\n{len(result.skipped)} shard(s) skipped (unreadable or incomplete); see the report")
    report = out_dir / "report.md"
    report.write_text("\n".join(sections), encoding="utf-8")
    if print_tables:
        print(f"report: {report}")
    return report
