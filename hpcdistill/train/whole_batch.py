"""Today's step before issue 17, kept as the baseline: the whole batch's student logits as one
[N, V] float32 tensor with grad ("one graph for the whole batch"), and the full support's teacher
logits as another [N, V]. `train.update` (micro-batches, chunked projection) is checked against it
(tests/test_microbatch.py: equal loss and gradients in float64) and benchmarked against it
(bench/train_memory.py). Nothing in the pipeline calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hpcdistill.distill import objectives
from hpcdistill.distill.loss import (DistillInputs, LossConfig, distill_loss, support_columns, support_ids,
                                     topk_buckets)
from hpcdistill.distill.schedules import StepPlan
from hpcdistill.models.head import upcast
from hpcdistill.models.scoring import TeacherLogits, project, response_hidden
from hpcdistill.spec.rules import LEGACY_OBJECTIVES
from hpcdistill.spec.schema import Spec
from hpcdistill.train.collect import ScoredRollout
from hpcdistill.train.roles import Models
from hpcdistill.train.trainer_base import Trainer
from hpcdistill.train.update import _gather_train_loss, reference_logprobs


def _student_logits(models: Models, items: list[ScoredRollout], grad: bool) -> list[torch.Tensor]:
    """Student logits [T_i, V] at each item's response positions (with grad when training)."""
    handle = models.student
    lengths = [len(it.scores.student_lp) for it in items]
    with torch.set_grad_enabled(grad):
        hidden = response_hidden(handle, [it.student_seq for it in items], lengths)
        logits = upcast(project(handle.model, hidden))
    return list(torch.split(logits, lengths))


def _teacher_logits(models: Models, items: list[ScoredRollout]) -> torch.Tensor:
    """The teacher's logits [N, V] at the items' response positions, on its own contexts."""
    lengths = [len(it.scores.student_lp) for it in items]
    with torch.no_grad():
        teacher = TeacherLogits(models.teacher, [it.teacher_seq for it in items], lengths)
        return teacher.chunk(0, teacher.num_positions)


def _cat(arrays: list[np.ndarray], device, dtype=None) -> torch.Tensor:
    return torch.as_tensor(np.concatenate(arrays), dtype=dtype, device=device)


def distill_inputs(config: LossConfig, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                   student_logits: torch.Tensor) -> DistillInputs:
    """The batch of `distill.loss` from live student logits [N, V] (with grad) and the teacher's
    log-probs that scoring recorded for each item (`TokenScores`); the full support runs the teacher."""
    device = student_logits.device
    scores = [it.scores for it in items]
    lengths = [len(sc.student_lp) for sc in scores]
    valid = _cat([np.full(n, float(it.teacher_signal), np.float32) for it, n in zip(items, lengths)], device)
    y = _cat([np.asarray(it.student_seq[1][:n]) for it, n in zip(items, lengths)], device, torch.long)
    needs_lse = config.support == "sampled" or config.tail or config.is_clip is not None
    lse = torch.logsumexp(student_logits, -1) if needs_lse else torch.zeros(len(y), device=device)
    batch = DistillInputs(
        weights=_cat(weights, device, torch.float32), lengths=lengths, loss_mask=valid,
        student_lp=student_logits.gather(-1, y[:, None])[:, 0] - lse,
        teacher_lp=_cat([sc.teacher_lp for sc in scores], device),
        sampler_lp=_cat([np.asarray(it.generation.sampler_lp[:n], np.float32) for it, n in zip(items, lengths)],
                        device))
    if config.support == "topk":
        which = config.topk_support
        teacher_ids = None if which == "student" else _cat([sc.teacher_topk_ids for sc in scores], device, torch.long)
        ids, mask = support_ids(_cat([sc.student_topk_ids for sc in scores], device, torch.long), teacher_ids, which)
        teacher_at = torch.cat([_cat([getattr(sc, column) for sc in scores], device)
                                for _, column in support_columns(which)], -1)
        student_at = student_logits.gather(-1, ids) - (lse[:, None] if config.tail else 0.0)
        batch.student_buckets, batch.teacher_buckets, batch.bucket_mask = topk_buckets(
            student_at, teacher_at, mask, config.topk_normalization)
    elif config.support == "full":
        batch.student_buckets, batch.teacher_buckets = student_logits, _teacher_logits(models, items).to(device)
    return batch


# ---------------------------------------------------------------------------- the objectives


