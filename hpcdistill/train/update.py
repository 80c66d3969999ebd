"""Stages 6-7 of a step (DESIGN.md section 2): masks -> loss inputs -> objective -> update,
in memory bounded by the budget, not by the tokens of the step (docs/trainer.md, "Micro-batches"):

    supervision_masks   per-token weights of each rollout (`[mask]`)
    update              the step's plan -> this rank's items -> micro-batches under
                        `trainer.micro_batch_tokens` -> one backward each -> one `Trainer.step`
    objective_loss      `train.objective` over some items, looked up in OBJECTIVES; what it reads
                        of the student's logits comes through `StudentHead.columns`, chunk by
                        chunk (no [N, V] tensor), or through the fused Triton loss on CUDA
    off_policy_loss     teacher completions under the student's prompt (SFT or GKD), + the KL anchor

Each micro-batch's objective is normalised by its own valid tokens and scaled by its share of the
batch's (`MicroBatchLoss.share`), as each rank's is by its share of the whole batch, so the parts
add up to the loss of the whole batch and their gradients to its gradient (tests/test_microbatch.py
checks both against `train.whole_batch`, today's step before issue 17, in float64).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hpcdistill.distill import objectives
from hpcdistill.distill.divergence import masked_kl
from hpcdistill.distill.loss import (DistillInputs, LossConfig, distill_loss, support_columns, support_divergence,
                                     support_ids, topk_buckets)
from hpcdistill.distill.masks import SCORED_KINDS, spec_masks
from hpcdistill.distill.schedules import StepPlan
from hpcdistill.distill.segments import sentence_segments
from hpcdistill.models.head import StudentHead, upcast
from hpcdistill.models.scoring import TeacherLogits, project, response_hidden
from hpcdistill.spec.rules import LEGACY_OBJECTIVES
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem
from hpcdistill.train import fused
from hpcdistill.train.collect import ScoredRollout
from hpcdistill.train.microbatch import MicroBatchLoss, combined_metrics, describe, forward_tokens, micro_losses
from hpcdistill.train.roles import Models, load_reference_model
from hpcdistill.train.seeds import SeedStream, step_seed
from hpcdistill.train.trainer_base import Trainer

log = logging.getLogger(__name__)

def supervision_masks(spec: Spec, items: list[ScoredRollout], tokenizer, step: int) -> list[np.ndarray]:
    """Stage 6: per-token weights of each item (`[mask]`)."""
    lengths = [len(it.scores.student_lp) for it in items]
    segments = advantages = teacher_lp = None
    if spec.mask.kind in SCORED_KINDS:
        ids = [it.student_seq[1][:n] for it, n in zip(items, lengths)]
        segments = [sentence_segments([tokenizer.decode([t]) for t in seq], spec.mask.segment_newlines)
                    for seq in ids]
        teacher_lp = [it.scores.teacher_at_student_topk_lp for it in items]
        advantages = [it.scores.teacher_lp - it.scores.student_lp for it in items]
    return spec_masks(spec.mask, spec.scoring.top_k, spec.seeds[0], step, lengths, segments=segments,
                      teacher_lp_at_student_topk=teacher_lp, advantages=advantages)


def _cat(arrays: list[np.ndarray], device, dtype=None) -> torch.Tensor:
    return torch.as_tensor(np.concatenate(arrays), dtype=dtype, device=device)


def student_head(spec: Spec, models: Models, items: list[ScoredRollout], lengths: list[int]) -> StudentHead:
    """The student's final hidden states at the items' first `lengths` response positions (one
    decoder forward, with grad while training), projected `scoring.chunk_size` positions at a time."""
    hidden = response_hidden(models.student, [it.student_seq for it in items], lengths)
    return StudentHead(models.student.model, hidden, spec.scoring.chunk_size)


def distill_inputs(config: LossConfig, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                   head: StudentHead) -> DistillInputs:
    """The batch of `distill.loss` from the live student (through `head`, no [N, V]) and the
    teacher's log-probs that scoring recorded for each item (`TokenScores`); the full support
    projects the teacher's hidden states chunk by chunk beside the student's."""
    device = head.device
    scores = [it.scores for it in items]
    lengths = [len(sc.student_lp) for sc in scores]
    valid = _cat([np.full(n, float(it.teacher_signal), np.float32) for it, n in zip(items, lengths)], device)
    y = _cat([np.asarray(it.student_seq[1][:n]) for it, n in zip(items, lengths)], device, torch.long)
    needs_lse = config.support == "sampled" or config.tail or config.is_clip is not None
    ids = mask = teacher = None
    if config.support == "topk":
        which = config.topk_support
        teacher_ids = None if which == "student" else _cat([sc.teacher_topk_ids for sc in scores], device, torch.long)
        ids, mask = support_ids(_cat([sc.student_topk_ids for sc in scores], device, torch.long), teacher_ids, which)
    elif config.support == "full":
        with torch.no_grad():
            teacher = TeacherLogits(models.teacher, [it.teacher_seq for it in items], lengths)

    def columns(logits: torch.Tensor, sl: slice) -> torch.Tensor:
        cols = [logits.gather(-1, y[sl, None])]
        if needs_lse:
            cols.append(torch.logsumexp(logits, -1, keepdim=True))
        if ids is not None:
            cols.append(logits.gather(-1, ids[sl]))
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher.chunk(sl.start, sl.stop).to(logits.device)
            cols.append(support_divergence(config, logits, teacher_logits)[:, None])
        return torch.cat(cols, -1)

    if ids is not None and not needs_lse:  # SDPO's renormalised top-k: only logits at y and the ids
        out = head.at(torch.cat([y[:, None], ids], -1))  # [N, 1 + S], no projection over V
    else:
        out = head.columns(columns)  # [N, 1 (+1) (+S) (+1)]
    lse = out[:, 1] if needs_lse else torch.zeros(len(y), device=device, dtype=out.dtype)
    batch = DistillInputs(
        weights=_cat(weights, device, torch.float32), lengths=lengths, loss_mask=valid,
        student_lp=out[:, 0] - lse, teacher_lp=_cat([sc.teacher_lp for sc in scores], device),
        sampler_lp=_cat([np.asarray(it.generation.sampler_lp[:n], np.float32) for it, n in zip(items, lengths)],
                        device))
    if ids is not None:
        student_at = out[:, 1 + needs_lse:] - (lse[:, None] if config.tail else 0.0)
        teacher_at = torch.cat([_cat([getattr(sc, column) for sc in scores], device)
                                for _, column in support_columns(config.topk_support)], -1)
        batch.student_buckets, batch.teacher_buckets, batch.bucket_mask = topk_buckets(
            student_at, teacher_at, mask, config.topk_normalization)
    elif teacher is not None:
        batch.divergence = out[:, -1]
    return batch


def initial_reference(spec: Spec, models: Models) -> torch.nn.Module | None:
    """The frozen reference model of the run, or None: the initial student that kl_anchored anchors
    to (seed 003, finding 4) and that ExOPD extrapolates from (`train.exopd_reference = "initial"`),
    shared with an `initial` self-teacher, which holds the same weights; or the model ExOPD names."""
    train = spec.train
    exopd = train.objective == "exopd"
    if train.method != "kl_anchored" and not exopd:
        return None
    if exopd and train.exopd_reference != "initial":
        return load_reference_model(spec, models, train.exopd_reference)
    if spec.teacher.weights == "initial" and models.teacher is not models.student and models.teacher.model is not None:
        return models.teacher.model
    return copy.deepcopy(models.student.model).eval()


def reference_logprobs(models: Models, reference: torch.nn.Module, items: list[ScoredRollout],
                       chunk_size: int) -> torch.Tensor:
    """log p_ref(y_t) [N] of each item's sampled response tokens under the frozen reference, on the
    student's own prompt; projected `chunk_size` positions at a time (no [N, V] tensor)."""
    lengths = [len(it.scores.student_lp) for it in items]
    device = models.student.device
    y = _cat([np.asarray(it.student_seq[1][:n]) for it, n in zip(items, lengths)], device, torch.long)
    with torch.no_grad():
        hidden = response_hidden(models.student, [it.student_seq for it in items], lengths, model=reference)
        parts = []
        for start in range(0, len(y), chunk_size):
            logits = upcast(project(reference, hidden[start:start + chunk_size]))  # [C, V]
            parts.append(logits.gather(-1, y[start:start + chunk_size, None])[:, 0] - torch.logsumexp(logits, -1))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)



