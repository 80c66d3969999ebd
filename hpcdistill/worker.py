"""The task every job runs: `python -m hpcdistill.worker RUN_DIR`.

It reads the run's resolved spec, assigns GPU roles from the allocation (rejecting a spec that
asks for more than the task has, before any model is loaded), runs the pipeline and records the
run's state in `status.json`. It is checkpointable: on submitit's preemption/timeout signal the
task is requeued with the same run directory, and the pipeline resumes from the last completed
step (every step's shard and checkpoint are written atomically, so nothing is done twice).

With `trainer.strategy = "deepspeed"` or `"fsdp"` the task's process starts the trainer ranks
(`train.trainer_processes.launch_trainer_processes`: one per trainer GPU, `trainer.nproc` on the CPU),
each running this same module; the ranks run the pipeline and rank 0 writes the shards, the
checkpoint metadata, the model and its summary into status.json; the task's process records the
outcome. Signals reach the ranks through the launcher. With `launch.nodes > 1` the job has one
task per node: each starts its node's ranks, and only node 0's records the run (docs/trainer.md,
"Several nodes").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import submitit

from hpcdistill.errors import UserError
from hpcdistill.devices import RoleDevices
from hpcdistill.launch.gpus import assign_roles
from hpcdistill.rundir import RunPaths, read_json, write_json_atomic
from hpcdistill.spec.load import load_spec

log = logging.getLogger("hpcdistill.worker")
# Set by WorkerTask.checkpoint (submitit's preemption handler). submitit then leaves with
# sys.exit from inside the signal handler; if the signal landed in a weakref callback (torch's
# checkpointed chunks make many), Python swallows that SystemExit and the task would train on
# beside its requeued successor: the loop stops at its next step instead.
_REQUEUED = threading.Event()

ROLES_ENV = "HPCDISTILL_ROLES"  # the task's GPU roles, as JSON, handed to the trainer ranks


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


def _attach_log(paths: RunPaths, rank: int | None = None) -> logging.Handler:
    handler = logging.FileHandler(paths.log)
    where = "" if rank is None else f" rank{rank}"
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s"))
    handler.setLevel(logging.INFO if not rank else logging.WARNING)  # rank 0 speaks for the ranks
    root = logging.getLogger("hpcdistill")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # In a submitted task nothing has configured logging: add stderr (submitit's log file). Under
    # `hpcdistill submit --executor debug` the CLI's root handler already prints.
    if not root.handlers[:-1] and not logging.getLogger().handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(handler.formatter)
        stream.setLevel(handler.level)
        root.addHandler(stream)
    return handler


def _task_cpus(spec) -> int | None:
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or spec.launch.cpus_per_task
    return int(cpus) if cpus else None


def _set_threads(spec, ranks: int = 1) -> None:
    """torch's CPU threads = the CPUs this task was given (Slurm's, else launch.cpus_per_task),
    shared by the task's trainer ranks."""
    import torch

    cpus = _task_cpus(spec) or (len(os.sched_getaffinity(0)) if ranks > 1 else None)
    if cpus:
        torch.set_num_threads(max(1, cpus // ranks))
    log.info("torch uses %d CPU threads", torch.get_num_threads())


def _launch_node_ranks(spec, paths: RunPaths, roles: RoleDevices, nproc: int, received: list[int]) -> int:
    """Start this node's `nproc` trainer ranks over the trainer role's devices; their exit status.
    Under launch.nodes > 1 every node's task calls this, and the agents meet at node 0's."""
    from hpcdistill.train.trainer_processes import NodeRendezvous, launch_trainer_processes

    env = dict(os.environ, **{ROLES_ENV: json.dumps({r: list(getattr(roles, r)) for r in
                                                     ("rollout", "teacher", "trainer")})})
    if _task_cpus(spec):
        env["OMP_NUM_THREADS"] = str(max(1, _task_cpus(spec) // nproc))
    rendezvous = NodeRendezvous.from_environ(spec.launch.nodes, os.environ) if spec.launch.nodes > 1 else None
    return launch_trainer_processes(["-m", "hpcdistill.worker", str(paths.root)], roles.trainer, nproc,
                                    env=env, received=received, rendezvous=rendezvous)


def _run_trainer_ranks(spec, paths: RunPaths, roles: RoleDevices) -> dict:
    """Start the trainer ranks (node 0's, under launch.nodes > 1); rank 0's summary, or an error."""
    from hpcdistill.train.distributed import TrainerConfig, trainer_nproc

    nproc = trainer_nproc(TrainerConfig.from_spec(spec), roles.trainer)
    ranks = nproc * spec.launch.nodes
    nodes = {"nodes": spec.launch.nodes} if spec.launch.nodes > 1 else {}
    _set_status(paths, summary=None, trainer={"strategy": spec.trainer.strategy, "ranks": ranks, **nodes})
    received: list[int] = []
    code = _launch_node_ranks(spec, paths, roles, nproc, received)
    status = read_json(paths.status)
    if code == 0 and status.get("summary") is not None:
        return status["summary"]
    if received:  # our handler returned (submitit bypasses SIGTERM): the run was stopped, not failed
        raise SystemExit(f"trainer ranks stopped by signal {', '.join(str(s) for s in received)}")
    raise RuntimeError(f"the {ranks} trainer ranks exited with status {code}: "
                       f"{status.get('error') or 'see ' + str(paths.log)}")


def _node(paths: RunPaths) -> int:
    """This task's node of a several-node run (SLURM_NODEID, when the run asks for launch.nodes > 1),
    else 0. One task per node: node 0's records the run, the others only run their ranks."""
    node = int(os.environ.get("SLURM_NODEID") or 0)
    return node if node and load_spec(paths.spec).spec.launch.nodes > 1 else 0


def _run_other_node(paths: RunPaths, node: int) -> dict:
    """Node 1.. of a several-node run: this node's trainer ranks, nothing else. Node 0's task
    records the run's state; global rank 0, on node 0, writes the shards and the summary."""
    from hpcdistill.train.distributed import TrainerConfig, trainer_nproc

    spec = load_spec(paths.spec).spec
    done = paths.status.exists() and read_json(paths.status).get("state") == "completed"
    if done or spec.train.steps == 0:  # node 0 starts no ranks either
        return {"node": node, "ranks": 0}
    roles = assign_roles(spec.launch.gpus, os.environ)
    nproc = trainer_nproc(TrainerConfig.from_spec(spec), roles.trainer)
    received: list[int] = []
    code = _launch_node_ranks(spec, paths, roles, nproc, received)
    if received:
        raise SystemExit(f"node {node}'s trainer ranks stopped by signal {', '.join(str(s) for s in received)}")
    if code != 0:
        raise RuntimeError(f"node {node}'s {nproc} trainer ranks exited with status {code}; see {paths.log} "
                           "and node 0's log")
    return {"node": node, "ranks": nproc}


def _roles_of_task(spec) -> RoleDevices:
    """Inside a rank: the task's roles as its process assigned them (the rank itself sees only
    the trainer GPUs in CUDA_VISIBLE_DEVICES)."""
    if ROLES_ENV not in os.environ:  # a rank started by hand under torchrun
        return assign_roles(spec.launch.gpus, os.environ)
    return RoleDevices(**{role: tuple(ids) for role, ids in json.loads(os.environ[ROLES_ENV]).items()})


def _run_rank(paths: RunPaths) -> dict:
    """Inside one trainer rank: join the group, run the pipeline; rank 0 records the summary."""
    import torch.distributed as dist

    from hpcdistill.train.trainer_processes import die_with_parent, init_process_group

    die_with_parent()
    init_process_group()
    rank = dist.get_rank()
    handler = _attach_log(paths, rank)
    try:
        spec = load_spec(paths.spec).spec
        _set_threads(spec, ranks=int(os.environ["LOCAL_WORLD_SIZE"]))  # this node's ranks share its CPUs
        roles = _roles_of_task(spec)
        from hpcdistill.train.loop import run_training

        summary = run_training(spec, paths, roles)
        if rank == 0:
            _set_status(paths, summary=summary)
        return summary
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            log.exception("run %s failed in rank %d", paths.run_id, rank)
            if rank == 0:
                _set_status(paths, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        logging.getLogger("hpcdistill").removeHandler(handler)
        handler.close()


def _drop_resume_state(paths: RunPaths) -> None:
    """A completed run never resumes: its trainer checkpoint (weights + AdamW state, ~12 bytes a
    parameter) and the rollout engine's copy of the weights are removed; the shards stay, and
    the final model too when train.save_model asked for it."""
    import shutil

    for leftover in paths.resume_state:
        shutil.rmtree(leftover, ignore_errors=True)


def requeue_raced(exc: BaseException) -> bool:
    """True for the `scontrol requeue` of submitit's preemption handler killed by a signal: Slurm
    signals a job it requeues, and under load the signal can reach scontrol before it exits."""
    import subprocess

    return (isinstance(exc, subprocess.CalledProcessError) and exc.returncode < 0
            and list(exc.cmd)[:2] == ["scontrol", "requeue"])


def run(run_dir: str | Path) -> dict:
    """Run (or resume) one run; returns its final status."""
    paths = RunPaths(Path(run_dir).absolute())
    from hpcdistill.train.trainer_processes import in_trainer_process

    if in_trainer_process():
        return _run_rank(paths)
    node = _node(paths)
    if node:
        return _run_other_node(paths, node)
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
            if spec.trainer.strategy != "single" and spec.train.steps > 0:
                summary = _run_trainer_ranks(spec, paths, roles)
            else:
                from hpcdistill.train.loop import run_training

                summary = run_training(spec, paths, roles, should_stop=_REQUEUED.is_set)
        except BaseException as exc:
            if requeue_raced(exc):
                # submitit's preemption handler ran `scontrol requeue`, and Slurm, having accepted the
                # requeue, signalled the job's processes before that scontrol exited: the requeue
                # went through. Leave as a preempted task does (no failure recorded for submitit).
                _set_status(paths, state="requeued", ended=_now())
                log.warning("run %s: requeued (scontrol was stopped by the requeue it asked for)", paths.run_id)
                sys.exit(-1)
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            _set_status(paths, state="interrupted" if interrupted else "failed",
                        error=f"{type(exc).__name__}: {exc}", ended=_now())
            if not interrupted:
                log.exception("run %s failed", paths.run_id)
            raise
        status = _set_status(paths, state="completed", ended=_now(), summary=summary,
                             seconds=round(time.monotonic() - start, 3))
        _drop_resume_state(paths)
        return status
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
        _REQUEUED.set()
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
