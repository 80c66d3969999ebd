"""The state of every run of a sweep, from the run directories, squeue and (when it answers) sacct.

Without Slurm accounting `sacct` fails (the local test cluster has none); the run directories'
`status.json`, written by the worker, and `squeue` are then enough: a run is completed or failed
by its own record, pending/running while its job is queued, and missing otherwise.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from hpcdistill.errors import LaunchError
from hpcdistill.rundir import SweepPaths
from hpcdistill.launch.submit import load_manifest, run_state

FINISHED_SACCT = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                  "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    seed: int
    overrides: dict
    state: str
    job_id: str | None
    shards: list[Path]


def sweep_from_dir(path: str | Path) -> SweepPaths:
    sweep = SweepPaths(Path(path).absolute())
    if not sweep.manifest.exists():
        raise LaunchError(f"{path}: not a sweep directory (no {sweep.manifest.name}); give the directory "
                          "`submit` printed, <output_dir>/<experiment.name>")
    return sweep


def squeue_states() -> dict[str, str]:
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower()
    return states


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Final states from Slurm accounting, or {} when sacct does not answer."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job.strip()] = state.split()[0].upper() if state.strip() else ""
    return states


def sweep_status(path: str | Path) -> list[RunStatus]:
    sweep = sweep_from_dir(path)
    manifest = load_manifest(sweep)
    queued = squeue_states()
    records = manifest.get("runs", {})
    accounting = sacct_states([r["job_id"] for r in records.values()
                               if r.get("executor") == "slurm" and r.get("job_id")])
    out = []
    for run_id, record in records.items():
        paths = sweep.run(run_id)
        state = run_state(paths)
        job_id = record.get("job_id")
        if state not in ("completed", "failed") and job_id in queued:
            state = queued[job_id]
        elif state in ("missing", "running", "requeued", "interrupted") and job_id in accounting \
                and accounting[job_id] in FINISHED_SACCT - {"COMPLETED"}:
            state = accounting[job_id].lower()
        elif state in ("running", "requeued") and record.get("executor") == "slurm" and queued \
                and job_id not in queued:
            state = "lost"  # recorded running, but its job is gone: killed without a trace
        shards = sorted(paths.shards.glob("step_*.h5")) if paths.shards.exists() else []
        out.append(RunStatus(run_id, record.get("seed", 0), record.get("overrides", {}), state,
                             job_id, shards))
    return out


NEEDS_RERUN = {"failed", "missing", "lost", "interrupted", "unknown", "cancelled", "timeout",
               "out_of_memory", "node_fail", "boot_fail", "deadline", "preempted"}
