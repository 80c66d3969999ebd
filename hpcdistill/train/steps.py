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
from hpcdistill.distill.schedules import StepPlan
from hpcdistill.distill.masks import build_masks
from hpcdistill.distill.segments import sentence_segments
from hpcdistill.launch.gpus import RoleDevices
from hpcdistill.launch.paths import RunPaths
from hpcdistill.models.scoring import response_hidden, _project
from hpcdistill.record import ShardWriter
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem
from hpcdistill.train.distributed import Trainer, TrainerConfig, build_trainer
from hpcdistill.train.loop import (Item, Models, collect_step, collect_teacher_completions, load_eval_problems,
                                   load_models, load_problems, shard_attrs, shard_columns, step_seed,
                                   rollout_engine, sample_student, serve_student_weights, teacher_prefixes,
                                   write_items)

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
    """Stage 6: per-token weights of each item (`[mask]`), with the release diagnostics logged."""
    lengths = [len(it.scores.student_lp) for it in items]
    kind = spec.mask.kind
    segments = advantages = teacher_lp = None
    if kind in ("release", "random_release", "std_release"):
        ids = [it.student_seq[1][:n] for it, n in zip(items, lengths)]
        segments = [sentence_segments([tokenizer.decode([t]) for t in seq]) for seq in ids]
        teacher_lp = [it.scores.teacher_at_student_topk_lp for it in items]
        advantages = [it.scores.teacher_lp - it.scores.student_lp for it in items]
    results = build_masks(kind, lengths, fraction=spec.mask.fraction, prefix_tokens=spec.mask.prefix_tokens,
                          rescale=spec.mask.rescale, teacher_lp_at_student_topk=teacher_lp,
                          segments=segments, advantages=advantages,
                          support_k=spec.mask.support_k or spec.scoring.top_k,
                          seed=spec.seeds[0] * 100_003 + step)
    return [r.weights for r in results]


def _student_logits(models: Models, items: list[Item], grad: bool) -> list[torch.Tensor]:
    """Student logits [T_i, V] at each item's response positions (with grad when training)."""
    handle = models.student
    lengths = [len(it.scores.student_lp) for it in items]
    with torch.set_grad_enabled(grad):
        hidden = response_hidden(handle, [it.student_seq for it in items], lengths)
        logits = _project(handle.model, hidden).float()
    return list(torch.split(logits, lengths))


def _teacher_logits(models: Models, items: list[Item]) -> list[torch.Tensor]:
    handle = models.teacher
    lengths = [len(it.scores.student_lp) for it in items]
    with torch.no_grad():
        hidden = response_hidden(handle, [it.teacher_seq for it in items], lengths)
        logits = _project(handle.model, hidden).float()
    return list(torch.split(logits, lengths))


