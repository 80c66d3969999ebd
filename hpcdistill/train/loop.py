"""The loop of one run (DESIGN.md section 2), one step at a time, stage modules below it:

For step = 0 .. train.steps:
    collect   rollout -> feedback -> teacher context -> scoring at the current weights w_step  (train.collect)
    mask      supervision weights per token (`[mask]`)                                         (train.update)
    update    objective -> backward -> clip -> AdamW       (not after the last step)            (train.update)
    record    the step's shard, written atomically                                             (train.recording)
    report    rank 0: the step's metrics to `[log]` (metrics.jsonl, TensorBoard, W&B)          (train.tracking)
              then the checkpoint of w_{step+1}

A measurement is the same loop with train.steps = 0: step 0 alone, collected and recorded with no
trainer, no masks and no eval; a requeued measurement skips the run when its shard exists.

The update goes through `train.distributed`'s trainer (`[trainer]`: single, DeepSpeed ZeRO or
FSDP2): over several ranks every rank runs this loop, trains on its shard of the batch, and rank 0
alone writes shards and the model (docs/trainer.md).

So shard k holds the rollouts and KLs measured at weights w_k (seed 000 experiment 3 measures
after every step), and the update they drove. Order on disk: shard k first, then the checkpoint
after step k. A task killed between the two redoes step k on resume; sampling is seeded by
(seed, step), so it rewrites the same shard: no step is missing or duplicated.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from collections.abc import Callable
from typing import Any

import torch

from hpcdistill.devices import RoleDevices
from hpcdistill.distill import schedules
from hpcdistill.record import ShardWriter
from hpcdistill.rundir import RunPaths
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem, get_task
from hpcdistill.train.benchmarks import eval_set, evaluate_benchmarks, load_benchmarks
from hpcdistill.train.collect import (ScoredRollout, Scorer, Verifier, collect_step, collect_teacher_completions,
                                      load_problems, replay_problems, step_problems, teacher_prefixes)
from hpcdistill.train.distributed import build_trainer
from hpcdistill.train.fixed_set import FixedSet
from hpcdistill.train.policy_lag import LAG_FILE, make_policy_lag
from hpcdistill.train.recording import shard_attrs, shard_columns, write_rollouts
from hpcdistill.train.roles import (Models, apply_lora, check_parity, current_weights_served, load_models,
                                    load_teacher_state, policy_lag_files, rollout_engine,
                                    save_model, sync_rollout_weights, teacher_state_files, update_teacher,
                                    weights_checksum)
from hpcdistill.train.seeds import SeedStream, eval_stream, step_seed
from hpcdistill.train.teacher_role import teacher_engine
from hpcdistill.train.tracking import Tracker
from hpcdistill.train.trainer_base import TrainerConfig
from hpcdistill.train.trainer_checkpoint import checkpoint_file
from hpcdistill.train.update import (initial_reference, split_on_policy, supervision_masks, token_share_plan,
                                     update)

log = logging.getLogger(__name__)


def run_training(spec: Spec, paths: RunPaths, roles: RoleDevices,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Every step of the run not yet done, on one process or as one rank of several (docs/trainer.md):
    every rank runs the whole loop; rank 0 alone writes shards, checkpoint metadata and the model.
    train.steps = 0 (a measurement): step 0 alone, without a trainer; skipped when its shard exists."""
    problems = load_problems(spec)
    training = spec.train.steps > 0
    if not training and paths.shard(0).exists():
        log.info("step 0 already recorded in %s; skipping", paths.shard(0))
        return {"steps_done": 1, "skipped": [0]}
    eval_problems = load_eval_problems(spec, problems) if training else []
    models = load_models(spec, roles)  # a self-teacher copy is made here, before any wrapping
    check_parity(spec, models, problems)
    reference, initial_checksum, last_done = start_training(spec, paths, models) if training else (None, None, -1)
    if models.is_main:
        paths.shards.mkdir(parents=True, exist_ok=True)
    fixed = FixedSet(paths, problems) if spec.scoring.rescore_step0 else None  # seed 000 exp. 3
    verifier, scorer = Verifier.of(spec), Scorer.of(spec, models.student.tokenizer)  # bound once per run
    # rank 0 alone reports each step to `[log]`'s backends (closed, as failed, on an exception too)
    with rollout_engine(spec, models, paths), teacher_engine(spec, models, paths, roles), \
            (Tracker.open(spec, paths, last_done + 1) if models.is_main else nullcontext()) as tracker:
        if last_done >= 0:  # the engine starts on the initial weights: serve the resumed ones
            sync_rollout_weights(spec, paths, models, last_done + 1)
        for step in range(last_done + 1, spec.train.steps + 1):
            if should_stop is not None and should_stop():  # the task was requeued (worker.WorkerTask)
                log.warning("stopping before step %d: this task was requeued", step)
                raise SystemExit(-1)
            metrics = train_step(spec, paths, models, problems, eval_problems, reference, initial_checksum, step,
                                 fixed=fixed, verifier=verifier, scorer=scorer, tracker=tracker)
            log.info("step %d/%d: %s", step, spec.train.steps, ", ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("seconds")))
    if not training:
        return {"steps_done": 1, "metrics": metrics}
    if spec.train.save_model:
        save_model(paths, models)
    return {"steps_done": spec.train.steps + 1, "initial_weights_sha256": initial_checksum}


def start_training(spec: Spec, paths: RunPaths, models: Models) -> tuple[torch.nn.Module | None, str, int]:
    """The trainer around the student, and what a resume restores; returns (the frozen reference
    model or None, the initial weights' checksum, the last step done: -1 on a fresh start)."""
    torch.manual_seed(spec.seeds[0])
    initial_checksum = weights_checksum(models.student.model)  # ablation arms start identical
    reference = initial_reference(spec, models)
    apply_lora(spec, models)
    if spec.trainer.gradient_checkpointing:  # HF recomputes each layer in backward (training mode only)
        models.student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    return reference, initial_checksum, last_done


def train_step(spec: Spec, paths: RunPaths, models: Models, problems: list[Problem],
               eval_problems: list[Problem], reference: torch.nn.Module | None, initial_checksum: str | None,
               step: int, fixed: FixedSet | None = None, *, verifier: Verifier | None = None,
               scorer: Scorer | None = None, tracker: Tracker | None = None) -> dict[str, float]:
    """One step: collect at w_step, mask, update to w_{step+1}, record; then checkpoint and sync.
    `fixed`: step 0's rollouts, re-scored at w_step and recorded too (`scoring.rescore_step0`).
    `tracker` (rank 0): the step's metrics to `[log]`'s backends, once its shard is written.
    A measurement (train.steps = 0, `initial_checksum` None) records no supervision masks, step
    time, method or checksum: its shard is what it measured."""
    trainer = models.trainer
    seed, steps = spec.seeds[0], spec.train.steps
    training = steps > 0
    verifier, scorer = verifier or Verifier.of(spec), scorer or Scorer.of(spec, models.student.tokenizer)
    t0 = time.monotonic()
    step_plan = schedules.plan(spec.train, step)
    if models.policy_lag is not None:  # keep w_step: steps step .. step + k sample with it
        models.policy_lag.record(step, models.student.model)
    scored_before, role_before = scorer.counts["teacher_tokens"], _teacher_role_tokens(models)
    batch = step_problems(spec, problems, step)
    batch, teacher_sampled = split_on_policy(spec, batch, step)
    prefixes = (teacher_prefixes(spec, models, batch, step, step_plan.seed_tokens)
                if step_plan.seed_tokens > 0 and step < steps else None)
    items, metrics = (collect_step(spec, models, batch, step, prefixes=prefixes, verifier=verifier, scorer=scorer)
                      if batch else ([], {}))
    if spec.rollout.policy_lag > 0 and training and items:  # the weights the rollouts were sampled with
        behaviour = items[0].weight_version if items[0].weight_version is not None else step
        metrics |= {"train/policy_lag": float(step - behaviour), "train/behaviour_version": float(behaviour)}
    fixed_items, fixed_metrics = fixed.measure(spec, models, items, step, scorer) if fixed is not None else ([], {})
    metrics |= fixed_metrics
    off_items, off_metrics = off_policy_items(spec, models, problems, batch, teacher_sampled, step, step_plan,
                                              verifier, scorer)
    metrics |= off_metrics
    metrics["scoring/teacher_tokens"] = _over_ranks(models, scorer.counts["teacher_tokens"] - scored_before)
    if role_before is not None:  # what the teacher role itself counted (every rank's requests; rank 0)
        metrics["teacher_role/scored_tokens"] = float(_teacher_role_tokens(models) - role_before)
    if teacher_sampled:  # GKD's lambda < 1: the step's on- and off-policy parts by their token shares
        step_plan = token_share_plan(items, off_items)
    if eval_due(spec, step):
        t_eval = time.monotonic()
        with current_weights_served(spec, paths, models, step):  # eval measures w_step, never lagged
            metrics |= evaluate(spec, models, eval_problems, step, verifier)
        metrics["eval_seconds"] = time.monotonic() - t_eval
    originals = [i for i, it in enumerate(items) if it.kind == "original"]
    weights = supervision_masks(spec, [items[i] for i in originals], models.student.tokenizer, step) \
        if training else []
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
    if models.is_main:  # every rank computed the same items; one writes them
        attrs = shard_attrs(spec, paths, models, step)
        if training:
            attrs |= {"initial_weights_sha256": initial_checksum, "method": spec.train.method}
        with ShardWriter(paths.shard(step), attrs=attrs, top_k=spec.scoring.top_k,
                         token_columns=shard_columns(spec)) as writer:
            write_rollouts(writer, items + off_items + fixed_items, seed, step, models.student.tokenizer,
                           masks=dict(zip(originals, weights)), teacher_topk=spec.scoring.teacher_topk,
                           segment_newlines=spec.mask.segment_newlines)
            if training:
                metrics["step_seconds"] = time.monotonic() - t0
            writer.add_metrics(step, metrics)
        if tracker is not None:
            tracker.log(step, metrics)
    if step < steps:
        if (step + 1) % spec.train.checkpoint_every == 0 or step == steps - 1:
            trainer.save(paths.checkpoint, step, extra=teacher_state_files(spec, models) |
                         policy_lag_files(models))  # rank 0 publishes
        sync_rollout_weights(spec, paths, models, step + 1)
    return metrics


def _teacher_role_tokens(models: Models) -> int | None:
    """The tokens the teacher role has scored so far, by its own count (rank 0; None without one)."""
    service = models.teacher_service
    if service is None or not models.is_main:
        return None
    return int(service.status()["scored_tokens"]) if hasattr(service, "status") else int(service.scored_tokens)


def _over_ranks(models: Models, value: float) -> float:
    """A per-process count summed over the trainer ranks (every rank calls)."""
    if models.world_size == 1:
        return float(value)
    return float(models.trainer.all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64))[0])


