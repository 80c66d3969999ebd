"""Apptainer wrapping of a task's command.

A task runs `apptainer exec --nv --cleanenv --bind ... IMAGE python -u -m ...`. With --cleanenv the
host environment is dropped; a variable the spec names in `pass_env` is forwarded by exporting
`APPTAINERENV_<NAME>="$NAME"` in the job's shell, so the script carries the variable's name and
never its value.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from hpcdistill.spec.schema import ContainerSpec


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


def forward_env_lines(names: list[str], *, cleanenv: bool) -> list[str]:
    """Shell lines (in the job script, before the task) that forward variables by name only."""
    lines = []
    for name in names:
        if cleanenv:
            # ${NAME+x}: forward only if set in the submitting environment; the value stays there.
            lines.append(f'if [ -n "${{{name}+x}}" ]; then export APPTAINERENV_{name}="${{{name}}}"; fi')
    return lines


def python_command(container: ContainerSpec | None, *, binds: list[str | Path] = (),
                   python: str = "python3") -> str:
    """What submitit runs as `python`: plain, or wrapped in `apptainer exec`."""
    if container is None:
        return python
    return shlex.join(container_argv(container, binds=binds, python=python))