def objective_loss(spec: Spec, models: Models, items: list[Item], weights: list[np.ndarray]
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 7: the loss of `train.objective` over the batch (one graph for the whole batch)."""
    train = spec.train
    device = models.student.device
    w = torch.as_tensor(np.concatenate(weights), dtype=torch.float32, device=device)  # [N]
    name = train.objective
    logits = _student_logits(models, items, grad=True)
    student_logits = torch.cat(logits)  # [N, V]
    if name == "topk_kl":
        ids = torch.as_tensor(np.concatenate([it.scores.student_topk_ids for it in items]),
                              dtype=torch.long, device=device)
        teacher = torch.as_tensor(np.concatenate([it.scores.teacher_at_student_topk_lp for it in items]),
                                  device=device)
        return _metrics(*objectives.topk_kl_loss(student_logits, ids, teacher, w))
    if name in ("full_reverse_kl", "full_forward_kl", "jsd"):
        teacher_logits = torch.cat(_teacher_logits(models, items))
        if name == "jsd":
            return _metrics(*objectives.jsd_loss(student_logits, teacher_logits, w, beta=train.beta))
        direction = "reverse" if name == "full_reverse_kl" else "forward"
        return _metrics(*objectives.full_kl_loss(student_logits, teacher_logits, w, direction=direction))
    ids = torch.as_tensor(np.concatenate([it.student_seq[1][:len(it.scores.student_lp)] for it in items]),
                          dtype=torch.long, device=device)
    student_lp = torch.log_softmax(student_logits, -1).gather(-1, ids[:, None])[:, 0]  # [N]
    teacher_lp = torch.as_tensor(np.concatenate([it.scores.teacher_lp for it in items]), device=device)
    sampler_lp = torch.as_tensor(np.concatenate(
        [it.generation.sampler_lp[:len(it.scores.student_lp)] for it in items]), device=device)
    if name == "opd":
        return _metrics(*objectives.opd_advantage_loss(student_lp, teacher_lp, w, sampler_lp=sampler_lp))
    if name == "exopd":
        return _metrics(*objectives.exopd_advantage_loss(student_lp, teacher_lp, w, alpha=train.exopd_alpha,
                                                         sampler_lp=sampler_lp))
    if name == "context_distill":
        seq_index = torch.as_tensor(np.concatenate(
            [np.full(len(it.scores.student_lp), i) for i, it in enumerate(items)]), device=device)
        problem_ids = sorted({it.problem.problem_id for it in items})
        group_index = torch.as_tensor([problem_ids.index(it.problem.problem_id) for it in items], device=device)
        reward = torch.as_tensor([it.verdict.reward for it in items], dtype=torch.float32, device=device)
        return _metrics(*objectives.context_distill_loss(
            student_lp, sampler_lp, teacher_lp, reward, seq_index, group_index,
            adv_tau=train.adv_tau, teacher_tau=train.teacher_tau, student_tau=train.student_tau,
            use_full_reward_baseline=train.use_full_reward_baseline,
            token_mask_low=train.token_mask_low, token_mask_high=train.token_mask_high, weights=w))
    raise NotImplementedError(f"train.objective = {name!r} needs off-policy teacher completions, "
                              "which the on-policy loop does not produce")


def _metrics(loss: torch.Tensor, named: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    return loss, {f"train/{k}": float(v) for k, v in named.items()}


def off_policy_loss(spec: Spec, models: Models, items: list[Item], reference: torch.nn.Module | None,
                    kl_beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT on teacher completions under the student's prompt, plus the optional KL anchor."""
    device = models.student.device
    lengths = [len(it.student_seq[1]) for it in items]
    logits = torch.cat(_student_logits(models, items, grad=True))  # [N, V]
    targets = torch.as_tensor([t for it in items for t in it.student_seq[1]], dtype=torch.long, device=device)
    weights = torch.ones(sum(lengths), device=device)
    loss, named = objectives.sft_loss(logits, targets, weights)
    metrics = {f"train/off_{k}": float(v) for k, v in named.items()}
    if kl_beta > 0 and reference is not None:
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
    on_mine, on_share = trainer.shard([len(w) for w in weights], groups=[it.problem.problem_id for it in items])
    off_mine, off_share = trainer.shard([len(it.student_seq[1]) for it in off_items],
                                        groups=[it.problem.problem_id for it in off_items])

    def loss_fn() -> tuple[torch.Tensor, dict[str, float]]:
        loss = torch.zeros((), device=models.student.device)
        metrics: dict[str, float] = {}
        if on:
            on_loss, named = objective_loss(spec, models, [items[i] for i in on_mine], [weights[i] for i in on_mine])
            loss = loss + step_plan.on_policy_weight * on_share * on_loss
            metrics |= trainer.reduce_metrics(named, on_share)
        if off:
            off_loss, named = off_policy_loss(spec, models, [off_items[i] for i in off_mine], reference,
                                              step_plan.kl_anchor_beta)
            loss = loss + step_plan.off_policy_weight * off_share * off_loss
            metrics |= trainer.reduce_metrics(named, off_share)
        return loss, metrics

    metrics = trainer.step(loss_fn)  # + train/loss_total, train/grad_norm (before clipping)
    metrics.update({"train/lr": spec.train.lr, "train/on_policy_weight": step_plan.on_policy_weight,
                    "train/off_policy_weight": step_plan.off_policy_weight,
                    "train/seed_tokens": float(step_plan.seed_tokens),
                    "train/supervised_tokens": float(sum(float((w > 0).sum()) for w in weights))})
    return metrics


# ---------------------------------------------------------------------------- eval


def evaluate(spec: Spec, models: Models, problems: list[Problem], step: int) -> dict[str, float]:
    """Stage 8: accuracy of the student alone (no teacher context) at each eval temperature."""
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
    """The problems of one step: all, or `train.problems_per_step` drawn without replacement."""
    count = spec.train.problems_per_step
    if count is None or count >= len(problems):
        return problems
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, 7))
    return [problems[i] for i in sorted(rng.choice(len(problems), size=count, replace=False))]


# ---------------------------------------------------------------------------- the loop


