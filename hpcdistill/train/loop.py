"""The pipeline of one run (DESIGN.md section 2), read top to bottom:

    step 0:  rollout -> feedback -> teacher context -> scoring -> record     (measurement)
    step k:  the same, then mask -> objective -> backward -> clip -> step    (training, issue 4)

Every step ends with its shard written atomically (`RunPaths.shard(step)`); a requeued task skips
the steps whose shard exists, so a preempted run never duplicates or drops a step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import hpcdistill
from hpcdistill.distill import contexts
from hpcdistill.errors import SpecError
from hpcdistill.launch.gpus import RoleDevices
from hpcdistill.launch.paths import RunPaths
from hpcdistill.models.chat import render_prompt
from hpcdistill.models.generation import generate
from hpcdistill.models.loading import ModelHandle, load_model
from hpcdistill.models.scoring import TokenScores, score_rollouts
from hpcdistill.record import ShardWriter
from hpcdistill.spec.load import content_hash, dump_toml, spec_to_dict
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem, Verdict, get_task

log = logging.getLogger(__name__)


@dataclass
class Models:
    student: ModelHandle
    teacher: ModelHandle  # the same object as `student` when model.teacher = "same"


def resolve_device(spec: Spec, roles: RoleDevices) -> str:
    if spec.model.device != "auto":
        return spec.model.device
    return "cuda" if (torch.cuda.is_available() and not roles.on_cpu) else "cpu"


def load_models(spec: Spec, roles: RoleDevices) -> Models:
    device = resolve_device(spec, roles)
    student = load_model(spec.model.student, dtype=spec.model.dtype, device=device)
    if spec.model.teacher == "same":
        return Models(student, student)
    teacher = load_model(spec.model.teacher, dtype=spec.model.dtype, device=device)
    return Models(student, teacher)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**31 - 1)


def shard_attrs(spec: Spec, paths: RunPaths, models: Models, step: int) -> dict[str, Any]:
    data = spec_to_dict(spec)
    return {
        "spec_toml": dump_toml(data),
        "spec_hash": content_hash(data),
        "run_id": paths.run_id,
        "experiment": spec.experiment.name,
        "seed": spec.seeds[0],
        "step": step,
        "package_version": hpcdistill.__version__,
        "student_model": spec.model.student,
        "teacher_model": spec.model.teacher,
        "tokenizer": getattr(models.student.tokenizer, "name_or_path", "") or spec.model.student,
        "task": spec.task.name,
        "teacher_context": spec.teacher.context,
    }


def _tokens(scores: TokenScores, ids: np.ndarray, sampler_lp: np.ndarray | None) -> dict[str, np.ndarray]:
    n = len(scores.student_lp)
    out = {
        "ids": np.asarray(ids[:n], dtype=np.int32),
        "student_lp": scores.student_lp,
        "teacher_lp": scores.teacher_lp,
        "student_topk_ids": scores.student_topk_ids,
        "student_topk_lp": scores.student_topk_lp,
        "teacher_at_student_topk_lp": scores.teacher_at_student_topk_lp,
        "topk_kl": scores.topk_kl,
    }
    for name in ("full_kl", "entropy_s", "entropy_t"):
        value = getattr(scores, name, None)
        if value is not None:
            out[name] = value
    if sampler_lp is not None:
        out["sampler_lp"] = np.asarray(sampler_lp[:n], dtype=np.float32)
    return out


def measure_step(spec: Spec, models: Models, problems: list[Problem], step: int, writer) -> dict[str, float]:
    """Rollout, feedback, teacher context, scoring and record for one step; returns metrics."""
    seed = spec.seeds[0]
    task = get_task(spec.task.name)
    tok = models.student.tokenizer
    ro, tc, sc = spec.rollout, spec.teacher, spec.scoring

    # 1. rollout: N samples per problem from the student.
    prompts = [render_prompt(tok, contexts.student_messages(p, ro.system_prompt)) for p in problems]
    t0 = time.monotonic()
    generations = generate(models.student, prompts, n=ro.samples_per_problem,
                           max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                           top_p=ro.top_p, top_k=ro.top_k, seed=step_seed(seed, step, 0),
                           batch_size=ro.batch_size)
    rollout_s = time.monotonic() - t0
    flat = [(p, i, g) for p, gens in zip(problems, generations) for i, g in enumerate(gens)]
    texts = [tok.decode(g.response_ids, skip_special_tokens=True) for _, _, g in flat]

    # 2. feedback: the task's verifier.
    verdicts = [task.verify(p, text, timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
                for (p, _, _), text in zip(flat, texts)]

    # 3. teacher context, 4. scoring: student on (p, s_<t), teacher on its context + s_<t.
    student_seqs = [(g.prompt_ids, list(g.response_ids)) for _, _, g in flat]
    teacher_seqs = [(render_prompt(tok, contexts.teacher_messages(p, text, v, tc, ro.system_prompt)),
                     list(g.response_ids)) for (p, _, g), text, v in zip(flat, texts, verdicts)]
    scores = score_rollouts(models.student, models.teacher, student_seqs, teacher_seqs,
                            top_k=sc.top_k, full_vocab=sc.full_vocab, chunk_size=sc.chunk_size,
                            batch_size=sc.batch_size)

    # 5. record.
    for (p, i, g), text, v, s in zip(flat, texts, verdicts, scores):
        writer.append(_row(p, i, step, "original", v, seed, step, prompts[problems.index(p)], text, g),
                      _tokens(s, g.response_ids, getattr(g, "sampler_lp", None)))
    metrics = {
        "reward_mean": float(np.mean([v.reward for v in verdicts])),
        "topk_kl_mean": _token_mean([s.topk_kl for s in scores]),
        "response_tokens": float(sum(len(g.response_ids) for _, _, g in flat)),
        "truncation_rate": float(np.mean([g.finish_reason == "length" for _, _, g in flat])),
        "rollout_seconds": rollout_s,
    }

    if tc.context == "regen":
        metrics.update(_regenerate(spec, models, flat, texts, verdicts, step, writer))
    return metrics


def _regenerate(spec: Spec, models: Models, flat, texts, verdicts, step: int, writer) -> dict[str, float]:
    """SDPO with regeneration (seed 000): the teacher sees p + s + f, writes s', is scored on s'.

    One s' per original rollout s. The student side is the same as for s: its top-k at (p, s_<t);
    the teacher side is (p, s, f, s'_<t); positions align by ordinal t, truncated to the shorter.
    """
    task = get_task(spec.task.name)
    tok = models.student.tokenizer
    ro, tc, sc, seed = spec.rollout, spec.teacher, spec.scoring, spec.seeds[0]
    regen_prompts = [render_prompt(tok, contexts.regen_messages(p, text, v, tc))
                     for (p, _, _), text, v in zip(flat, texts, verdicts)]
    regens = generate(models.teacher, regen_prompts, n=1,
                      max_new_tokens=tc.max_new_tokens or ro.max_new_tokens,
                      temperature=tc.temperature, top_p=tc.top_p, top_k=ro.top_k,
                      seed=step_seed(seed, step, 1), batch_size=ro.batch_size)
    regens = [r[0] for r in regens]
    regen_texts = [tok.decode(r.response_ids, skip_special_tokens=True) for r in regens]
    regen_verdicts = [task.verify(p, text, timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
                      for (p, _, _), text in zip(flat, regen_texts)]
    student_seqs = [(g.prompt_ids, list(g.response_ids)) for _, _, g in flat]
    teacher_seqs = [(rp, list(r.response_ids)) for rp, r in zip(regen_prompts, regens)]
    scores = score_rollouts(models.student, models.teacher, student_seqs, teacher_seqs,
                            top_k=sc.top_k, full_vocab=sc.full_vocab, chunk_size=sc.chunk_size,
                            batch_size=sc.batch_size)
    for (p, i, _), rp, r, text, v, s in zip(flat, regen_prompts, regens, regen_texts, regen_verdicts, scores):
        writer.append(_row(p, i, step, "regenerated", v, seed, step, rp, text, r),
                      _tokens(s, r.response_ids, None))
    return {
        "regen_reward_mean": float(np.mean([v.reward for v in regen_verdicts])),
        "regen_topk_kl_mean": _token_mean([s.topk_kl for s in scores]),
    }


def _row(problem: Problem, sample_idx: int, step: int, kind: str, verdict: Verdict, seed: int,
         weight_version: int, prompt_ids, text: str, generation) -> dict[str, Any]:
    return {
        "problem_id": problem.problem_id,
        "sample_idx": sample_idx,
        "step": step,
        "kind": kind,
        "reward": float(verdict.reward),
        "seed": seed,
        "weight_version": weight_version,
        "response_text": text,
        "feedback": verdict.feedback,
        "finish_reason": generation.finish_reason,
    }


def _token_mean(arrays: list[np.ndarray]) -> float:
    total = sum(float(np.sum(a)) for a in arrays)
    count = sum(len(a) for a in arrays)
    return total / count if count else float("nan")


def load_problems(spec: Spec) -> list[Problem]:
    # The problem set is the same for every seed of a sweep (seed 000 trains and evaluates on
    # the same fixed problems); the run's seed varies the samples, not the problems.
    task = get_task(spec.task.name)
    return task.load_problems(source=spec.task.source, split=spec.task.split,
                              num_problems=spec.task.num_problems, seed=0)


def run_pipeline(spec: Spec, paths: RunPaths, roles: RoleDevices) -> dict[str, Any]:
    """Run every step of one run whose shard is not yet written; returns a small summary."""
    if spec.train.steps > 0:
        from hpcdistill.train.steps import run_training

        return run_training(spec, paths, roles)
    problems = load_problems(spec)
    shard = paths.shard(0)
    if shard.exists():
        log.info("step 0 already recorded in %s; skipping", shard)
        return {"steps_done": 1, "skipped": [0]}
    models = load_models(spec, roles)
    paths.shards.mkdir(parents=True, exist_ok=True)
    with ShardWriter(shard, attrs=shard_attrs(spec, paths, models, 0), top_k=spec.scoring.top_k) as writer:
        metrics = measure_step(spec, models, problems, 0, writer)
        writer.add_metrics(0, metrics)
    log.info("step 0: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return {"steps_done": 1, "metrics": metrics}


__all__ = ["run_pipeline", "measure_step", "load_models", "load_problems", "SpecError"]
