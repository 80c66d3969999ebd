"""Submitting a sweep: run directories, the manifest, and one submitit job array per sweep.

The executors are submitit's (SlurmExecutor, LocalExecutor, DebugExecutor); this module only
chooses one, fills its parameters from `[launch]`, and records what was submitted. Every task runs
`hpcdistill.worker.WorkerTask(run_dir)`, which is what `python -m hpcdistill.worker RUN_DIR` runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

import hpcdistill
from hpcdistill.errors import LaunchError
from hpcdistill.launch.container import python_command
from hpcdistill.rundir import RunPaths, SweepPaths, read_json, read_manifest, write_atomic, write_json_atomic
from hpcdistill.spec.command_rules import check_tracking_installed
from hpcdistill.spec.load import LoadedSpec
from hpcdistill.spec.schema import LaunchSpec, Spec
from hpcdistill.spec.sweep import Run, expand

log = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local", "debug")


@dataclass
class Submission:
    """What one `submit` call did."""

    sweep: SweepPaths
    runs: list[Run]
    submitted: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)  # completed or already queued
    array_ids: list[str] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)  # submitit jobs, in the order of `submitted`


# ---------------------------------------------------------------------------- versions


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout hpcdistill runs from, when it is one."""
    where = path or Path(hpcdistill.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ---------------------------------------------------------------------------- slurm parameters


def time_minutes(text: str) -> int:
    """Slurm time formats ("MM", "HH:MM:SS", "D-HH:MM:SS", "MM:SS") -> whole minutes (>= 1)."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if days and len(parts) == 1:
        h, m, s = parts[0], 0, 0
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        h, m, s = parts
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def slurm_parameters(launch: LaunchSpec, job_name: str, run_root: Path) -> dict[str, Any]:
    """The SlurmExecutor parameters for `[launch]` (submitit validates them at this point)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": time_minutes(launch.time),
        "array_parallelism": launch.array_parallelism,
        "signal_delay_s": 120,
        "stderr_to_stdout": True,
    }
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if getattr(launch, key) is not None:
            params[key] = getattr(launch, key)
    if launch.mem_gb is not None:
        params["mem"] = f"{int(launch.mem_gb * 1024)}M"
    total_gpus = launch.gpus.rollout + launch.gpus.teacher + launch.gpus.trainer
    if total_gpus:
        params["gpus_per_node"] = total_gpus
    if launch.nodes > 1:  # one task per node, each starting its node's trainer ranks (node_layout)
        params.update(nodes=launch.nodes, ntasks_per_node=1)
    if launch.setup:
        params["setup"] = list(launch.setup)
    if launch.slurm_extra:
        params["additional_parameters"] = dict(launch.slurm_extra)
    return params


def node_layout(spec: Spec) -> list[str]:
    """The roles on each node of a several-node run, as comment lines (`hpcdistill render`).

    Every node gets the same allocation (`--gpus-per-node` is per node) and splits it as one node
    does (rollout, teacher, trainer); rollout and teacher run on node 0 only, so their GPUs on
    the other nodes stay idle. Node k's n trainer devices hold ranks k*n .. k*n+n-1."""
    gpus, nodes = spec.launch.gpus, spec.launch.nodes
    per_node = gpus.trainer or spec.trainer.nproc  # trainer_nproc: one rank per GPU, else trainer.nproc

    def ids(start: int, count: int) -> str:
        return ",".join(str(i) for i in range(start, start + count))

    trainer = f"trainer GPUs {ids(gpus.rollout + gpus.teacher, gpus.trainer)}" if gpus.trainer else "trainer on the CPU"
    node0 = [f"{role} GPUs {ids(start, count)}" for role, start, count in
             (("rollout", 0, gpus.rollout), ("teacher", gpus.rollout, gpus.teacher)) if count]
    idle = f"; GPUs {ids(0, gpus.rollout + gpus.teacher)} idle" if gpus.rollout + gpus.teacher else ""
    lines = [f"# launch.nodes = {nodes}: one task per node, each with {gpus.rollout + gpus.teacher + gpus.trainer} "
             f"GPUs (Slurm allocates the same on every node); {per_node * nodes} {spec.trainer.strategy} "
             f"trainer ranks, {per_node} per node",
             f"#   node 0: {', '.join([*node0, trainer])} (ranks {ids(0, per_node)}); records the run"]
    lines += [f"#   node {k}: {trainer} (ranks {ids(k * per_node, per_node)}){idle}" for k in range(1, nodes)]
    return lines


def task_python(launch: LaunchSpec, run_root: Path) -> str:
    binds = [run_root] if launch.container is not None else []
    return python_command(launch.container, binds=binds, pass_env=list(launch.pass_env),
                          python="python3" if launch.container else _current_python())