def run_training(spec: Spec, paths: RunPaths, roles: RoleDevices) -> dict[str, Any]:
    """Every step of the run not yet done, on one process or as one rank of several (docs/trainer.md):
    every rank runs the whole loop; rank 0 alone writes shards, checkpoint metadata and the model."""
    problems = load_problems(spec)
    eval_problems = load_eval_problems(spec, problems)
    models = load_models(spec, roles)
    torch.manual_seed(spec.seeds[0])
    initial_checksum = weights_checksum(models.student.model)  # ablation arms start identical
    # kl_anchored needs the initial student beside the trained one (seed 003, finding 4).
    reference = copy.deepcopy(models.student.model).eval() if spec.train.method == "kl_anchored" else None
    apply_lora(spec, models)
    trainer = build_trainer(TrainerConfig.from_spec(spec), models.student.model)
    models.student.model = trainer.model  # the teacher "same" is the same handle: it follows
    models.trainer = trainer
    last_done = trainer.load(paths.checkpoint)
    if last_done >= 0:
        log.info("resuming after step %d from %s", last_done, paths.checkpoint)
    if trainer.is_main:
        paths.shards.mkdir(parents=True, exist_ok=True)
    with rollout_engine(spec, models, paths):
        if last_done >= 0:  # the engine starts on the initial weights: serve the resumed ones
            sync_rollout_weights(spec, paths, models, last_done + 1)
        for step in range(last_done + 1, spec.train.steps + 1):
            metrics = train_step(spec, paths, models, problems, eval_problems, reference, initial_checksum, step)
            log.info("step %d/%d: %s", step, spec.train.steps, ", ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("seconds")))
    if spec.train.save_model:
        save_model(paths, models)
    return {"steps_done": spec.train.steps + 1, "initial_weights_sha256": initial_checksum}


def train_step(spec: Spec, paths: RunPaths, models: Models, problems: list[Problem],
               eval_problems: list[Problem], reference: torch.nn.Module | None, initial_checksum: str,
               step: int) -> dict[str, float]:
    """One step: collect at w_step, mask, update to w_{step+1}, record; then checkpoint and sync."""
    trainer = models.trainer
    seed, steps = spec.seeds[0], spec.train.steps
    t0 = time.monotonic()
    step_plan = schedules.plan(spec.train, step)
    batch = step_problems(spec, problems, step)
    prefixes = (teacher_prefixes(spec, models, batch, step, step_plan.seed_tokens)
                if step_plan.seed_tokens > 0 and step < steps else None)
    items, metrics = collect_step(spec, models, batch, step, prefixes=prefixes)
    off_items: list[Item] = []
    if step_plan.needs_teacher_completions and step < steps:
        # replay_buffer replays one stored batch (the step-0 draw of stream 4, regenerated
        # identically from its seed); the other methods take fresh teacher completions.
        stored = spec.train.method == "replay_buffer"
        off_items, off_metrics = collect_teacher_completions(
            spec, models, problems if stored else batch, 0 if stored else step,
            seed_stream=4 if stored else 3)
        metrics |= off_metrics
    if eval_due(spec, step):
        t_eval = time.monotonic()
        metrics |= evaluate(spec, models, eval_problems, step)
        metrics["eval_seconds"] = time.monotonic() - t_eval
    originals = [i for i, it in enumerate(items) if it.kind == "original"]
    weights = supervision_masks(spec, [items[i] for i in originals], models.student.tokenizer, step)
    for w, i in zip(weights, originals):  # teacher-written prefix tokens are not the student's
        w[:items[i].generation.num_prefix_tokens] = 0.0
    if step < steps:
        t_train = time.monotonic()
        metrics |= update(spec, models, trainer, [items[i] for i in originals], weights,
                          step_plan, off_items, reference)
        metrics["train_seconds"] = time.monotonic() - t_train
    if trainer.is_main:  # every rank computed the same items; one writes them
        attrs = shard_attrs(spec, paths, models, step) | {"initial_weights_sha256": initial_checksum,
                                                          "method": spec.train.method}
        with ShardWriter(paths.shard(step), attrs=attrs, top_k=spec.scoring.top_k,
                         token_columns=shard_columns(spec)) as writer:
            write_items(writer, items + off_items, seed, step, models.student.tokenizer,
                        masks=dict(zip(originals, weights)))
            metrics["step_seconds"] = time.monotonic() - t0
            writer.add_metrics(step, metrics)
    if step < steps:
        if (step + 1) % spec.train.checkpoint_every == 0 or step == steps - 1:
            trainer.save(paths.checkpoint, step)  # every rank; rank 0 publishes the folder
        sync_rollout_weights(spec, paths, models, step + 1)
    return metrics


def sync_rollout_weights(spec: Spec, paths: RunPaths, models: Models, version: int) -> None:
    """After an update: the rollout engine serves the new weights, as version `version`.

    Every rank calls (gathering sharded weights is collective); rank 0 owns the server."""
    if spec.rollout.backend != "vllm":
        return
    directory = serve_student_weights(models, paths)
    server = models.rollout_server
    if server is None or directory is None:
        return
    seconds = server.load_weights(directory, version)
    log.info("rollout engine now serves weights version %d (%.1f s)", version, seconds)


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
    tmp = paths.root / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state)
    if state is not None:  # FSDP renames the class (FSDPLlamaForCausalLM); keep the loadable name
        model.config.architectures = architectures
        model.config.save_pretrained(tmp)
    models.student.tokenizer.save_pretrained(tmp)
    shutil.rmtree(paths.model, ignore_errors=True)
    os.replace(tmp, paths.model)