def off_policy_items(spec: Spec, models: Models, problems: list[Problem], batch: list[Problem],
                     teacher_sampled: list[Problem], step: int, step_plan: schedules.StepPlan,
                     verifier: Verifier, scorer: Scorer) -> tuple[list[ScoredRollout], dict[str, float]]:
    """The step's teacher completions, if its method trains on any: GKD's teacher-dealt problems,
    replay_buffer's seeded sample of past problems, or fresh completions of this step's problems."""
    bound = dict(verifier=verifier, scorer=scorer)
    if teacher_sampled:  # GKD's lambda < 1: these problems are the teacher's samples this step
        return collect_teacher_completions(spec, models, teacher_sampled, step, SeedStream.GKD_TEACHER, **bound)
    if not step_plan.needs_teacher_completions or step >= spec.train.steps:
        return [], {}
    if spec.train.method == "replay_buffer":  # a bounded, seeded sample of past problems
        off_items, off_metrics = collect_teacher_completions(
            spec, models, replay_problems(spec, problems, step), step, SeedStream.REPLAY, **bound)
        off_items = off_items[:spec.train.replay_size]
        return off_items, off_metrics | {"replay_sequences": float(len(off_items)),
                                         "teacher_tokens": float(sum(len(it.student_seq[1]) for it in off_items))}
    return collect_teacher_completions(spec, models, batch, step, SeedStream.TEACHER_COMPLETIONS, **bound)