def _current_python() -> str:
    import shlex
    import sys

    return shlex.quote(sys.executable)


def make_executor(kind: str, launch: LaunchSpec, sweep: SweepPaths, job_name: str):
    if kind not in EXECUTORS:
        raise LaunchError(f"--executor {kind!r}: allowed: {', '.join(EXECUTORS)}")
    if launch.nodes > 1 and kind != "slurm":  # the spec's own executor was checked when it loaded
        raise LaunchError(f"--executor {kind!r}: launch.nodes = {launch.nodes} needs the slurm executor "
                          "(several nodes are a Slurm job); use --executor slurm or launch.nodes = 1")
    folder = sweep.logs / "%j"
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise LaunchError("executor 'slurm': sbatch is not on PATH; use --executor local, or "
                              "run on a Slurm login node")
        executor = submitit.SlurmExecutor(folder=folder, python=task_python(launch, sweep.root))
        try:
            executor.update_parameters(**slurm_parameters(launch, job_name, sweep.root))
        except ValueError as exc:  # submitit lists the allowed parameters
            raise LaunchError(f"key 'launch.slurm_extra' or '[launch]': {exc}") from None
        return executor
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder, python=task_python(launch, sweep.root))
        executor.update_parameters(timeout_min=time_minutes(launch.time))
        return executor
    return submitit.DebugExecutor(folder=folder)


def max_array_size(launch: LaunchSpec) -> int:
    """The cluster's MaxArraySize (the largest array has that many tasks, indices 0..N-1)."""
    if launch.max_array_size is not None:
        return launch.max_array_size
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else 1001  # Slurm's default


def render_script(loaded: LoadedSpec, runs: list[Run] | None = None) -> list[str]:
    """The sbatch script(s) `submit --executor slurm` would write, one per array."""
    runs = runs if runs is not None else expand(loaded)
    spec = loaded.spec
    sweep = SweepPaths.for_spec(spec.experiment.output_dir, spec.experiment.name)
    executor = submitit.SlurmExecutor(folder=sweep.logs / "%j", python=task_python(spec.launch, sweep.root))
    executor.update_parameters(**slurm_parameters(spec.launch, spec.experiment.name, sweep.root))
    scripts = []
    for chunk in _chunks(runs, max_array_size(spec.launch) if shutil.which("scontrol") else
                         (spec.launch.max_array_size or 1001)):
        executor.parameters["map_count"] = len(chunk)
        # submitit has no public call for the script text: this is the hook its own submit flow
        # calls (pinned <1.6 in pyproject.toml; the Slurm e2e test compares with a real submission)
        scripts.append(executor._make_submission_file_text(executor._submitit_command_str, "render"))
    return scripts


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------- manifest


load_manifest = read_manifest  # the manifest reader lives with the layout (hpcdistill.rundir)


def _update_manifest(sweep: SweepPaths, loaded: LoadedSpec, runs: list[Run], entry: dict | None) -> dict:
    manifest = load_manifest(sweep)
    manifest.setdefault("created", _now())
    manifest.update({
        "name": loaded.spec.experiment.name,
        "spec_path": str(loaded.path),
        "spec_text": loaded.text,
        "spec_hash": loaded.spec_hash,
        "package_version": hpcdistill.__version__,
        "git_commit": git_commit(),
    })
    known = manifest.setdefault("runs", {})
    for run in runs:
        known.setdefault(run.run_id, {"seed": run.seed, "overrides": run.overrides})
    if entry is not None:
        manifest.setdefault("submissions", []).append(entry)
        for array in entry["arrays"]:
            for task_index, run_id in enumerate(array["run_ids"]):
                known[run_id]["job_id"] = f"{array['job_id']}_{task_index}" if entry["executor"] == "slurm" \
                    else array["job_ids"][task_index]
                known[run_id]["executor"] = entry["executor"]
    write_json_atomic(sweep.manifest, manifest)
    return manifest


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- run directories


def prepare_run_dir(sweep: SweepPaths, run: Run, spec_hash: str) -> RunPaths:
    paths = sweep.run(run.run_id)
    paths.root.mkdir(parents=True, exist_ok=True)
    text = run.spec_text()
    if not paths.spec.exists() or paths.spec.read_text() != text:
        write_atomic(paths.spec, text)
    write_json_atomic(paths.run_json, {"run_id": run.run_id, "seed": run.seed,
                                       "overrides": run.overrides, "sweep_spec_hash": spec_hash})
    return paths


def run_state(paths: RunPaths) -> str:
    """State recorded by the worker: missing (never started), running, completed, failed, ..."""
    if not paths.status.exists():
        return "missing"
    try:
        return read_json(paths.status).get("state", "unknown")
    except (ValueError, OSError):
        return "unknown"


