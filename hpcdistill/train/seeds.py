"""The run's random streams, named in one place.

Every random choice of a step takes its seed from (run seed, step, stream): the same run id
reproduces the same rollouts, problem draws and coin flips, and two choices of one step never
share a stream by accident. The numbers are part of every recorded run (changing one changes what
a rerun samples), so they only ever get added to.
"""

from __future__ import annotations

from enum import IntEnum


class SeedStream(IntEnum):
    ROLLOUT = 0  # the student's rollouts of the step's problems
    REGEN = 1  # teacher.context = "regen": the teacher's s' after seeing s and its feedback
    PREFIX = 2  # teacher seeding (seed 003): the teacher-written first tokens of each rollout
    TEACHER_COMPLETIONS = 3  # off-policy teacher completions of the step's problems (hybrid, mixture, ...)
    REPLAY = 4  # replay_buffer: the draw of past problems, and the teacher's completions of them
    GKD_TEACHER = 5  # GKD's lambda < 1: the teacher's samples of the problems it was dealt
    PROBLEMS = 7  # train.problems_per_step: the problems a step draws
    GKD_SPLIT = 9  # GKD's lambda: which problems are the student's this step
    EVAL = 100  # + the eval temperature's index: the student alone on the eval set
    BENCHMARK = 200  # + 10 * benchmark index + temperature index (eval.benchmarks)


def eval_stream(temperature_index: int) -> int:
    return SeedStream.EVAL + temperature_index


def benchmark_stream(benchmark_index: int, temperature_index: int) -> int:
    return SeedStream.BENCHMARK + 10 * benchmark_index + temperature_index


def step_seed(seed: int, step: int, stream: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7_919 + int(stream) * 104_729) % (2**31 - 1)


__all__ = ["SeedStream", "benchmark_stream", "eval_stream", "step_seed"]