def distill_objective(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                      student_logits: torch.Tensor, reference: torch.nn.Module | None):
    """objective = "distill" (`distill.loss`); also leaves each rollout's per-token loss terms in
    `rollout.train_loss` (recorded in the shard: what `hpcdistill replay` reproduces)."""
    config = LossConfig.from_train(spec.train)
    out = distill_loss(config, distill_inputs(config, models, items, weights, student_logits))
    for item, terms in zip(items, torch.split(out.terms, [len(it.scores.student_lp) for it in items])):
        item.train_loss = terms.float().cpu().numpy()
    return _metrics(out.loss, out.metrics)


def _sampled_token_lps(models: Models, items: list[ScoredRollout], student_logits: torch.Tensor):
    """At each rollout's sampled tokens, [N] each: (token ids, live student log p, recorded teacher
    log p, the sampler's log p)."""
    device = models.student.device
    lengths = [len(it.scores.student_lp) for it in items]
    ids = torch.as_tensor(np.concatenate([it.student_seq[1][:n] for it, n in zip(items, lengths)]),
                          dtype=torch.long, device=device)
    student_lp = torch.log_softmax(student_logits, -1).gather(-1, ids[:, None])[:, 0]  # [N]
    teacher_lp = torch.as_tensor(np.concatenate([it.scores.teacher_lp for it in items]), device=device)
    sampler_lp = torch.as_tensor(np.concatenate(
        [it.generation.sampler_lp[:n] for it, n in zip(items, lengths)]), device=device)
    return ids, student_lp, teacher_lp, sampler_lp


