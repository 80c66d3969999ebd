"""The training loop (DESIGN.md section 2, stages 6-7), one screen per concern.

For step = 0 .. train.steps:
    collect   rollout -> feedback -> teacher context -> scoring at the current weights w_step
    mask      supervision weights per token (`[mask]`)
    update    objective -> backward -> clip -> AdamW       (not after the last step)
    record    the step's shard, written atomically; then the checkpoint of w_{step+1}

The update goes through `train.distributed`'s trainer (`[trainer]`: single, DeepSpeed ZeRO or
FSDP2): over several ranks every rank runs this loop, trains on its shard of the batch, and rank 0
alone writes shards and the model (docs/trainer.md).

So shard k holds the rollouts and KLs measured at weights w_k (seed 000 experiment 3 measures
after every step), and the update they drove. Order on disk: shard k first, then the checkpoint
after step k. A task killed between the two redoes step k on resume; sampling is seeded by
(seed, step), so it rewrites the same shard: no step is missing or duplicated.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import shutil
import time
from typing import Any

import numpy as np
import torch

from hpcdistill.distill import objectives, schedules
from hpcdistill.distill.loss import (DistillInputs, LossConfig, distill_loss, support_columns, support_ids,
                                     topk_buckets)
from hpcdistill.distill.schedules import StepPlan
from hpcdistill.distill.masks import SCORED_KINDS, spec_masks
from hpcdistill.distill.segments import sentence_segments
from hpcdistill.errors import LaunchError
from hpcdistill.devices import RoleDevices
from hpcdistill.rundir import RunPaths
from hpcdistill.models import teachers
from hpcdistill.models.scoring import TeacherLogits, response_hidden, _project
from hpcdistill.record import ShardWriter
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem
from hpcdistill.train.distributed import Trainer, TrainerConfig, build_trainer, checkpoint_file
from hpcdistill.train.fixed_set import FixedSet
from hpcdistill.train.policy_lag import LAG_FILE, behaviour_version, make_policy_lag
from hpcdistill.train.loop import (Item, Models, check_parity, collect_step, collect_teacher_completions,
                                   load_eval_problems, load_models, load_problems, shard_attrs, shard_columns,
                                   step_seed, rollout_engine, sample_student, serve_student_weights,
                                   teacher_prefixes, write_items)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- weights


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal checksums = identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def apply_lora(spec: Spec, models: Models) -> None:
    """Wrap the student in a peft LoRA adapter (the teacher "same" shares the wrapped model)."""
    lora = spec.train.lora
    if not lora.enabled:
        return
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    shared = models.teacher is models.student
    models.student.model = get_peft_model(models.student.model, config)
    if shared:
        models.teacher = models.student


# ---------------------------------------------------------------------------- one update


def supervision_masks(spec: Spec, items: list[Item], tokenizer, step: int) -> list[np.ndarray]:
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


def _student_logits(models: Models, items: list[Item], grad: bool) -> list[torch.Tensor]:
    """Student logits [T_i, V] at each item's response positions (with grad when training)."""
    handle = models.student
    lengths = [len(it.scores.student_lp) for it in items]
    with torch.set_grad_enabled(grad):
        hidden = response_hidden(handle, [it.student_seq for it in items], lengths)
        logits = _project(handle.model, hidden).float()
    return list(torch.split(logits, lengths))


def _teacher_logits(models: Models, items: list[Item]) -> torch.Tensor:
    """The teacher's logits [N, V] at the items' response positions, on its own contexts."""
    lengths = [len(it.scores.student_lp) for it in items]
    with torch.no_grad():
        teacher = TeacherLogits(models.teacher, [it.teacher_seq for it in items], lengths)
        return teacher.chunk(0, teacher.num_positions)


def _cat(arrays: list[np.ndarray], device, dtype=None) -> torch.Tensor:
    return torch.as_tensor(np.concatenate(arrays), dtype=dtype, device=device)


