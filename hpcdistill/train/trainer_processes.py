"""The trainer's ranks as processes: joining the process group inside a rank, and starting,
signalling and stopping the ranks from the Slurm task (`torch.distributed.run`: `--standalone` on
one node; on several, one agent per node meeting at the job's first node, `NodeRendezvous`).

The ranks are started in their own session (a signal to the task's group reaches them only through
`launch_trainer_processes`, which passes SIGTERM, SIGINT and SIGUSR2 on) but die with the process
that started them (PR_SET_PDEATHSIG), so a task killed outright leaves no ranks behind. See
docs/trainer.md; the trainers themselves are `train.distributed`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hpcdistill.errors import LaunchError

log = logging.getLogger(__name__)

RDZV_HOST_ENV = "HPCDISTILL_RDZV_HOST"  # overrides the job's first node (a test: 127.0.0.1)
RDZV_PORT_ENV = "HPCDISTILL_RDZV_PORT"  # overrides the port derived from the job id


@dataclass(frozen=True)
class NodeRendezvous:
    """Where the torchrun agents of a several-node job meet: node 0's agent serves the store at
    `host:port` and every agent knows it without talking to the others (host: the job's first
    node; port: from the job id). torchrun's static rendezvous, not c10d: c10d ignores
    --node_rank and orders agents by host name and pid, but global rank 0 (shards, status, the
    vLLM server) must be on node 0, whose task holds the run's bookkeeping and rollout GPUs."""

    nnodes: int
    node_rank: int
    host: str
    port: int
    job_id: str

    @classmethod
    def from_environ(cls, nnodes: int, environ: Mapping[str, str]) -> "NodeRendezvous":
        """From what Slurm sets in each task of a job of `nnodes` nodes, one task per node
        (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID, SLURM_JOB_NODELIST), and the overrides."""
        missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST")
                   if not environ.get(k)]
        if missing:
            raise LaunchError(f"key 'launch.nodes': is {nnodes}, but this task has no {', '.join(missing)}: "
                              f"several nodes run as a Slurm job (launch.executor = 'slurm')")
        if int(environ["SLURM_NNODES"]) != nnodes:
            raise LaunchError(f"key 'launch.nodes': is {nnodes}, but the job has {environ['SLURM_NNODES']} "
                              "nodes (SLURM_NNODES); submit with `hpcdistill submit`, which asks for launch.nodes")
        job_id = environ["SLURM_JOB_ID"]
        port = int(environ.get(RDZV_PORT_ENV) or rendezvous_port(job_id))
        host = environ.get(RDZV_HOST_ENV) or first_host(environ["SLURM_JOB_NODELIST"])
        return cls(nnodes, int(environ["SLURM_NODEID"]), host, port, job_id)


def rendezvous_port(job_id: str) -> int:
    """29500..49499, the same on every node of the job; two jobs sharing a first node differ
    unless their ids are 20,000 apart (then set HPCDISTILL_RDZV_PORT)."""
    return 29500 + int(job_id) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[003-004,007]" -> "gpu003"): node 0 of the job,
    as `scontrol show hostnames` orders them. submitit's parser (what its
    `JobEnvironment().hostnames` returns; private, submitit is pinned <1.6) needs no Slurm config."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)[0]


def torchrun_args(nproc: int, rendezvous: NodeRendezvous | None = None) -> list[str]:
    """torch.distributed.run's options: `nproc` ranks on this node, alone (--standalone takes a
    free port, so tasks sharing a node never collide) or as node `node_rank` of a rendezvous;
    ranks are then node_rank * nproc + local rank."""
    if rendezvous is None:
        where = ["--standalone", "--nnodes=1"]
    else:
        r = rendezvous
        where = [f"--nnodes={r.nnodes}", f"--node_rank={r.node_rank}", "--rdzv_backend=static",
                 f"--rdzv_endpoint={r.host}:{r.port}", f"--rdzv_id={r.job_id}"]
    return [*where, f"--nproc_per_node={nproc}", "--max_restarts=0"]


def in_trainer_process() -> bool:
    """True inside a rank started by torch.distributed.run (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group() -> torch.device:
    """Join the ranks' process group (nccl on GPUs, gloo on the CPU); returns this rank's device."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=30))
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def launch_trainer_processes(argv: Sequence[str], devices: Sequence[str], nproc: int,
                             env: dict[str, str] | None = None, grace_s: float = 30.0,
                             received: list[int] | None = None,
                             rendezvous: NodeRendezvous | None = None) -> int:
    """Run `python <argv...>` as `nproc` ranks inside this task; returns the ranks' exit status.

    argv: what follows `python`, e.g. ["-m", "hpcdistill.worker", run_dir]. devices: the trainer
    role's GPU ids (`RoleDevices.trainer`), or () on the CPU (gloo, DS_ACCELERATOR=cpu). SIGTERM,
    SIGINT and SIGUSR2 (Slurm's preemption signal) are passed on to the ranks, which are killed
    if they have not ended `grace_s` later; the caller then handles the signal as usual.
    `received`: a list that gets the signals passed on (a caller's handler may return, as
    submitit's does for SIGTERM: the caller then knows the ranks were stopped, not failed).
    `rendezvous`: this task's node of a several-node job (every node's task calls this), or None.
    """
    environ = dict(os.environ if env is None else env)
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if not devices:
        environ["DS_ACCELERATOR"] = "cpu"
    environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, rendezvous), *argv]
    log.info("starting %d trainer ranks on %s: %s", nproc, ",".join(devices) or "cpu", " ".join(cmd))
    # Own session (a signal to this task's group reaches the ranks only through `forward`), but
    # killed with this process: a task killed outright (SIGKILL, a lost node) leaves no ranks.
    proc = subprocess.Popen(cmd, env=environ, start_new_session=True, preexec_fn=_kill_when_parent_dies())
    received = [] if received is None else received

    def forward(signum, _frame):
        received.append(signum)
        _stop(proc, grace_s)

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
    previous = {}
    if _main_thread():
        previous = {s: signal.signal(s, forward) for s in watched}
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc, grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
    for signum in received:  # let the caller's own handling (submitit's requeue) run
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)
    return code


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to torchrun (it stops its ranks), then SIGKILL to it and its ranks after grace_s.

    torchrun starts each rank in its own session, so killing torchrun's group alone would leave
    the ranks running: they are found through /proc.
    """
    ranks = process_tree(proc.pid)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        for pid in [*ranks, *process_tree(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    except ProcessLookupError:
        pass


def process_tree(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += children.get(child, [])
    return out


def _kill_when_parent_dies() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the process that started it dies (Linux)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    return lambda: prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Inside a rank: SIGKILL when torchrun dies (it starts each rank in its own session, so
    nothing else stops a rank whose torchrun was killed outright)."""
    parent = os.getppid()
    _kill_when_parent_dies()()
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


__all__ = ["in_trainer_process", "init_process_group", "launch_trainer_processes", "process_tree",
           "die_with_parent", "NodeRendezvous", "rendezvous_port", "first_host", "torchrun_args"]