# ---------------------------------------------------------------------------- submit


def submit(loaded: LoadedSpec, *, executor: str | None = None, runs: list[Run] | None = None,
           force: bool = False, wait: bool | None = None, only: set[str] | None = None) -> Submission:
    """Create run directories, update the manifest and submit the runs that are not done.

    `only`: restrict to these run ids (resubmit). Local and debug executors wait for the runs
    (the machine is the cluster); slurm returns once the array is queued unless `wait`.
    """
    spec = loaded.spec
    check_tracking_installed(loaded)  # before anything is written
    kind = executor or spec.launch.executor
    runs = runs if runs is not None else expand(loaded, force=force)
    sweep = SweepPaths.for_spec(spec.experiment.output_dir, spec.experiment.name)
    result = Submission(sweep=sweep, runs=runs)

    queued = queued_job_ids() if kind == "slurm" else set()
    manifest = load_manifest(sweep)
    for run in runs:
        state = run_state(sweep.run(run.run_id))
        job_id = manifest.get("runs", {}).get(run.run_id, {}).get("job_id")
        if only is not None and run.run_id not in only:
            result.skipped.append(run)
        elif state == "completed" or (job_id and _base_job(job_id) in queued):
            result.skipped.append(run)
        else:
            result.submitted.append(run)
    for name in [*spec.launch.pass_env, *(spec.launch.container.pass_env if spec.launch.container else [])]:
        if name not in os.environ:
            log.warning("launch.pass_env names %s, which is not set in this environment", name)

    sweep.root.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep.spec, loaded.text)
    if not result.submitted:
        _update_manifest(sweep, loaded, runs, None)
        return result
    run_dirs = [str(prepare_run_dir(sweep, run, loaded.spec_hash).root) for run in result.submitted]
    _update_manifest(sweep, loaded, runs, None)

    from hpcdistill.worker import WorkerTask  # the callable each task runs

    ex = make_executor(kind, spec.launch, sweep, spec.experiment.name)
    entry: dict[str, Any] = {"time": _now(), "executor": kind, "arrays": []}
    if kind == "slurm":
        for chunk_runs, chunk_dirs in zip(_chunks(result.submitted, max_array_size(spec.launch)),
                                          _chunks(run_dirs, max_array_size(spec.launch))):
            try:
                jobs = ex.map_array(WorkerTask(), chunk_dirs)
            except subprocess.CalledProcessError as exc:
                raise LaunchError(f"sbatch failed: {exc.output.decode() if exc.output else exc}") from None
            array_id = jobs[0].job_id.split("_")[0]
            result.array_ids.append(array_id)
            result.jobs.extend(jobs)
            entry["arrays"].append({"job_id": array_id, "run_ids": [r.run_id for r in chunk_runs]})
        _update_manifest(sweep, loaded, runs, entry)
        if wait:
            wait_for_arrays(result.array_ids)
        return result

    # local / debug: this machine is the cluster; run `array_parallelism` tasks at a time.
    width = 1 if kind == "debug" else spec.launch.array_parallelism
    for chunk_runs, chunk_dirs in zip(_chunks(result.submitted, width), _chunks(run_dirs, width)):
        jobs = [ex.submit(WorkerTask(), d) for d in chunk_dirs]
        entry["arrays"].append({"job_id": jobs[0].job_id, "job_ids": [j.job_id for j in jobs],
                                "run_ids": [r.run_id for r in chunk_runs]})
        _update_manifest(sweep, loaded, runs, {**entry, "arrays": [entry["arrays"][-1]]})
        result.jobs.extend(jobs)
        if wait is not False:
            for job in jobs:
                _wait(job)
    return result


def _wait(job) -> None:
    try:
        job.result()
    except Exception as exc:  # the run's own status.json and log hold the details
        log.error("job %s failed: %s", job.job_id, str(exc).strip().splitlines()[-1] if str(exc) else exc)


def wait_for_arrays(array_ids: list[str], poll_s: float = 2.0) -> None:
    """Block until no task of these arrays is in squeue (pending, running or requeued).

    Polls squeue rather than submitit's job.result(): without Slurm accounting submitit cannot
    tell a task that died without a result from one still running, and would wait forever.
    """
    import time

    wanted = set(array_ids)
    while True:
        queued = {j.split("_")[0] for j in queued_job_ids()}
        if not queued & wanted:
            return
        time.sleep(poll_s)


def _base_job(job_id: str) -> str:
    return str(job_id)


def queued_job_ids() -> set[str]:
    """Job ids in squeue (array tasks as ARRAYID_TASK), or empty when squeue is unavailable."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.strip() for line in out.stdout.splitlines() if line.strip()} if out.returncode == 0 else set()