# ---------------------------------------------------------------------------- the objectives


def distill_objective(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                      head: StudentHead, reference: torch.nn.Module | None, advantages: torch.Tensor | None):
    """objective = "distill" (`distill.loss`); also leaves each rollout's per-token loss terms in
    `rollout.train_loss` (recorded in the shard: what `hpcdistill replay` reproduces)."""
    config = LossConfig.from_train(spec.train)
    out = distill_loss(config, distill_inputs(config, models, items, weights, head))
    for item, terms in zip(items, torch.split(out.terms, [len(it.scores.student_lp) for it in items])):
        item.train_loss = terms.float().cpu().numpy()
    return _metrics(out.loss, out.metrics)


def _sampled_token_lps(models: Models, items: list[ScoredRollout], head: StudentHead, temperature: float = 1.0):
    """At each rollout's sampled tokens, [N] each: (the live student log p (at `temperature` too:
    [N, 2]), the recorded teacher log p, the sampler's log p, the valid-token mask)."""
    device = head.device
    lengths = [len(it.scores.student_lp) for it in items]
    y = _cat([np.asarray(it.student_seq[1][:n]) for it, n in zip(items, lengths)], device, torch.long)
    tempered = temperature not in (0.0, 1.0)

    def columns(logits: torch.Tensor, sl: slice) -> torch.Tensor:
        cols = [torch.log_softmax(logits, -1).gather(-1, y[sl, None])]
        if tempered:  # T = 1: the same numbers, no second [C, V]
            cols.append(objectives.logprobs_at_temperature(logits, y[sl], temperature)[:, None])
        return torch.cat(cols, -1)

    student_lp = head.columns(columns)
    teacher_lp = _cat([it.scores.teacher_lp for it in items], device)
    sampler_lp = _cat([np.asarray(it.generation.sampler_lp[:n], np.float32) for it, n in zip(items, lengths)], device)
    valid = _cat([np.full(n, float(it.teacher_signal), np.float32) for it, n in zip(items, lengths)], device)
    return student_lp, teacher_lp, sampler_lp, valid


