"""GPU roles: split the task's allocation into rollout (vLLM), teacher and trainer devices.

The allocation is read, in order, from CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE (Slurm sets
it without CUDA_VISIBLE_DEVICES when GPUs are not real CUDA devices, as on the local test
cluster), else none (CPU: all roles share one process). A spec asking for more GPUs than the
allocation has is rejected before any model is loaded.
"""

from __future__ import annotations

from typing import Mapping

from hpcdistill.devices import ROLES, RoleDevices
from hpcdistill.errors import LaunchError
from hpcdistill.spec.schema import GpuSpec



def allocated_devices(environ: Mapping[str, str]) -> tuple[str, ...]:
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1", "NoDevFiles"):
        return tuple(d.strip() for d in visible.split(",") if d.strip())
    count = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if count.isdigit():
        return tuple(str(i) for i in range(int(count)))
    return ()


def assign_roles(gpus: GpuSpec, environ: Mapping[str, str]) -> RoleDevices:
    """Give each role its own slice of the allocation, in the order rollout, teacher, trainer."""
    wanted = {role: getattr(gpus, role) for role in ROLES}
    total = sum(wanted.values())
    devices = allocated_devices(environ)
    if total == 0:
        return RoleDevices((), (), ())
    if total > len(devices):
        source = ("CUDA_VISIBLE_DEVICES" if environ.get("CUDA_VISIBLE_DEVICES") else
                  "SLURM_GPUS_ON_NODE" if environ.get("SLURM_GPUS_ON_NODE") else "no GPU variable set")
        raise LaunchError(
            f"key 'launch.gpus': the spec asks for {total} GPUs "
            f"({', '.join(f'{r} = {n}' for r, n in wanted.items())}) but the task's allocation has "
            f"{len(devices)} ({source}); lower launch.gpus or request more GPUs")
    out, start = {}, 0
    for role in ROLES:
        out[role] = devices[start:start + wanted[role]]
        start += wanted[role]
    return RoleDevices(**out)