def distill_inputs(config: LossConfig, models: Models, items: list[Item], weights: list[np.ndarray],
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


def initial_reference(spec: Spec, models: Models) -> torch.nn.Module | None:
    """The frozen reference model of the run, or None: the initial student that kl_anchored anchors
    to (seed 003, finding 4) and that ExOPD extrapolates from (`train.exopd_reference = "initial"`),
    shared with an `initial` self-teacher, which holds the same weights; or the model ExOPD names."""
    train = spec.train
    exopd = train.objective == "exopd"
    if train.method != "kl_anchored" and not exopd:
        return None
    if exopd and train.exopd_reference != "initial":
        from hpcdistill.train.loop import load_reference_model

        return load_reference_model(spec, models, train.exopd_reference)
    if spec.teacher.weights == "initial" and models.teacher is not models.student:
        return models.teacher.model
    return copy.deepcopy(models.student.model).eval()


def reference_logprobs(models: Models, reference: torch.nn.Module, items: list[Item],
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
            logits = _project(reference, hidden[start:start + chunk_size]).float()  # [C, V]
            parts.append(logits.gather(-1, y[start:start + chunk_size, None])[:, 0] - torch.logsumexp(logits, -1))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


def objective_loss(spec: Spec, models: Models, items: list[Item], weights: list[np.ndarray],
                   reference: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 7: the loss of `train.objective` over the batch (one graph for the whole batch).

    objective = "distill" also leaves each item's per-token loss terms in `item.train_loss`
    (recorded in the shard: what `hpcdistill replay` reproduces)."""
    train = spec.train
    device = models.student.device
    w = torch.as_tensor(np.concatenate(weights), dtype=torch.float32, device=device)  # [N]
    name = train.objective
    logits = _student_logits(models, items, grad=True)
    student_logits = torch.cat(logits)  # [N, V]
    if LossConfig.applies_to(name):
        config = LossConfig.from_train(train)
        out = distill_loss(config, distill_inputs(config, models, items, weights, student_logits))
        for item, terms in zip(items, torch.split(out.terms, [len(it.scores.student_lp) for it in items])):
            item.train_loss = terms.float().cpu().numpy()
        return _metrics(out.loss, out.metrics)
    ids = torch.as_tensor(np.concatenate([it.student_seq[1][:len(it.scores.student_lp)] for it in items]),
                          dtype=torch.long, device=device)
    student_lp = torch.log_softmax(student_logits, -1).gather(-1, ids[:, None])[:, 0]  # [N]
    teacher_lp = torch.as_tensor(np.concatenate([it.scores.teacher_lp for it in items]), device=device)
    sampler_lp = torch.as_tensor(np.concatenate(
        [it.generation.sampler_lp[:len(it.scores.student_lp)] for it in items]), device=device)
    if name == "exopd":  # G-OPD's reward extrapolation needs its reference (seed 002's ExOPD baseline)
        if reference is None:
            raise ValueError("objective 'exopd' needs its reference model (train.steps.initial_reference)")
        reference_lp = reference_logprobs(models, reference, items, spec.scoring.chunk_size)
        return _metrics(*objectives.exopd_advantage_loss(student_lp, teacher_lp, w, alpha=train.exopd_alpha,
                                                         reference_lp=reference_lp, sampler_lp=sampler_lp))
    if name == "context_distill":
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
            token_mask_low=train.token_mask_low, token_mask_high=train.token_mask_high, weights=w))
    raise NotImplementedError(f"train.objective = {name!r} needs off-policy teacher completions, "
                              "which the on-policy loop does not produce")


def _metrics(loss: torch.Tensor, named: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    return loss, {f"train/{k}": float(v) for k, v in named.items()}


def off_policy_loss(spec: Spec, models: Models, items: list[Item], reference: torch.nn.Module | None,
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
            hidden = response_hidden(_Handle(reference, models.student), [it.student_seq for it in items], lengths)
            reference_logits = _project(reference, hidden).float()
        kl, named = objectives.kl_to_reference_loss(logits, reference_logits, weights)
        loss = loss + kl_beta * kl
        metrics["train/kl_to_initial"] = float(named["reference_kl"])
    return loss, metrics


class _Handle:
    """A model handle that borrows the student's tokenizer and device (the frozen reference)."""

    def __init__(self, model, like):
        self.model, self.tokenizer, self.device, self.dtype = model, like.tokenizer, like.device, like.dtype


def update(spec: Spec, models: Models, trainer: Trainer, items: list[Item], weights: list[np.ndarray],
           step_plan: StepPlan, off_items: list[Item], reference: torch.nn.Module | None) -> dict[str, float]:
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


def _gather_train_loss(trainer: Trainer, items: list[Item]) -> None:
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


# ---------------------------------------------------------------------------- eval


def evaluate(spec: Spec, models: Models, problems: list[Problem] | dict[str, list[Problem]],
             step: int) -> dict[str, float]:
    """Stage 8: accuracy of the student alone (no teacher context) at each eval temperature;
    with eval.benchmarks, `problems` is {benchmark: problems} (hpcdistill.train.benchmarks)."""
    if spec.eval.benchmarks:
        from hpcdistill.train.benchmarks import evaluate_benchmarks

        return evaluate_benchmarks(spec, models, problems, step)
    from hpcdistill.distill import contexts
    from hpcdistill.models.chat import render_prompt
    from hpcdistill.tasks import get_task

    task = get_task(spec.task.name)
    tok = models.student.tokenizer
    prompts = [render_prompt(tok, contexts.student_messages(p, spec.rollout.system_prompt)) for p in problems]
    metrics = {}
    for index, temperature in enumerate(spec.eval.temperatures):
        gens = sample_student(spec, models, prompts, seed=step_seed(spec.seeds[0], step, 100 + index),
                              temperature=temperature, n=spec.eval.samples,
                              max_new_tokens=spec.eval.max_new_tokens or spec.rollout.max_new_tokens)
        verdicts = [task.verify(p, tok.decode(g.response_ids, skip_special_tokens=True),
                                timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
                    for p, samples in zip(problems, gens) for g in samples]
        metrics[f"eval/reward@{temperature:g}"] = float(np.mean([v.reward for v in verdicts]))
        metrics[f"eval/passed@{temperature:g}"] = float(np.mean([v.passed for v in verdicts]))
    return metrics


def eval_due(spec: Spec, step: int) -> bool:
    every = spec.eval.every
    return every > 0 and (step % every == 0 or step == spec.train.steps)


def step_problems(spec: Spec, problems: list[Problem], step: int) -> list[Problem]:
    """The problems of one step: all, or `train.problems_per_step` drawn without replacement;
    `train.measure_problems = "step0"`: the last (measurement) step draws step 0's problems again."""
    if step == spec.train.steps and spec.train.measure_problems == "step0":
        step = 0
    return [problems[i] for i in _step_indices(spec, len(problems), step)]


def _step_indices(spec: Spec, num_problems: int, step: int) -> list[int]:
    count = spec.train.problems_per_step
    if count is None or count >= num_problems:
        return list(range(num_problems))
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, 7))
    return sorted(int(i) for i in rng.choice(num_problems, size=count, replace=False))


def replay_problems(spec: Spec, problems: list[Problem], step: int) -> list[Problem]:
    """replay_buffer's injection at `step` (seed 003): a seeded sample, without replacement, of the
    problems the student trained on before this step (this step's own at step 0), enough for
    `train.replay_size` teacher sequences at rollout.samples_per_problem each."""
    seen = sorted({i for s in range(step) for i in _step_indices(spec, len(problems), s)}) or \
        _step_indices(spec, len(problems), step)
    count = min(len(seen), -(-spec.train.replay_size // spec.rollout.samples_per_problem))
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, 4))
    return [problems[seen[i]] for i in sorted(rng.choice(len(seen), size=count, replace=False))]


# ---------------------------------------------------------------------------- the loop


def run_training(spec: Spec, paths: RunPaths, roles: RoleDevices) -> dict[str, Any]:
    """Every step of the run not yet done, on one process or as one rank of several (docs/trainer.md):
    every rank runs the whole loop; rank 0 alone writes shards, checkpoint metadata and the model."""
    problems = load_problems(spec)
    eval_problems = load_eval_problems(spec, problems)
    models = load_models(spec, roles)  # a self-teacher copy is made here, before any wrapping
    check_parity(spec, models, problems)
    torch.manual_seed(spec.seeds[0])
    initial_checksum = weights_checksum(models.student.model)  # ablation arms start identical
    reference = initial_reference(spec, models)
    apply_lora(spec, models)
    trainer = build_trainer(TrainerConfig.from_spec(spec), models.student.model)
    models.student.model = trainer.model  # the teacher "same" is the same handle: it follows
    models.trainer = trainer
    models.policy_lag = make_policy_lag(spec)  # rollout.policy_lag: the stale weights rollouts sample with
    last_done = trainer.load(paths.checkpoint)
    if last_done >= 0:
        log.info("resuming after step %d from %s", last_done, paths.checkpoint)
        load_teacher_state(spec, paths, models)
        if models.policy_lag is not None:
            models.policy_lag.load(checkpoint_file(paths.checkpoint, LAG_FILE), paths.checkpoint, last_done)
    if trainer.is_main:
        paths.shards.mkdir(parents=True, exist_ok=True)
    fixed = FixedSet(paths, problems) if spec.scoring.rescore_step0 else None  # seed 000 exp. 3
    with rollout_engine(spec, models, paths):
        if last_done >= 0:  # the engine starts on the initial weights: serve the resumed ones
            sync_rollout_weights(spec, paths, models, last_done + 1)
        for step in range(last_done + 1, spec.train.steps + 1):
            metrics = train_step(spec, paths, models, problems, eval_problems, reference, initial_checksum, step,
                                 fixed=fixed)
            log.info("step %d/%d: %s", step, spec.train.steps, ", ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("seconds")))
    if spec.train.save_model:
        save_model(paths, models)
    return {"steps_done": spec.train.steps + 1, "initial_weights_sha256": initial_checksum}


def train_step(spec: Spec, paths: RunPaths, models: Models, problems: list[Problem],
               eval_problems: list[Problem], reference: torch.nn.Module | None, initial_checksum: str,
               step: int, fixed: FixedSet | None = None) -> dict[str, float]:
    """One step: collect at w_step, mask, update to w_{step+1}, record; then checkpoint and sync.
    `fixed`: step 0's rollouts, re-scored at w_step and recorded too (`scoring.rescore_step0`)."""
    trainer = models.trainer
    seed, steps = spec.seeds[0], spec.train.steps
    t0 = time.monotonic()
    step_plan = schedules.plan(spec.train, step)
    if models.policy_lag is not None:  # keep w_step: steps step .. step + k sample with it
        models.policy_lag.record(step, models.student.model)
    batch = step_problems(spec, problems, step)
    batch, teacher_sampled = split_on_policy(spec, batch, step)
    prefixes = (teacher_prefixes(spec, models, batch, step, step_plan.seed_tokens)
                if step_plan.seed_tokens > 0 and step < steps else None)
    items, metrics = collect_step(spec, models, batch, step, prefixes=prefixes) if batch else ([], {})
    if spec.rollout.policy_lag > 0 and items:  # the weights the rollouts were sampled with
        behaviour = items[0].weight_version if items[0].weight_version is not None else step
        metrics |= {"train/policy_lag": float(step - behaviour), "train/behaviour_version": float(behaviour)}
    fixed_items, fixed_metrics = fixed.measure(spec, models, items, step) if fixed is not None else ([], {})
    metrics |= fixed_metrics
    off_items: list[Item] = []
    if teacher_sampled:  # GKD's lambda < 1: these problems are the teacher's samples this step
        off_items, off_metrics = collect_teacher_completions(spec, models, teacher_sampled, step, seed_stream=5)
        metrics |= off_metrics
        step_plan = token_share_plan(items, off_items)
    elif step_plan.needs_teacher_completions and step < steps:
        if spec.train.method == "replay_buffer":  # a bounded, seeded sample of past problems
            off_items, off_metrics = collect_teacher_completions(
                spec, models, replay_problems(spec, problems, step), step, seed_stream=4)
            off_items = off_items[:spec.train.replay_size]
            off_metrics |= {"replay_sequences": float(len(off_items)),
                            "teacher_tokens": float(sum(len(it.student_seq[1]) for it in off_items))}
        else:  # fresh teacher completions of this step's problems
            off_items, off_metrics = collect_teacher_completions(spec, models, batch, step, seed_stream=3)
        metrics |= off_metrics
    if eval_due(spec, step):
        t_eval = time.monotonic()
        with current_weights_served(spec, paths, models, step):  # eval measures w_step, never lagged
            metrics |= evaluate(spec, models, eval_problems, step)
        metrics["eval_seconds"] = time.monotonic() - t_eval
    originals = [i for i, it in enumerate(items) if it.kind == "original"]
    weights = supervision_masks(spec, [items[i] for i in originals], models.student.tokenizer, step)
    for w, i in zip(weights, originals):  # teacher-written prefix tokens are not the student's
        w[:items[i].generation.num_prefix_tokens] = 0.0
        if not items[i].teacher_signal:  # nothing to teach from (demonstration context)
            w[:] = 0.0
    if step < steps:
        t_train = time.monotonic()
        metrics |= update(spec, models, trainer, [items[i] for i in originals], weights,
                          step_plan, off_items, reference)
        metrics["train_seconds"] = time.monotonic() - t_train
        update_teacher(spec, models)
    if trainer.is_main:  # every rank computed the same items; one writes them
        attrs = shard_attrs(spec, paths, models, step) | {"initial_weights_sha256": initial_checksum,
                                                          "method": spec.train.method}
        with ShardWriter(paths.shard(step), attrs=attrs, top_k=spec.scoring.top_k,
                         token_columns=shard_columns(spec)) as writer:
            write_items(writer, items + off_items + fixed_items, seed, step, models.student.tokenizer,
                        masks=dict(zip(originals, weights)), teacher_topk=spec.scoring.teacher_topk,
                        segment_newlines=spec.mask.segment_newlines)
            metrics["step_seconds"] = time.monotonic() - t0
            writer.add_metrics(step, metrics)
    if step < steps:
        if (step + 1) % spec.train.checkpoint_every == 0 or step == steps - 1:
            trainer.save(paths.checkpoint, step, extra=teacher_state_files(spec, models) |
                         policy_lag_files(models))  # rank 0 publishes
        sync_rollout_weights(spec, paths, models, step + 1)
    return metrics


def split_on_policy(spec: Spec, problems: list[Problem], step: int) -> tuple[list[Problem], list[Problem]]:
    """GKD's lambda (train.on_policy_fraction): (the student's problems, the teacher's) of a step.

    Each problem is the student's with probability lambda, drawn from (seed, step): TRL's GKD flips
    one coin per batch; one per problem gives the same expected mix with less variance. The last
    step only measures, so it is all the student's."""
    fraction = spec.train.on_policy_fraction
    if fraction >= 1.0 or step >= spec.train.steps:
        return problems, []
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, 9))
    on = rng.random(len(problems)) < fraction
    return [p for p, o in zip(problems, on) if o], [p for p, o in zip(problems, on) if not o]


def token_share_plan(items: list[Item], off_items: list[Item]) -> StepPlan:
    """On- and off-policy parts weighted by their token counts: the token mean over the whole
    mixed batch, as GKD averages over its batch."""
    on = sum(len(it.scores) * int(it.teacher_signal) for it in items if it.kind == "original")
    off = sum(len(it.student_seq[1]) for it in off_items)
    total = max(on + off, 1)
    return StepPlan(on / total, off / total)


def _ema_teacher(spec: Spec, models: Models) -> torch.nn.Module | None:
    """The EMA self-teacher's model, or None (live, frozen and trust-region teachers keep no state)."""
    return models.teacher.model if spec.teacher.weights == "ema" and models.teacher is not models.student else None


def update_teacher(spec: Spec, models: Models) -> None:
    """After an update: the EMA self-teacher moves toward the new student weights (every rank)."""
    if (teacher := _ema_teacher(spec, models)) is not None:
        teachers.ema_update(teacher, teachers.student_weights(models), spec.teacher.ema_rate)


def teacher_state_files(spec: Spec, models: Models) -> dict:
    """What the checkpoint keeps of the teacher: the EMA weights (the others are reproducible)."""
    teacher = _ema_teacher(spec, models)
    return {} if teacher is None else {teachers.EMA_FILE: lambda path: teachers.save_ema(path, teacher)}


def load_teacher_state(spec: Spec, paths: RunPaths, models: Models) -> None:
    if (teacher := _ema_teacher(spec, models)) is None:
        return
    path = checkpoint_file(paths.checkpoint, teachers.EMA_FILE)
    if path is None:
        raise LaunchError(f"{paths.checkpoint}: the checkpoint has no {teachers.EMA_FILE}, so the EMA "
                          "teacher cannot resume; remove the checkpoint folder to start the run again")
    teachers.load_ema(path, teacher)


def sync_rollout_weights(spec: Spec, paths: RunPaths, models: Models, version: int, lagged: bool = True) -> None:
    """After an update: the rollout engine serves the weights step `version` samples with: the new
    weights, or with rollout.policy_lag = k those of step max(0, version - k) (held by
    `models.policy_lag`, swapped in while the served folder is written); `lagged=False`: the
    current weights (version `version`) whatever the lag.

    Every rank calls (gathering sharded weights is collective); rank 0 owns the server."""
    if spec.rollout.backend != "vllm":
        return
    served = served_version(spec, version) if lagged else version
    swap = (models.policy_lag.swapped(models.student.model, served) if served != version
            else contextlib.nullcontext())
    with swap:
        directory = serve_student_weights(models, paths)
    server = models.rollout_server
    if server is None or directory is None:
        return
    seconds = server.load_weights(directory, served)
    log.info("rollout engine now serves weights version %d for step %d (%.1f s)", served, version, seconds)


def served_version(spec: Spec, step: int) -> int:
    """The weight version the rollout engine serves while step `step` samples (rollout.policy_lag;
    the last, measurement-only step samples with the final weights)."""
    return behaviour_version(step, spec.rollout.policy_lag, spec.train.steps)


@contextlib.contextmanager
def current_weights_served(spec: Spec, paths: RunPaths, models: Models, step: int):
    """Around step `step`'s eval: a vLLM server lagging behind (rollout.policy_lag) serves w_step
    for the eval, then the lagged version again; the in-process sampler evaluates w_step anyway."""
    lagging = spec.rollout.backend == "vllm" and served_version(spec, step) != step
    if lagging:
        sync_rollout_weights(spec, paths, models, step, lagged=False)
    try:
        yield
    finally:
        if lagging:
            sync_rollout_weights(spec, paths, models, step)


def policy_lag_files(models: Models) -> dict:
    """What the checkpoint keeps of the lag history (rollout.policy_lag > 0): its held versions."""
    lag = models.policy_lag
    return {} if lag is None else {LAG_FILE: lag.save}


def save_model(paths: RunPaths, models: Models) -> None:
    """The final student as a model directory another spec can name as model.student.

    Every rank calls (FSDP / ZeRO-3 gather the weights); rank 0 writes."""
    trainer = models.trainer
    state = trainer.full_state_dict() if trainer is not None and trainer.shards_parameters else None
    if trainer is not None and not trainer.is_main:
        return
    model = models.student.model
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapter into the weights
        model = model.merge_and_unload()
    architectures = getattr(model.config, "architectures", None)
    tmp = paths.staging(paths.model)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state)
    if state is not None:  # FSDP renames the class (FSDPLlamaForCausalLM); keep the loadable name
        model.config.architectures = architectures
        model.config.save_pretrained(tmp)
    models.student.tokenizer.save_pretrained(tmp)
    shutil.rmtree(paths.model, ignore_errors=True)
    os.replace(tmp, paths.model)