def exopd_objective(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                    head: StudentHead, reference: torch.nn.Module | None, advantages: torch.Tensor | None):
    """G-OPD's reward extrapolation (seed 002's ExOPD baseline), against its frozen reference."""
    if reference is None:
        raise ValueError("objective 'exopd' needs its reference model (train.update.initial_reference)")
    student_lp, teacher_lp, sampler_lp, valid = _sampled_token_lps(models, items, head)
    reference_lp = reference_logprobs(models, reference, items, spec.scoring.chunk_size)
    return _metrics(*objectives.exopd_advantage_loss(
        student_lp[:, 0], teacher_lp, _cat(weights, head.device, torch.float32), alpha=spec.train.exopd_alpha,
        reference_lp=reference_lp, sampler_lp=sampler_lp, loss_mask=valid))


def _context_indices(items: list[ScoredRollout], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] the rollout of each token, [B] the problem group of each rollout."""
    seq_index = torch.as_tensor(np.concatenate(
        [np.full(len(it.scores.student_lp), i) for i, it in enumerate(items)]), device=device)
    problem_ids = sorted({it.problem.problem_id for it in items})
    group_index = torch.as_tensor([problem_ids.index(it.problem.problem_id) for it in items], device=device)
    return seq_index, group_index


def group_advantages(spec: Spec, items: list[ScoredRollout]) -> torch.Tensor | None:
    """[B] context_distill's group-centred advantages over all of a rank's rollouts (whole problem
    groups, `Trainer.shard`), from recorded values only: what a micro-batch holding part of a
    group needs. None for the other objectives."""
    if spec.train.objective != "context_distill" or not items:
        return None
    train, lengths = spec.train, [len(it.scores.student_lp) for it in items]
    seq_index, group_index = _context_indices(items, "cpu")
    f64 = torch.float64  # recorded float32 values, summed over whole sequences
    return objectives.sequence_advantages(
        torch.as_tensor([it.verdict.reward for it in items], dtype=f64),
        _cat([it.scores.teacher_lp for it in items], "cpu", f64),
        _cat([np.asarray(it.generation.sampler_lp[:n], np.float32) for it, n in zip(items, lengths)], "cpu", f64),
        seq_index, group_index, adv_tau=train.adv_tau, teacher_tau=train.teacher_tau, student_tau=train.student_tau,
        use_full_reward_baseline=train.use_full_reward_baseline,
        loss_mask=_cat([np.full(n, float(it.teacher_signal)) for it, n in zip(items, lengths)], "cpu", f64))


def context_distill_objective(spec: Spec, models: Models, items: list[ScoredRollout], weights: list[np.ndarray],
                              head: StudentHead, reference: torch.nn.Module | None, advantages: torch.Tensor | None):
    """Seed 004's context distillation, its advantages grouped by problem (`advantages`: computed
    over the whole batch beforehand; None: over these items)."""
    train, device = spec.train, head.device
    # Seed 004 sec. 4.2: ratio = pi_theta(y | T) / pi_behaviour(y | T), T = rollout.temperature:
    # the trainer's log-probs recomputed from logits / T (also the gradient's log-probs), against
    # the sampler's log-probs at T (inference_lp, which also feeds the reward).
    student_lp, teacher_lp, sampler_lp, valid = _sampled_token_lps(models, items, head, spec.rollout.temperature)
    seq_index, group_index = _context_indices(items, device)
    reward = torch.as_tensor([it.verdict.reward for it in items], dtype=torch.float32, device=device)
    return _metrics(*objectives.context_distill_loss(
        student_lp[:, -1], sampler_lp, teacher_lp, reward, seq_index, group_index,
        adv_tau=train.adv_tau, teacher_tau=train.teacher_tau, student_tau=train.student_tau,
        use_full_reward_baseline=train.use_full_reward_baseline,
        token_mask_low=train.token_mask_low, token_mask_high=train.token_mask_high,
        weights=_cat(weights, device, torch.float32), loss_mask=valid,
        sequence_advantage=None if advantages is None else advantages.to(device)))


Objective = Callable[[Spec, Models, list[ScoredRollout], list[np.ndarray], StudentHead, "torch.nn.Module | None",
                      "torch.Tensor | None"], tuple[torch.Tensor, dict[str, float]]]

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
                   reference: torch.nn.Module | None = None, advantages: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 7: the loss of `train.objective` over `items`, normalised by their valid tokens;
    `advantages`: context_distill's group advantages of these items (`group_advantages`)."""
    name = spec.train.objective
    objective = OBJECTIVES.get(name)
    if objective is None:
        raise NotImplementedError(f"train.objective = {name!r} needs off-policy teacher completions, "
                                  "which the on-policy loop does not produce")
    if objective is distill_objective and fused.applies(spec, models):  # CUDA: the Triton loss
        return _metrics(*fused.distill_objective(spec, models, items, weights))
    head = student_head(spec, models, items, [len(it.scores.student_lp) for it in items])
    return objective(spec, models, items, weights, head, reference, advantages)


