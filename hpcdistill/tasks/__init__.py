"""Verifiable tasks: code (sandboxed tests), math (final answers), sokoban (reasoning-gym).

    task = get_task("code")
    problems = task.load_problems(source="bundled", split="test", num_problems=10, seed=0)
    verdict = task.verify(problems[0], completion_text, timeout_s=6.0, memory_mb=512)
"""

from __future__ import annotations

from hpcdistill.errors import TaskError
from hpcdistill.tasks.base import Problem, Task, Verdict

TASK_NAMES = ("code", "math", "sokoban")


def get_task(name: str) -> Task:
    """The task called `name`; TaskError naming the allowed names otherwise."""
    if name == "code":
        from hpcdistill.tasks.code import CodeTask

        return CodeTask()
    if name == "math":
        from hpcdistill.tasks.math import MathTask

        return MathTask()
    if name == "sokoban":
        from hpcdistill.tasks.sokoban import SokobanTask

        return SokobanTask()
    raise TaskError(f"unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")


__all__ = ["Problem", "Verdict", "Task", "get_task", "TASK_NAMES"]
