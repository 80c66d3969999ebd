"""`hpcdistill ...`: the command line.

A user error (bad spec, bad run directory, unreadable shard) prints one message without a
traceback and exits with status 2; nothing is written before the spec is fully validated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hpcdistill.errors import UserError

log = logging.getLogger("hpcdistill.cli")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from hpcdistill.analysis.tables import format_table

    return format_table(headers, rows)


def _overrides_text(overrides: dict) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items()) or "-"


def _load(args):
    from hpcdistill.spec import load_spec

    return load_spec(args.spec, args.set or [])


# ---------------------------------------------------------------------------- commands


def cmd_expand(args) -> int:
    from hpcdistill.spec import expand

    loaded = _load(args)
    runs = expand(loaded, force=args.force)
    if args.json:
        print(json.dumps([{"run_id": r.run_id, "seed": r.seed, "overrides": r.overrides}
                          for r in runs], indent=2))
        return 0
    print(_table(["#", "run_id", "seed", "overrides"],
                 [[str(i), r.run_id, str(r.seed), _overrides_text(r.overrides)]
                  for i, r in enumerate(runs)]))
    print(f"{len(runs)} runs of '{loaded.spec.experiment.name}'")
    return 0


def cmd_plan(args) -> int:
    from hpcdistill.spec import expand
    from hpcdistill.train.memory_plan import format_plan, model_shape, plan_step

    loaded = _load(args)
    shapes: dict[str, object] = {}
    for run in expand(loaded, force=True):
        spec = run.spec
        student = shapes.setdefault(spec.model.student, model_shape(spec.model.student, args.model_config))
        teacher = None
        if spec.model.teacher not in ("same", spec.model.student):
            teacher = shapes.setdefault(spec.model.teacher, model_shape(spec.model.teacher, args.teacher_config))
        print(format_plan(run.run_id, spec, plan_step(spec, student, teacher, args.prompt_tokens), args.prompt_tokens))
    return 0


def cmd_render(args) -> int:
    from hpcdistill.launch.submit import node_layout, render_script

    loaded = _load(args)
    for i, script in enumerate(render_script(loaded)):
        if i:
            print("\n# ---- next array ----\n")
        print(script)
    if loaded.spec.launch.nodes > 1:  # after the scripts, which are exactly what sbatch gets
        print("\n".join(node_layout(loaded.spec)))
    return 0


def cmd_submit(args) -> int:
    from hpcdistill.rundir import SweepPaths
    from hpcdistill.launch.submit import render_script, submit
    from hpcdistill.spec import expand

    loaded = _load(args)
    runs = expand(loaded, force=args.force)
    spec = loaded.spec
    executor = args.executor or spec.launch.executor
    sweep = SweepPaths.for_spec(spec.experiment.output_dir, spec.experiment.name)
    if args.dry_run:
        print(_table(["run_id", "seed", "overrides"],
                     [[r.run_id, str(r.seed), _overrides_text(r.overrides)] for r in runs]))
        print(f"dry run: {len(runs)} runs would be submitted with the {executor} executor "
              f"into {sweep.root}")
        if executor == "slurm":
            for script in render_script(loaded, runs):
                print(script)
        return 0
    result = submit(loaded, executor=executor, runs=runs, force=args.force, wait=True if args.wait else None)
    print(f"{len(result.submitted)} runs submitted, {len(result.skipped)} skipped "
          f"(completed or queued) with the {executor} executor")
    if result.array_ids:
        print("job array(s): " + ", ".join(result.array_ids))
    print(f"results: {sweep.root}")
    if executor != "slurm" or args.wait:
        _print_status(sweep.root)
        if not args.no_analyze and executor != "slurm":
            from hpcdistill.analysis.report import analyze_sweep

            analyze_sweep(sweep.root, print_tables=True)
    return 0


def _print_status(sweep_dir: Path) -> list:
    from hpcdistill.launch.status import sweep_status

    statuses = sweep_status(sweep_dir)
    rows = [[s.run_id, _overrides_text(s.overrides), s.state, s.job_id or "-",
             str(s.shards[-1].relative_to(sweep_dir)) if s.shards else "-"] for s in statuses]
    print(_table(["run_id", "overrides", "state", "job_id", "shard"], rows))
    return statuses


def cmd_status(args) -> int:
    from hpcdistill.launch.status import sweep_status

    if args.watch or args.once:  # steps, loss and eval reward from each run's metrics.jsonl
        from hpcdistill.launch.watch import progress_table, sweep_progress, watch

        if args.once:
            print(progress_table(sweep_progress(args.run_dir), _overrides_text))
            return 0
        try:
            watch(args.run_dir, _overrides_text, interval_s=args.interval)
        except KeyboardInterrupt:
            pass
        return 0
    if args.json:
        print(json.dumps([{"run_id": s.run_id, "seed": s.seed, "overrides": s.overrides,
                           "state": s.state, "job_id": s.job_id,
                           "shards": [str(p) for p in s.shards]} for s in sweep_status(args.run_dir)],
                         indent=2))
        return 0
    statuses = _print_status(Path(args.run_dir).absolute())
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def cmd_resubmit(args) -> int:
    from hpcdistill.launch.status import NEEDS_RERUN, sweep_from_dir, sweep_status
    from hpcdistill.launch.submit import submit
    from hpcdistill.spec import expand, load_spec

    sweep = sweep_from_dir(args.run_dir)
    statuses = sweep_status(sweep.root)
    wanted = {s.run_id for s in statuses if s.state in NEEDS_RERUN} if args.failed else \
        {s.run_id for s in statuses if s.state != "completed"}
    if not wanted:
        print("nothing to resubmit: " + ", ".join(sorted({s.state for s in statuses})))
        return 0
    loaded = load_spec(sweep.spec)
    runs = [r for r in expand(loaded, force=True) if r.run_id in wanted]
    result = submit(loaded, executor=args.executor, runs=runs, only=wanted, force=True)
    print(f"{len(result.submitted)} runs resubmitted" +
          (f" as job array(s) {', '.join(result.array_ids)}" if result.array_ids else ""))
    return 0


def cmd_analyze(args) -> int:
    from hpcdistill.analysis.report import analyze_sweep

    analyze_sweep(Path(args.run_dir), print_tables=True)
    return 0


def cmd_replay(args) -> int:
    """Loss replay: variants of the loss recomputed on the sweep's recorded tokens, side by side."""
    from hpcdistill.analysis.replay import parse_variants, replay_sweep
    from hpcdistill.analysis.replay_report import replay_report
    from hpcdistill.errors import LaunchError, ModelError
    from hpcdistill.models.loading import load_tokenizer

    sweep_dir = Path(args.run_dir).absolute()
    if not sweep_dir.is_dir():
        raise LaunchError(f"{sweep_dir}: no such sweep directory")
    variants = parse_variants(args.set, args.variant)
    result = replay_sweep(sweep_dir, variants, run_ids=args.run)
    try:
        tokenizer = load_tokenizer(result.tokenizer_id) if result.tokenizer_id else None
    except ModelError as exc:
        log.warning("token text not shown: %s", exc)
        tokenizer = None
    from hpcdistill.rundir import SweepPaths

    out_dir = SweepPaths(sweep_dir).replay
    sections = [f"# Loss replay of `{sweep_dir.name}`\n"]
    sections += replay_report(result, out_dir, print_tables=True, top=args.top, tokenizer=tokenizer)
    if result.unreplayed:
        sections.append("## Steps not replayed\n\n" + "\n".join(
            f"- {run} step {step}: {why}" for run, step, why in result.unreplayed) + "\n")
        print(f"\n{len(result.unreplayed)} step(s) not replayed (their weights are gone); see the report")
    if result.skipped:
        sections.append("## Skipped shards\n\n" + "\n".join(f"- `{p}`: {r}" for p, r in result.skipped) + "\n")
    report = SweepPaths(sweep_dir).replay_report
    report.write_text("\n".join(sections), encoding="utf-8")
    print(f"report: {report}")
    return 0