def _metrics(loss: torch.Tensor, named: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    return loss, {f"train/{k}": float(v) for k, v in named.items()}


def off_policy_loss(spec: Spec, models: Models, items: list[ScoredRollout], reference: torch.nn.Module | None,
                    kl_beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher completions under the student's prompt: SFT (sequence-level KD) or, with
    train.off_policy_loss = "divergence", the distill objective on them (GKD); plus the optional
    KL anchor KL(student || reference) over the full vocabulary, chunk by chunk."""
    device = models.student.device
    lengths = [len(it.student_seq[1]) for it in items]
    weights = torch.ones(sum(lengths), device=device)
    valid = objectives.valid_tokens(weights, None)
    sft = spec.train.off_policy_loss != "divergence"
    anchored = kl_beta > 0 and reference is not None
    loss, metrics = torch.zeros((), device=device), {}
    if not sft:
        loss, named = objective_loss(spec, models, items, [np.ones(n, np.float32) for n in lengths], reference)
        metrics = {k.replace("train/", "train/off_", 1): v for k, v in named.items()}
    if not (sft or anchored):
        return loss, metrics
    head = student_head(spec, models, items, lengths)
    targets = torch.as_tensor([t for it in items for t in it.student_seq[1]], dtype=torch.long, device=device)
    if anchored:
        with torch.no_grad():
            reference_hidden = response_hidden(models.student, [it.student_seq for it in items], lengths,
                                               model=reference)

    def columns(logits: torch.Tensor, sl: slice) -> torch.Tensor:
        student_lp = torch.log_softmax(logits, -1)
        cols = [student_lp.gather(-1, targets[sl, None]), (logits.argmax(-1) == targets[sl])[:, None].to(logits.dtype)]
        if anchored:
            with torch.no_grad():
                reference_lp = torch.log_softmax(upcast(project(reference, reference_hidden[sl])), -1)
            cols.append(masked_kl(student_lp, reference_lp)[:, None])
        return torch.cat(cols, -1)

    out = head.columns(columns)
    if sft:
        loss, named = objectives.sft_loss_from_logprobs(out[:, 0], out[:, 1] > 0.5, weights)
        metrics = {f"train/off_{k}": float(v) for k, v in named.items()}
    if anchored:
        loss = loss + kl_beta * objectives.weighted_mean(out[:, 2], weights, valid)
        metrics["train/kl_to_initial"] = float(objectives.masked_mean(out[:, 2], valid))
    return loss, metrics


# ---------------------------------------------------------------------------- the update


def _kind_metrics(trainer: Trainer, parts: list[MicroBatchLoss], rank_share: float) -> dict[str, float]:
    """The micro-batches' per-token means -> the rank's (`combined_metrics`) -> the batch's."""
    return trainer.reduce_metrics(combined_metrics(parts), rank_share)


def update(spec: Spec, models: Models, trainer: Trainer, items: list[ScoredRollout], weights: list[np.ndarray],
           step_plan: StepPlan, off_items: list[ScoredRollout], reference: torch.nn.Module | None) -> dict[str, float]:
    """objective -> backward per micro-batch -> clip -> AdamW step, as the method's plan for this step says.

    Over several ranks each trains on its shard of the batch (whole problems, `trainer.shard`):
    its loss times its share of the batch's tokens, so the ranks' parts add up to the loss of
    the whole batch (docs/trainer.md); one rank: the shard is the batch and the share 1. Within a
    rank, its items go in micro-batches of at most `trainer.micro_batch_tokens` forward tokens,
    each scaled by its share of the rank's tokens in the same way.
    """
    on = step_plan.on_policy_weight > 0 and bool(items)
    off = step_plan.off_policy_weight > 0 and bool(off_items)
    budget = spec.trainer.micro_batch_tokens
    # the objectives normalise by valid tokens: rollouts without a teacher signal count 0
    on_tokens = [len(w) * int(it.teacher_signal) for w, it in zip(weights, items)]
    on_mine, on_share = trainer.shard(on_tokens, groups=[it.problem.problem_id for it in items])
    off_tokens = [len(it.student_seq[1]) for it in off_items]
    off_mine, off_share = trainer.shard(off_tokens, groups=[it.problem.problem_id for it in off_items])
    on_parts: list[MicroBatchLoss] = []
    off_parts: list[MicroBatchLoss] = []
    if on:
        mine, mine_w = [items[i] for i in on_mine], [weights[i] for i in on_mine]
        advantages = group_advantages(spec, mine)
        on_parts = micro_losses(
            budget, [forward_tokens(it, len(w)) for it, w in zip(mine, mine_w)], [on_tokens[i] for i in on_mine],
            step_plan.on_policy_weight * on_share,
            lambda idx: objective_loss(spec, models, [mine[i] for i in idx], [mine_w[i] for i in idx], reference,
                                       None if advantages is None else advantages[idx]))
    if off:
        off_mine_items = [off_items[i] for i in off_mine]
        off_parts = micro_losses(
            budget, [forward_tokens(it, len(it.student_seq[1])) for it in off_mine_items],
            [off_tokens[i] for i in off_mine], step_plan.off_policy_weight * off_share,
            lambda idx: off_policy_loss(spec, models, [off_mine_items[i] for i in idx], reference,
                                        step_plan.kl_anchor_beta))
    parts = on_parts + off_parts
    log.info("update on %d items: %s", len(on_mine if on else []) + len(off_mine if off else []),
             describe([p.batch for p in parts]))
    padding = trainer.max_over_ranks(len(parts)) - len(parts)  # ZeRO and FSDP: every rank, every backward
    padded = parts + [parts[0].padding() for _ in range(padding)]
    metrics = trainer.step(padded)  # train/loss_total, train/grad_norm (before clipping)
    if on:
        metrics |= _kind_metrics(trainer, on_parts, on_share)
    if off:
        metrics |= _kind_metrics(trainer, off_parts, off_share)
    _gather_train_loss(trainer, items)
    metrics.update({"train/lr": spec.train.lr, "train/on_policy_weight": step_plan.on_policy_weight,
                    "train/off_policy_weight": step_plan.off_policy_weight,
                    "train/seed_tokens": float(step_plan.seed_tokens),
                    "train/supervised_tokens": float(sum(float((w > 0).sum()) for w in weights)),
                    "train/micro_batches": float(len(parts))})
    return metrics


def _gather_train_loss(trainer: Trainer, items: list[ScoredRollout]) -> None:
    """Every rank computed the loss terms of its own items: rank 0, which writes the shard, gets all."""
    if trainer.world_size == 1:
        return
    import torch.distributed as dist

    mine = {i: it.train_loss for i, it in enumerate(items) if it.train_loss is not None}
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, mine)
    for part in gathered:
        for i, terms in part.items():
            items[i].train_loss = terms


def split_on_policy(spec: Spec, problems: list[Problem], step: int) -> tuple[list[Problem], list[Problem]]:
    """GKD's lambda (train.on_policy_fraction): (the student's problems, the teacher's) of a step.

    Each problem is the student's with probability lambda, drawn from (seed, step): TRL's GKD flips
    one coin per batch; one per problem gives the same expected mix with less variance. The last
    step only measures, so it is all the student's."""
    fraction = spec.train.on_policy_fraction
    if fraction >= 1.0 or step >= spec.train.steps:
        return problems, []
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, SeedStream.GKD_SPLIT))
    on = rng.random(len(problems)) < fraction
    return [p for p, o in zip(problems, on) if o], [p for p, o in zip(problems, on) if not o]


def token_share_plan(items: list[ScoredRollout], off_items: list[ScoredRollout]) -> StepPlan:
    """On- and off-policy parts weighted by their token counts: the token mean over the whole
    mixed batch, as GKD averages over its batch."""
    on = sum(len(it.scores) * int(it.teacher_signal) for it in items if it.kind == "original")
    off = sum(len(it.student_seq[1]) for it in off_items)
    total = max(on + off, 1)
    return StepPlan(on / total, off / total)
