"""The task every job runs: `python -m hpcdistill.worker RUN_DIR`.

It reads the run's resolved spec, assigns GPU roles from the allocation (rejecting a spec that
asks for more than the task has, before any model is loaded), runs the pipeline and records the
run's state in `status.json`. It is checkpointable: on submitit's preemption/timeout signal the
task is requeued with the same run directory, and the pipeline resumes from the last completed
step (every step's shard and checkpoint are written atomically, so nothing is done twice).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import socket
import sys
import time
from pathlib import Path

import submitit

from hpcdistill.errors import UserError
from hpcdistill.launch.gpus import assign_roles
from hpcdistill.launch.paths import RunPaths, read_json, write_json_atomic
from hpcdistill.spec.load import load_spec

log = logging.getLogger("hpcdistill.worker")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _set_status(paths: RunPaths, **fields) -> dict:
    status = read_json(paths.status) if paths.status.exists() else {}
    status.update(fields)
    write_json_atomic(paths.status, status)
    return status


def _attach_log(paths: RunPaths) -> logging.Handler:
    handler = logging.FileHandler(paths.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hpcdistill")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # In a submitted task nothing has configured logging: add stderr (submitit's log file). Under
    # `hpcdistill submit --executor debug` the CLI's root handler already prints.
    if not root.handlers[:-1] and not logging.getLogger().handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(handler.formatter)
        root.addHandler(stream)
    return handler


def _set_threads(spec) -> None:
    """torch's CPU threads = the CPUs this task was given (Slurm's, else launch.cpus_per_task)."""
    import torch

    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or spec.launch.cpus_per_task
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    log.info("torch uses %d CPU threads", torch.get_num_threads())


def run(run_dir: str | Path) -> dict:
    """Run (or resume) one run; returns its final status."""
    paths = RunPaths(Path(run_dir).absolute())
    handler = _attach_log(paths)
    try:
        previous = read_json(paths.status) if paths.status.exists() else {}
        if previous.get("state") == "completed":
            log.info("run %s is already completed; nothing to do", paths.run_id)
            return previous
        attempt = int(previous.get("attempts", 0)) + 1
        _set_status(paths, state="running", attempts=attempt, started=_now(), job_id=_job_id(),
                    host=socket.gethostname(), error=None)
        log.info("run %s: attempt %d on %s (job %s)", paths.run_id, attempt, socket.gethostname(),
                 _job_id())
        start = time.monotonic()
        try:
            spec = load_spec(paths.spec).spec
            _set_threads(spec)
            roles = assign_roles(spec.launch.gpus, os.environ)
            names = [*spec.launch.pass_env, *(spec.launch.container.pass_env if spec.launch.container else [])]
            # Which named variables reached the task (names and presence only, never values).
            _set_status(paths, roles={r: list(getattr(roles, r)) for r in ("rollout", "teacher", "trainer")},
                        env_passed={name: name in os.environ for name in names})
            from hpcdistill.train.loop import run_pipeline

            summary = run_pipeline(spec, paths, roles)
        except BaseException as exc:
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            _set_status(paths, state="interrupted" if interrupted else "failed",
                        error=f"{type(exc).__name__}: {exc}", ended=_now())
            if not interrupted:
                log.exception("run %s failed", paths.run_id)
            raise
        return _set_status(paths, state="completed", ended=_now(), summary=summary,
                           seconds=round(time.monotonic() - start, 3))
    finally:
        logging.getLogger("hpcdistill").removeHandler(handler)
        handler.close()


class WorkerTask(submitit.helpers.Checkpointable):
    """The callable submitit pickles for each task of the array.

    `Checkpointable.checkpoint` resubmits the same call (same run directory) on preemption or
    timeout; all progress lives in the run directory, so nothing else needs saving here.
    """

    def __call__(self, run_dir: str) -> dict:
        return run(run_dir)

    def checkpoint(self, run_dir: str) -> submitit.helpers.DelayedSubmission:
        paths = RunPaths(Path(run_dir))
        if paths.status.exists():
            _set_status(paths, state="requeued", ended=_now())
        log.info("run %s: checkpoint requested, requeueing", paths.run_id)
        return submitit.helpers.DelayedSubmission(WorkerTask(), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcdistill.worker",
                                     description="Run one hpcdistill run directory.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        run(args.run_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
