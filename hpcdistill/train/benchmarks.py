"""Stage 8 over several benchmarks (`eval.benchmarks`, seed 002 section 4.1 and appendix A.6).

Each benchmark is a task source with its own samples per problem (AIME25 / HMMT25: 32, MATH500: 1,
Minerva / GPQA: 4). Per benchmark and eval temperature T the shard's step metrics get
`eval/<name>/reward@T` and `eval/<name>/passed@T` (means over its problems x samples); then
`eval/avg/reward@T` and `eval/avg/passed@T`, the unweighted mean over the benchmarks with
`average = true` (seed 002's "Avg"; GPQA is reported apart), also written as `eval/reward@T` /
`eval/passed@T` so that analyses reading the single-set eval read the average.
"""

from __future__ import annotations

import logging

import numpy as np

from hpcdistill.distill import contexts
from hpcdistill.models.chat import render_prompt
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem, get_task
from hpcdistill.train import roles
from hpcdistill.train.collect import Verifier
from hpcdistill.train.seeds import benchmark_stream, step_seed

log = logging.getLogger(__name__)

AVERAGE = "avg"


def load_benchmarks(spec: Spec) -> dict[str, list[Problem]]:
    """name -> problems of every `eval.benchmarks` table, loaded before the run starts (a hub
    benchmark that is not available fails here, not at the first eval)."""
    task = get_task(spec.task.name)
    out = {}
    for bench in spec.eval.benchmarks:
        out[bench.label] = task.load_problems(source=bench.source, split=bench.split,
                                              num_problems=bench.num_problems, seed=0)
        log.info("benchmark %s: %d problems x %d samples", bench.label, len(out[bench.label]),
                 bench.samples or spec.eval.samples)
    return out


def eval_set(spec: Spec, models, verifier: Verifier, problems: list[Problem], *, seed: int,
             temperature: float, samples: int) -> tuple[float, float]:
    """(mean reward, pass rate) of the student alone (no teacher context) on one problem set: its
    `samples` rollouts per problem at `temperature`, sampled with `seed`. Stage 8's one set."""
    tok = models.student.tokenizer
    prompts = [render_prompt(tok, contexts.student_messages(p, spec.rollout.system_prompt)) for p in problems]
    gens = roles.sample_student(spec, models, prompts, seed=seed, temperature=temperature, n=samples,
                                max_new_tokens=spec.eval.max_new_tokens or spec.rollout.max_new_tokens)
    verdicts = [verifier.verify(p, tok.decode(g.response_ids, skip_special_tokens=True))
                for p, rollouts in zip(problems, gens) for g in rollouts]
    return float(np.mean([v.reward for v in verdicts])), float(np.mean([v.passed for v in verdicts]))


def evaluate_benchmarks(spec: Spec, models, benchmarks: dict[str, list[Problem]], step: int,
                        verifier: Verifier | None = None) -> dict[str, float]:
    """The student alone (no teacher context) on each benchmark at each eval temperature."""
    verifier = verifier or Verifier.of(spec)
    metrics: dict[str, float] = {}
    for b, bench in enumerate(spec.eval.benchmarks):
        for index, temperature in enumerate(spec.eval.temperatures):
            reward, passed = eval_set(spec, models, verifier, benchmarks[bench.label],
                                      seed=step_seed(spec.seeds[0], step, benchmark_stream(b, index)),
                                      temperature=temperature, samples=bench.samples or spec.eval.samples)
            metrics[f"eval/{bench.label}/reward@{temperature:g}"] = reward
            metrics[f"eval/{bench.label}/passed@{temperature:g}"] = passed
    averaged = [bench.label for bench in spec.eval.benchmarks if bench.average]
    if averaged:
        for temperature in spec.eval.temperatures:
            for kind in ("reward", "passed"):
                mean = float(np.mean([metrics[f"eval/{name}/{kind}@{temperature:g}"] for name in averaged]))
                metrics[f"eval/{AVERAGE}/{kind}@{temperature:g}"] = metrics[f"eval/{kind}@{temperature:g}"] = mean
    return metrics


__all__ = ["load_benchmarks", "eval_set", "evaluate_benchmarks", "AVERAGE"]
