"""`hpcdistill plan spec.toml`: a step's micro-batches and the trainer memory they need, on the CPU,
before anything is submitted (docs/trainer.md, "Micro-batches").

The step is planned at its worst case: every problem of a step (`train.problems_per_step`, else
`task.num_problems`) x `rollout.samples_per_problem` rollouts, each response `rollout.max_new_tokens`
long after a prompt of `prompt_tokens`; the batch split over the trainer ranks as `Trainer.shard`
does, then packed as `train.microbatch` packs it. The memory per trainer GPU is an estimate from
the model's shape (a Llama/Qwen decoder: the tensors its backward keeps, not a measurement; see
bench/train_memory.py for measured peaks), beside what today's step would need without
micro-batches (the whole batch's [N, V] logits, issue 17's baseline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hpcdistill.errors import UserError
from hpcdistill.spec.schema import Spec
from hpcdistill.spec.teacher_rules import teacher_placement
from hpcdistill.train.microbatch import MicroBatch, plan_micro_batches
from hpcdistill.train.trainer_base import shard_indices

GB = 1024 ** 3


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    params: float  # total parameters (a mixture of experts counts every expert)


# Public config.json figures of the models the shipped configs name (params rounded).
KNOWN_SHAPES = {
    "bundled:smollm2-135m-instruct": ModelShape(49_152, 576, 30, 1536, 0.135e9),
    "Qwen/Qwen3-1.7B": ModelShape(151_936, 2048, 28, 6144, 2.03e9),
    "Qwen/Qwen3-4B": ModelShape(151_936, 2560, 36, 9728, 4.02e9),
    "Qwen/Qwen3-4B-Instruct-2507": ModelShape(151_936, 2560, 36, 9728, 4.02e9),
    "Qwen/Qwen3-8B": ModelShape(151_936, 4096, 36, 12288, 8.19e9),
    "Qwen/Qwen3-30B-A3B-Instruct-2507": ModelShape(151_936, 2048, 48, 768, 30.5e9),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(128_256, 4096, 32, 14336, 8.03e9),
    "meta-llama/Llama-3.3-70B-Instruct": ModelShape(128_256, 8192, 80, 28672, 70.6e9),
}


def model_shape(model_id: str, config_file: str | None = None) -> ModelShape:
    """The shape of `model_id`: from a config.json given, or the model's own directory, else the
    table above; a model none of them knows is a UserError naming `--model-config`."""
    path = Path(config_file) if config_file else Path(model_id) / "config.json"
    if path.is_file():
        c = json.loads(path.read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        attention = h * head_dim * (2 * c["num_attention_heads"] + 2 * c.get("num_key_value_heads",
                                                                             c["num_attention_heads"]))
        embeddings = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
        return ModelShape(c["vocab_size"], h, n, i, float(embeddings + n * (attention + 3 * h * i)))
    if config_file:
        raise UserError(f"--model-config {config_file}: no such file")
    if model_id in KNOWN_SHAPES:
        return KNOWN_SHAPES[model_id]
    raise UserError(f"key 'model.student' / 'model.teacher' = {model_id!r}: its shape is unknown here; pass "
                    f"--model-config with its config.json (known: {', '.join(sorted(KNOWN_SHAPES))})")


@dataclass(frozen=True)
class StepMemoryPlan:
    items: int  # the step's rollouts (all ranks)
    ranks: int
    response_tokens: int  # per rank
    micro_batches: list[MicroBatch]  # of rank 0 (the most loaded)
    parts_gb: dict[str, float]  # per trainer GPU: the micro-batched step
    whole_batch_gb: dict[str, float]  # the same step without micro-batches (issue 17's baseline)


def plan_step(spec: Spec, student: ModelShape, teacher: ModelShape | None, prompt_tokens: int) -> StepMemoryPlan:
    problems = spec.train.problems_per_step or spec.task.num_problems
    items = problems * spec.rollout.samples_per_problem
    response = spec.rollout.max_new_tokens
    ranks = max(spec.launch.gpus.trainer, 1) * spec.launch.nodes if spec.trainer.strategy != "single" else 1
    mine, _ = shard_indices([response] * items, 0, ranks, groups=[i // spec.rollout.samples_per_problem
                                                                  for i in range(items)])
    batches = plan_micro_batches([prompt_tokens + response - 1] * len(mine), spec.trainer.micro_batch_tokens)
    tokens = len(mine) * response
    common = _state_gb(spec, student, teacher, ranks)
    largest = max((b.padded_tokens for b in batches), default=0)
    full = spec.train.support == "full"
    parts = {**common, "activations": _activations_gb(spec, student, largest),
             "logits / loss": _head_gb(student.vocab, min(spec.scoring.chunk_size, largest), full)}
    whole = {**common, "activations": _activations_gb(spec, student, len(mine) * (prompt_tokens + response)),
             "logits / loss": _head_gb(student.vocab, tokens, full)}
    return StepMemoryPlan(items, ranks, tokens, batches, parts, whole)


def _bytes(spec: Spec) -> int:
    return 4 if spec.model.dtype in ("float32", "auto") else 2


def _state_gb(spec: Spec, student: ModelShape, teacher: ModelShape | None, ranks: int) -> dict[str, float]:
    """Weights, gradients and AdamW state of the student, and the teacher's weights where the
    teacher runs inside every trainer rank (not when it has its own role: `teacher_placement`), per GPU."""
    b, p = _bytes(spec), student.params
    strategy, stage = spec.trainer.strategy, spec.trainer.zero_stage
    if strategy == "deepspeed":  # fp32 master weights and moments, partitioned from stage 1
        weights, grads, optimizer = p * b / (ranks if stage == 3 else 1), p * b / (ranks if stage >= 2 else 1), \
            12 * p / ranks
    elif strategy == "fsdp":
        weights, grads, optimizer = p * b / ranks, p * b / ranks, 2 * p * b / ranks
    else:  # torch AdamW keeps its moments in the parameters' dtype
        weights, grads, optimizer = p * b, p * b, 2 * p * b
    out = {"weights": weights / GB, "gradients": grads / GB, "optimizer": optimizer / GB}
    if teacher is not None and teacher_placement(spec) == "trainer":
        out["teacher weights"] = teacher.params * b / GB
    return out


def _activations_gb(spec: Spec, shape: ModelShape, tokens: int) -> float:
    """What one decoder forward of `tokens` keeps for backward: per token and layer about 12 hidden
    and 4 intermediate values (attention by SDPA, no [L, L] scores); with gradient checkpointing
    each layer's input, plus one layer's full set while it is recomputed."""
    per_layer = (12 * shape.hidden + 4 * shape.intermediate) * _bytes(spec)
    if spec.trainer.gradient_checkpointing:
        return tokens * (shape.layers * shape.hidden * _bytes(spec) + per_layer) / GB
    return tokens * shape.layers * per_layer / GB


def _head_gb(vocab: int, rows: int, full_support: bool) -> float:
    """float32 [rows, V] tensors alive at the loss: logits, log-softmax, their gradient (+2 for the
    teacher's logits and log-softmax of the full support)."""
    return rows * vocab * 4 * (5 if full_support else 3) / GB


def format_plan(run_id: str, spec: Spec, plan: StepMemoryPlan, prompt_tokens: int) -> str:
    batches = plan.micro_batches
    over = sum(b.over_budget for b in batches)
    lines = [f"{run_id}: {spec.model.student}, {plan.items} rollouts a step ({plan.ranks} trainer rank"
             f"{'s' if plan.ranks > 1 else ''}), responses up to {spec.rollout.max_new_tokens:,} tokens after "
             f"~{prompt_tokens:,}-token prompts: {plan.response_tokens:,} response tokens on rank 0",
             f"  {len(batches)} micro-batches of <= {spec.trainer.micro_batch_tokens:,} forward tokens "
             f"(trainer.micro_batch_tokens), {max((b.rows for b in batches), default=0)} rows each at most"
             + (f"; {over} over budget (one item longer than it)" if over else ""),
             f"  {'memory per trainer GPU (GB, estimate)':<40}{'micro-batched':>14}{'whole batch':>14}"]
    for key in plan.parts_gb:
        lines.append(f"  {key:<40}{plan.parts_gb[key]:>14.1f}{plan.whole_batch_gb[key]:>14.1f}")
    lines.append(f"  {'total':<40}{sum(plan.parts_gb.values()):>14.1f}{sum(plan.whole_batch_gb.values()):>14.1f}")
    return "\n".join(lines)


__all__ = ["ModelShape", "KNOWN_SHAPES", "model_shape", "StepMemoryPlan", "plan_step", "format_plan"]
