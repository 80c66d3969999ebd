"""Apptainer wrapping of a task's command.

A task runs `apptainer exec --nv --cleanenv --bind ... IMAGE python -u -m ...`. With --cleanenv
the host environment is dropped inside the container, including what submitit and the worker
need (SLURM_*, SUBMITIT_*, CUDA_VISIBLE_DEVICES). So the command is wrapped in a small `bash -c`
that runs inside the srun step (where those variables have their step values) and re-exports
them, and every variable the spec names in `pass_env`, as `APPTAINERENV_<NAME>`, which Apptainer
passes into the container. The script therefore carries variable names only, never values.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from hpcdistill.spec.schema import ContainerSpec

# Variables the task itself needs inside a --cleanenv container, forwarded by prefix or name.
FORWARDED_PREFIXES = ("SLURM_", "SUBMITIT_")
FORWARDED_NAMES = ("CUDA_VISIBLE_DEVICES", "HPCDISTILL_CACHE", "HF_HOME", "HF_HUB_OFFLINE")


def container_argv(container: ContainerSpec, *, binds: list[str | Path] = (), python: str = "python3"
                   ) -> list[str]:
    """The argv prefix that replaces `python` for a containerised task."""
    argv = ["apptainer", "exec"]
    if container.nv:
        argv.append("--nv")
    if container.cleanenv:
        argv.append("--cleanenv")
    for bind in [*container.binds, *map(str, binds)]:
        argv += ["--bind", str(bind)]
    argv += list(container.extra_args)
    argv += [container.image, python]
    return argv


def forward_env_script(names: list[str]) -> str:
    """Bash that exports APPTAINERENV_<NAME> for the task's variables and `names`, if set."""
    prefixes = "|".join(FORWARDED_PREFIXES)
    listed = " ".join([*FORWARDED_NAMES, *names])
    return (f'for v in $(compgen -e | grep -E "^({prefixes})") {listed}; do '
            f'if [ -n "${{!v+x}}" ]; then export "APPTAINERENV_$v=${{!v}}"; fi; done')


def python_command(container: ContainerSpec | None, *, binds: list[str | Path] = (),
                   python: str = "python3", pass_env: list[str] = ()) -> str:
    """What submitit runs as `python`: plain, or wrapped in `apptainer exec`.

    submitit appends `-u -m submitit.core._submit FOLDER`; in the wrapped form these arrive as
    "$@" of the `bash -c` script.
    """
    if container is None:
        return python
    argv = shlex.join(container_argv(container, binds=binds, python=python))
    if not container.cleanenv:
        return argv
    names = list(dict.fromkeys([*pass_env, *container.pass_env]))
    script = f'{forward_env_script(names)}; exec {argv} "$@"'
    return f"bash -c {shlex.quote(script)} hpcdistill-task"