# ---------------------------------------------------------------------------- eval


def load_eval_problems(spec: Spec, train_problems: list[Problem]) -> list[Problem] | dict[str, list[Problem]]:
    """The single eval set, or {benchmark name: problems} with eval.benchmarks (seed 002)."""
    if spec.eval.benchmarks:
        return load_benchmarks(spec)
    if spec.eval.split is None:
        return train_problems[:spec.eval.num_problems or len(train_problems)]
    task = get_task(spec.task.name)
    return task.load_problems(source=spec.task.source, split=spec.eval.split,
                              num_problems=spec.eval.num_problems or spec.task.num_problems, seed=0)


def eval_due(spec: Spec, step: int) -> bool:
    """At step 0, every eval.every steps and the last; a measurement (train.steps = 0) never evaluates."""
    every = spec.eval.every
    return spec.train.steps > 0 and every > 0 and (step % every == 0 or step == spec.train.steps)


def evaluate(spec: Spec, models: Models, problems: list[Problem] | dict[str, list[Problem]],
             step: int, verifier: Verifier | None = None) -> dict[str, float]:
    """Stage 8: accuracy of the student alone (no teacher context) at each eval temperature;
    with eval.benchmarks, `problems` is {benchmark: problems} (hpcdistill.train.benchmarks)."""
    verifier = verifier or Verifier.of(spec)
    if spec.eval.benchmarks:
        return evaluate_benchmarks(spec, models, problems, step, verifier)
    metrics = {}
    for index, temperature in enumerate(spec.eval.temperatures):
        reward, passed = eval_set(spec, models, verifier, problems,
                                  seed=step_seed(spec.seeds[0], step, eval_stream(index)),
                                  temperature=temperature, samples=spec.eval.samples)
        metrics[f"eval/reward@{temperature:g}"] = reward
        metrics[f"eval/passed@{temperature:g}"] = passed
    return metrics


__all__ = ["run_training", "train_step", "evaluate", "load_eval_problems", "eval_due"]