def cmd_probe(args) -> int:
    """Lock/fork probing (seed 001): a probe run on this machine, then its report."""
    from hpcdistill.spec.command_rules import check_probe_spec

    loaded = _load(args)
    spec = loaded.spec
    check_probe_spec(spec)  # a bad [probe] exits 2 before a model loads

    from hpcdistill.analysis.probing import probe_report
    from hpcdistill.rundir import SweepPaths
    from hpcdistill.train.probe import run_probe

    sweep = SweepPaths.for_spec(spec.experiment.output_dir, spec.experiment.name)
    sweep.root.mkdir(parents=True, exist_ok=True)
    shard = run_probe(spec, sweep.probe_run.root)
    sections = probe_report([shard], sweep.analysis, print_tables=True)
    sweep.analysis.mkdir(parents=True, exist_ok=True)
    report = sweep.probe_report
    report.write_text("\n".join(sections), encoding="utf-8")
    print(f"probe shard: {shard}\nreport: {report}")
    return 0


def cmd_loop(args) -> int:
    """Looped context distillation with prompt optimization (seed 004 sections 6.3, 6.5)."""
    from hpcdistill.spec.command_rules import check_loop_spec

    loaded = _load(args)
    check_loop_spec(loaded)  # a spec that cannot drive the loop exits 2 before anything runs

    from hpcdistill.launch.prompt_loop import run_loop

    loop_dir = run_loop(loaded, executor=args.executor)
    print(f"loop results: {loop_dir}")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcdistill", description=(
        "Run on-policy distillation and self-distillation studies on Slurm, and analyse the "
        "per-token shards they write."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_spec(p):
        p.add_argument("spec", help="experiment spec (TOML)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a spec value, validated like the file (repeatable)")
        return p

    p = with_spec(sub.add_parser("expand", help="the runs a spec expands to"))
    p.add_argument("--json", action="store_true", help="machine-readable list of runs")
    p.add_argument("--force", action="store_true", help="allow more than launch.max_runs runs")
    p.set_defaults(func=cmd_expand)

    p = with_spec(sub.add_parser("plan", help="each run's micro-batches and the trainer memory a step needs"))
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length assumed for every rollout")
    p.add_argument("--model-config", help="the student's config.json, for a model the planner does not know")
    p.add_argument("--teacher-config", help="the teacher's config.json, likewise")
    p.set_defaults(func=cmd_plan)

    p = with_spec(sub.add_parser("render", help="the sbatch script(s) that would be submitted"))
    p.set_defaults(func=cmd_render)

    p = with_spec(sub.add_parser("submit", help="expand, write the manifest, submit one job array"))
    p.add_argument("--executor", choices=["slurm", "local", "debug"],
                   help="overrides launch.executor")
    p.add_argument("--dry-run", action="store_true", help="show what would be submitted; write nothing")
    p.add_argument("--force", action="store_true", help="allow more than launch.max_runs runs")
    p.add_argument("--wait", action="store_true", help="with slurm: wait for the array to finish")
    p.add_argument("--no-analyze", action="store_true", help="local: skip the analysis at the end")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="table of runs and their states")
    p.add_argument("run_dir", help="sweep directory: <output_dir>/<experiment.name>")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true",
                   help="refresh a table of steps, loss and eval reward until every run has ended (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="--watch's refresh period")
    p.add_argument("--once", action="store_true", help="print --watch's table once and exit")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resubmit", help="submit again the runs that failed or never ran")
    p.add_argument("run_dir", help="sweep directory: <output_dir>/<experiment.name>")
    p.add_argument("--failed", action="store_true",
                   help="only failed, lost or missing runs (default: every run not completed)")
    p.add_argument("--executor", choices=["slurm", "local", "debug"])
    p.set_defaults(func=cmd_resubmit)

    p = sub.add_parser("replay", help="recompute loss variants on a sweep's recorded tokens, side by side")
    p.add_argument("run_dir", help="sweep directory: <output_dir>/<experiment.name>")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="one variant: these train.* / mask.* keys changed (repeatable)")
    p.add_argument("--variant", action="append", metavar='"KEY=VALUE ..."',
                   help="another variant, its keys separated by spaces (repeatable)")
    p.add_argument("--run", action="append", metavar="RUN_ID", help="only these runs (repeatable)")
    p.add_argument("--top", type=int, default=10, help="tokens listed where each variant disagrees most")
    p.set_defaults(func=cmd_replay)

    p = with_spec(sub.add_parser("probe", help="lock/fork probing of a trained vs a base model (seed 001)"))
    p.set_defaults(func=cmd_probe)

    p = with_spec(sub.add_parser("loop", help="prompt optimization -> distillation -> evaluation rounds (seed 004)"))
    p.add_argument("--executor", choices=["slurm", "local", "debug"], help="for the distillation rounds")
    p.set_defaults(func=cmd_loop)

    p = sub.add_parser("analyze", help="tables, figures and report.md from a sweep's shards")
    p.add_argument("run_dir", help="sweep directory: <output_dir>/<experiment.name>")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