def _weights(models: Models, weights: list[np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.concatenate(weights), dtype=torch.float32, device=models.student.device)  # [N]


def exopd_objective(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                    student_logits: torch.Tensor, reference: torch.nn.Module | None):
    """G-OPD's reward extrapolation (seed 002's ExOPD baseline), against its frozen reference."""
    if reference is None:
        raise ValueError("objective 'exopd' needs its reference model (train.update.initial_reference)")
    _, student_lp, teacher_lp, sampler_lp = _sampled_token_lps(models, items, student_logits)
    reference_lp = reference_logprobs(models, reference, items, spec.scoring.chunk_size)
    return _metrics(*objectives.exopd_advantage_loss(student_lp, teacher_lp, _weights(models, weights),
                                                     alpha=spec.train.exopd_alpha, reference_lp=reference_lp,
                                                     sampler_lp=sampler_lp))


def context_distill_objective(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                              student_logits: torch.Tensor, reference: torch.nn.Module | None):
    """Seed 004's context distillation, its advantages grouped by problem."""
    train, device = spec.train, models.student.device
    ids, student_lp, teacher_lp, sampler_lp = _sampled_token_lps(models, items, student_logits)
    seq_index = torch.as_tensor(np.concatenate(
        [np.full(len(it.scores.student_lp), i) for i, it in enumerate(items)]), device=device)
    problem_ids = sorted({it.problem.problem_id for it in items})
    group_index = torch.as_tensor([problem_ids.index(it.problem.problem_id) for it in items], device=device)
    reward = torch.as_tensor([it.verdict.reward for it in items], dtype=torch.float32, device=device)
    # Seed 004 sec. 4.2: ratio = pi_theta(y | T) / pi_behaviour(y | T), T = rollout.temperature:
    # the trainer's log-probs recomputed from logits / T (also the gradient's log-probs), against
    # the sampler's log-probs at T (inference_lp, which also feeds the reward).
    temperature = spec.rollout.temperature
    policy_lp = (student_lp if temperature in (0.0, 1.0) else  # T = 1: the same numbers, no 2nd [N, V]
                 objectives.logprobs_at_temperature(student_logits, ids, temperature))
    return _metrics(*objectives.context_distill_loss(
        policy_lp, sampler_lp, teacher_lp, reward, seq_index, group_index,
        adv_tau=train.adv_tau, teacher_tau=train.teacher_tau, student_tau=train.student_tau,
        use_full_reward_baseline=train.use_full_reward_baseline,
        token_mask_low=train.token_mask_low, token_mask_high=train.token_mask_high,
        weights=_weights(models, weights)))


Objective = Callable[[Spec, Models, list[ScoredRollout], list[np.ndarray], torch.Tensor, "torch.nn.Module | None"],
                     tuple[torch.Tensor, dict[str, float]]]

# train.objective -> its loss on the student's rollouts. The loader rewrites the legacy names
# (topk_kl, jsd, opd, ...) into distill + their keys; a Spec built by hand may still carry one,
# which `LossConfig.from_train` resolves. "sft" trains on teacher completions only (off_policy_loss).
OBJECTIVES: dict[str, Objective] = {
    "distill": distill_objective,
    **{name: distill_objective for name in LEGACY_OBJECTIVES},
    "exopd": exopd_objective,
    "context_distill": context_distill_objective,
}


def objective_loss(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                   reference: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 7: the loss of `train.objective` over the batch (one graph for the whole batch)."""
    name = spec.train.objective
    objective = OBJECTIVES.get(name)
    if objective is None:
        raise NotImplementedError(f"train.objective = {name!r} needs off-policy teacher completions, "
                                  "which the on-policy loop does not produce")
    student_logits = torch.cat(_student_logits(models, items, grad=True))  # [N, V]
    return objective(spec, models, items, weights, student_logits, reference)


def _metrics(loss: torch.Tensor, named: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    return loss, {f"train/{k}": float(v) for k, v in named.items()}


def off_policy_loss(spec: Spec, models: Models, items: list[ScoredRollout], reference: torch.nn.Module | None,
                    kl_beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher completions under the student's prompt: SFT (sequence-level KD) or, with
    train.off_policy_loss = "divergence", the distill objective on them (GKD); plus the optional
    KL anchor."""
    device = models.student.device
    lengths = [len(it.student_seq[1]) for it in items]
    weights = torch.ones(sum(lengths), device=device)
    if spec.train.off_policy_loss == "divergence":
        loss, named = objective_loss(spec, models, items, [np.ones(n, np.float32) for n in lengths], reference)
        metrics = {k.replace("train/", "train/off_", 1): v for k, v in named.items()}
        logits = None
    else:
        logits = torch.cat(_student_logits(models, items, grad=True))  # [N, V]
        targets = torch.as_tensor([t for it in items for t in it.student_seq[1]], dtype=torch.long, device=device)
        loss, named = objectives.sft_loss(logits, targets, weights)
        metrics = {f"train/off_{k}": float(v) for k, v in named.items()}
    if kl_beta > 0 and reference is not None:
        if logits is None:
            logits = torch.cat(_student_logits(models, items, grad=True))
        with torch.no_grad():
            hidden = response_hidden(models.student, [it.student_seq for it in items], lengths, model=reference)
            reference_logits = upcast(project(reference, hidden))
        kl, named = objectives.kl_to_reference_loss(logits, reference_logits, weights)
        loss = loss + kl_beta * kl
        metrics["train/kl_to_initial"] = float(named["reference_kl"])
    return loss, metrics


# ---------------------------------------------------------------------------- the update


def update(spec: Spec, models: Models, trainer: Trainer, items: list[ScoredRollout], weights: list[np.ndarray],
           step_plan: StepPlan, off_items: list[ScoredRollout], reference: torch.nn.Module | None) -> dict[str, float]:
    """objective -> backward -> clip -> AdamW step, as the method's plan for this step says.

    Over several ranks each trains on its shard of the batch (whole problems, `trainer.shard`):
    its loss times its share of the batch's tokens, so the ranks' parts add up to the loss of
    the whole batch (docs/trainer.md); one rank: the shard is the batch and the share 1.
    """
    on = step_plan.on_policy_weight > 0 and bool(items)
    off = step_plan.off_policy_weight > 0 and bool(off_items)
    # the objectives normalise by valid tokens: rollouts without a teacher signal count 0
    on_mine, on_share = trainer.shard([len(w) * int(it.teacher_signal) for w, it in zip(weights, items)],
                                      groups=[it.problem.problem_id for it in items])
    off_mine, off_share = trainer.shard([len(it.student_seq[1]) for it in off_items],
                                        groups=[it.problem.problem_id for it in off_items])

    def loss_fn() -> tuple[torch.Tensor, dict[str, float]]:
        loss = torch.zeros((), device=models.student.device)
        metrics: dict[str, float] = {}
        if on:
            on_loss, named = objective_loss(spec, models, [items[i] for i in on_mine], [weights[i] for i in on_mine],
                                            reference)
            loss = loss + step_plan.on_policy_weight * on_share * on_loss
            metrics |= trainer.reduce_metrics(named, on_share)
        if off:
            off_loss, named = off_policy_loss(spec, models, [off_items[i] for i in off_mine], reference,
                                              step_plan.kl_anchor_beta)
            loss = loss + step_plan.off_policy_weight * off_share * off_loss
            metrics |= trainer.reduce_metrics(named, off_share)
        return loss, metrics

    metrics = trainer.step(loss_fn)  # + train/loss_total, train/grad_norm (before clipping)
    _gather_train_loss(trainer, items)
    metrics.update({"train/lr": spec.train.lr, "train/on_policy_weight": step_plan.on_policy_weight,
                    "train/off_policy_weight": step_plan.off_policy_weight,
                    "train/seed_tokens": float(step_plan.seed_tokens),
                    "train/supervised_tokens": float(sum(float((w > 0).sum()) for w in weights))})
    return metrics
