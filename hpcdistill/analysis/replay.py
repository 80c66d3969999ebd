"""Loss replay: recompute distillation losses on the tokens a sweep recorded, without sampling.

`hpcdistill replay SWEEP_DIR --set train.divergence=forward` takes every step shard of every run,
rebuilds the batch the step trained on (the student's own rollouts, their supervision weights
and the log-probs scoring recorded), and computes, for the run's own loss ("as trained") and for
each variant, the loss of the step and two numbers per token:

    term   l_t c_t, the token's loss term before its weight (what `tokens/train_loss` records)
    grad   || d(w_t l_t c_t) / d z_t ||_1, the L1 norm of the token's weighted term's gradient
           with respect to the student's logits z_t at that position: how hard the token pulls

The gradient is exact from recorded data: a top-k support is a categorical over its entries (plus
the tail bucket), a sampled token over {y_t, the rest}; replay makes those bucket log-probs leaf
tensors, and since the loss depends on z_t only through them, the L1 norm over the buckets is the
L1 norm over the vocabulary (within the tail every logit's gradient has the same sign). The same
`distill.loss` code that trained computes it, so replaying a run's own loss reproduces the loss
it logged (`train/loss`) up to float rounding.

Full-vocabulary variants need both models' whole distributions, which shards do not store: replay
re-scores the recorded tokens with the models, which is possible for rollouts sampled with the
initial weights (step 0, and measurement runs); later steps' weights are gone and are refused.
Keys that would change the tokens or the teacher's values (rollout, teacher context or weights,
models) cannot be replayed: that is a new run.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdistill.distill.loss import (DistillInputs, LossConfig, bucket_log_probs, distill_loss, support_columns,
                                     support_ids, topk_buckets, with_tail)
from hpcdistill.distill.masks import spec_masks
from hpcdistill.errors import SpecError
from hpcdistill.models.loading import ModelHandle, load_model_id
from hpcdistill.models.scoring import TeacherLogits, project, response_hidden
from hpcdistill.record import iter_shards
from hpcdistill.spec.load import SET_ORIGIN, parse_override, set_dotted, validate
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)

REPLAYABLE = ("train.support", "train.divergence", "train.beta", "train.topk_support",
              "train.topk_normalization", "train.estimator", "train.sampled_use", "train.gamma",
              "train.is_clip", "mask.")
BASELINE = "as trained"


class Unreplayable(SpecError):
    """One step cannot be replayed under a variant (its weights are gone); the others can."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]


def parse_variants(sets: list[str] | None, variants: list[str] | None) -> list[Variant]:
    """`--set K=V ...` is one variant; each `--variant "K=V K=V"` is another. Keys must be replayable."""
    groups = ([list(sets)] if sets else []) + [item.split() for item in (variants or [])]
    if not groups:
        raise SpecError("replay: nothing to compare with the run's own loss; give --set KEY=VALUE "
                        "(one variant) or --variant \"KEY=VALUE ...\" (repeatable)")
    out = []
    for items in groups:
        overrides = dict(parse_override(item) for item in items)
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in REPLAYABLE)
        for key in overrides:
            if not (key.startswith("mask.") or key in REPLAYABLE):
                raise SpecError(f"{SET_ORIGIN} {key}: replay recomputes the loss on the recorded tokens; "
                                f"{key} would change the tokens or the teacher's log-probs (submit a new run "
                                f"for that); replayable: {allowed}")
        name = " ".join(f"{k.removeprefix('train.')}={v}" for k, v in overrides.items())
        out.append(Variant(name, overrides))
    return out


# ---------------------------------------------------------------------------- recorded batches


COLUMNS = ["ids", "student_lp", "teacher_lp", "sampler_lp", "student_topk_ids", "student_topk_lp",
           "teacher_at_student_topk_lp", "teacher_topk_ids", "teacher_topk_lp", "student_at_teacher_topk_lp",
           "mask", "segment_id", "train_loss"]


@dataclass
class StepBatch:
    """The on-policy rollouts of one step shard, as recorded: tokens concatenated (rollouts back
    to back, `lengths`), their rows, and what the step logged."""

    run_id: str
    step: int
    spec: Spec
    spec_data: dict[str, Any]
    path: Path
    rows: list[dict[str, Any]]
    lengths: list[int]
    tokens: dict[str, np.ndarray]
    logged_loss: float | None  # train/loss of the step, when it trained with objective "distill"
    trained: bool

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def signal(self) -> np.ndarray:
        """[N] bool: the token's rollout had a teacher signal (1.0 shards: every rollout did)."""
        return np.repeat([int(r.get("teacher_signal", 1)) != 0 for r in self.rows], self.lengths)


def read_batches(sweep_dir: Path, run_ids: list[str] | None = None, skipped: list | None = None
                 ) -> Iterator[StepBatch]:
    """Every step shard of the sweep (or of `run_ids`), one at a time (streaming)."""
    for shard in iter_shards([sweep_dir], skipped=skipped, spec=True):
        run_id = str(shard.attrs.get("run_id", shard.path.parent.parent.name))
        if run_ids and run_id not in run_ids:
            continue
        spec = shard.spec
        data = tomllib.loads(shard.attrs["spec_toml"])  # what a variant's overrides are set into
        rows, parts = [], {}
        for record in shard.iter_rollouts(columns=COLUMNS):
            if record.row["kind"] != "original":
                continue
            rows.append(record.row)
            for name, values in record.tokens.items():
                parts.setdefault(name, []).append(np.array(values))
        if not rows:
            continue
        metrics = shard.metrics()
        trained = "train/loss_total" in metrics
        logged = float(metrics["train/loss"][1][0]) if "train/loss" in metrics and spec.train.objective == "distill" \
            and float(metrics.get("train/on_policy_weight", ([], [1.0]))[1][0]) > 0 else None
        yield StepBatch(run_id, int(shard.attrs.get("step", rows[0]["step"])), spec, data, shard.path, rows,
                        [len(p) for p in parts["ids"]], {k: np.concatenate(v) for k, v in parts.items()},
                        logged, trained)


# ---------------------------------------------------------------------------- one variant, one batch


@dataclass
class Replayed:
    loss: float
    terms: np.ndarray  # [N] float32
    grads: np.ndarray  # [N] float32


def variant_spec(batch: StepBatch, variant: Variant | None) -> Spec:
    if variant is None:
        return batch.spec
    data = batch.spec_data
    for key, value in variant.overrides.items():
        data = set_dotted(data, key, value)
    return validate(data, {key: SET_ORIGIN for key in variant.overrides}, f"{batch.path} (spec_toml)")


def _weights(batch: StepBatch, spec: Spec, variant: Variant | None) -> np.ndarray:
    """Supervision weights [N]: recorded for the run's own mask, rebuilt (`masks.build_masks`, as
    `steps.supervision_masks`) when the variant changes `mask.*`; 0 where the teacher had no signal."""
    recorded = batch.tokens.get("mask")
    changes_mask = variant is not None and any(k.startswith("mask.") for k in variant.overrides)
    if recorded is not None and not np.isnan(recorded).any() and not changes_mask:
        weights = recorded.astype(np.float64)
    else:
        if changes_mask and spec.train.method == "teacher_seeded":
            raise SpecError(f"{batch.path}: mask variants cannot be replayed on teacher-seeded rollouts "
                            "(the teacher-written prefix of each rollout is not recorded)")
        offsets = np.cumsum([0, *batch.lengths])
        cut = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
        segment = batch.tokens.get("segment_id")
        segments = None if segment is None else [
            [list(np.flatnonzero(segment[c] == k)) for k in range(int(segment[c].max()) + 1 if len(segment[c]) else 0)]
            for c in cut]
        parts = spec_masks(spec.mask, spec.scoring.top_k, spec.seeds[0], batch.step, batch.lengths,
                           segments=segments,
                           teacher_lp_at_student_topk=[batch.tokens["teacher_at_student_topk_lp"][c] for c in cut],
                           advantages=[batch.tokens["teacher_lp"][c] - batch.tokens["student_lp"][c] for c in cut])
        weights = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
    return np.where(batch.signal, weights, 0.0)


def _column(batch: StepBatch, name: str, needed_for: str) -> torch.Tensor:
    values = batch.tokens.get(name)
    if values is None or (values.dtype.kind == "f" and np.isnan(values).any()):
        raise SpecError(f"{batch.path}: replaying {needed_for} needs tokens/{name}, which this shard does not "
                        "record (rerun with scoring.teacher_topk = true for the teacher's top-k)")
    return torch.as_tensor(values, dtype=torch.float64 if values.dtype.kind == "f" else torch.long)


def replay_batch(batch: StepBatch, spec: Spec, weights: np.ndarray, rescorer: "Rescorer | None" = None) -> Replayed:
    """The loss of `spec` on the recorded batch, with each token's term and gradient weight."""
    config = LossConfig.from_train(spec.train)
    if spec.train.objective != "distill":
        raise SpecError(f"{batch.path}: replay recomputes train.objective = 'distill' (the options of "
                        f"docs/objectives.md); this run's objective is {spec.train.objective!r}")
    w = torch.as_tensor(weights, dtype=torch.float64)
    valid = torch.as_tensor(batch.signal, dtype=torch.float64)
    student_lp = _column(batch, "student_lp", "any loss")
    sampler = batch.tokens.get("sampler_lp")
    sampler_lp = None if sampler is None else torch.as_tensor(np.nan_to_num(sampler, nan=0.0), dtype=torch.float64)
    if config.support == "full":
        return (rescorer or Rescorer()).full(batch, config, w, valid, sampler_lp)
    inputs = DistillInputs(weights=w, lengths=batch.lengths, student_lp=student_lp, loss_mask=valid,
                           sampler_lp=sampler_lp, teacher_lp=_column(batch, "teacher_lp", "any loss"))
    if config.support == "topk":
        need = f"train.topk_support = {config.topk_support!r}"
        ids, mask = support_ids(_column(batch, "student_topk_ids", need),
                                _column(batch, "teacher_topk_ids", need) if config.topk_support != "student" else None,
                                config.topk_support)
        pairs = support_columns(config.topk_support)
        student_at = torch.cat([_column(batch, s, need) for s, _ in pairs], -1)
        teacher_at = torch.cat([_column(batch, t, need) for _, t in pairs], -1)
        student, inputs.teacher_buckets, inputs.bucket_mask = topk_buckets(student_at, teacher_at, mask,
                                                                           config.topk_normalization)
        # the buckets (the tail one included) as independent coordinates: their gradient is the
        # logits' gradient summed per bucket
        leaf = inputs.student_buckets = student.detach().clone().requires_grad_(True)
    else:  # sampled: the student's categorical over {y_t, the rest}
        leaf = with_tail(student_lp[:, None], None)[0].requires_grad_(True)
        inputs.student_lp = bucket_log_probs(leaf, None)[:, 0]
    out = distill_loss(config, inputs)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    l1 = grad.abs().sum(-1) * valid.sum().clamp_min(1.0)  # per token, undoing the 1/N
    return Replayed(float(out.loss.detach()), out.terms.float().numpy(), l1.detach().float().numpy())


class Rescorer:
    """Re-scores recorded tokens with the models for full-vocabulary variants (initial weights only)."""

    def __init__(self):
        self._models: dict[tuple, Any] = {}

    def _load(self, spec: Spec) -> tuple[ModelHandle, ModelHandle]:
        """(student, teacher) with the initial weights, on the CPU unless the spec names a device:
        as a measurement run loads them (a self-teacher is then the student itself)."""
        model = spec.model
        key = (model.student, model.teacher, model.dtype)
        if key not in self._models:
            device = "cpu" if model.device == "auto" else model.device

            def load(model_id: str) -> ModelHandle:
                return load_model_id(model_id, dtype=model.dtype, device=device, enable_thinking=model.enable_thinking)

            student = load(model.student)
            teacher = student if model.teacher in ("same", model.student) else load(model.teacher)
            self._models[key] = (student, teacher)
        return self._models[key]

    def full(self, batch: StepBatch, config: LossConfig, w: torch.Tensor, valid: torch.Tensor,
             sampler_lp: torch.Tensor | None) -> Replayed:
        versions = {int(r["weight_version"]) for r in batch.rows}
        if versions != {0}:
            raise Unreplayable(f"{batch.path}: full-vocabulary replay re-scores the tokens with the weights that "
                            f"sampled them; only the initial weights can be reloaded, and this step's rollouts "
                            f"came from weights version(s) {sorted(versions)} (replay top-k or sampled-token "
                            "variants on this step, or the step-0 shard)")
        student_handle, teacher_handle = self._load(batch.spec)
        tok = student_handle.tokenizer
        n_valid = valid.sum().clamp_min(1.0)
        terms, grads, total = [], [], torch.zeros((), dtype=torch.float64)
        offsets = np.cumsum([0, *batch.lengths])
        for i, row in enumerate(batch.rows):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            if hi == lo:
                continue
            ids = batch.tokens["ids"][lo:hi].tolist()
            teacher_prompt = row.get("teacher_prompt_text") or ""
            if not teacher_prompt or not row.get("prompt_text"):
                raise Unreplayable(f"{batch.path}: full-vocabulary replay re-scores from the recorded prompts; "
                                   "this shard has no rollouts/teacher_prompt_text (written before schema 1.1)")
            s_seq = (tok.encode(row["prompt_text"], add_special_tokens=False), ids)
            t_seq = (tok.encode(teacher_prompt, add_special_tokens=False), ids)
            with torch.no_grad():
                hidden = response_hidden(student_handle, [s_seq], [hi - lo])
                student = project(student_handle.model, hidden).double()
                teacher = TeacherLogits(teacher_handle, [t_seq], [hi - lo]).chunk(0, hi - lo).double()
            logits = student.clone().requires_grad_(True)
            y = torch.as_tensor(ids)[:, None]
            inputs = DistillInputs(weights=w[lo:hi], lengths=[hi - lo],
                                   student_lp=torch.log_softmax(logits, -1).gather(-1, y)[:, 0],
                                   sampler_lp=None if sampler_lp is None else sampler_lp[lo:hi],
                                   student_buckets=logits, teacher_buckets=teacher, loss_mask=valid[lo:hi])
            out = distill_loss(config, inputs)
            n_rollout = valid[lo:hi].sum().clamp_min(1.0)
            (grad,) = torch.autograd.grad(out.loss, logits)
            total = total + out.loss.detach() * n_rollout / n_valid  # its share of the batch loss
            terms.append(out.terms.float().numpy())
            grads.append((grad.abs().sum(-1) * n_rollout).float().numpy())  # undo the rollout's 1/N
        return Replayed(float(total), np.concatenate(terms) if terms else np.zeros(0, np.float32),
                        np.concatenate(grads) if grads else np.zeros(0, np.float32))


# ---------------------------------------------------------------------------- the sweep


@dataclass
class ReplayResult:
    variants: list[str]  # BASELINE first
    steps: list[dict[str, Any]] = field(default_factory=list)  # run_id, step, tokens, logged, loss per variant
    terms: dict[str, list[np.ndarray]] = field(default_factory=dict)  # variant -> per-batch [N]
    grads: dict[str, list[np.ndarray]] = field(default_factory=dict)
    position: list[np.ndarray] = field(default_factory=list)  # relative position (t + 0.5) / T in [0, 1]
    where: list[np.ndarray] = field(default_factory=list)  # [N, 3] (batch index, rollout index, t)
    ids: list[np.ndarray] = field(default_factory=list)
    tokenizer_id: str | None = None
    skipped: list = field(default_factory=list)  # (shard, reason): unreadable shards
    unreplayed: list = field(default_factory=list)  # (run_id, step, reason): steps a variant cannot redo

    def pooled(self, kind: str, variant: str) -> np.ndarray:
        parts = getattr(self, kind)[variant]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def replay_sweep(sweep_dir: str | Path, variants: list[Variant], run_ids: list[str] | None = None) -> ReplayResult:
    """Replay the run's own loss and every variant on every recorded step of the sweep."""
    sweep_dir = Path(sweep_dir).absolute()
    names = [BASELINE] + [v.name for v in variants]
    result = ReplayResult(names, terms={n: [] for n in names}, grads={n: [] for n in names})
    rescorer = Rescorer()
    for batch in read_batches(sweep_dir, run_ids, skipped=result.skipped):
        result.tokenizer_id = result.tokenizer_id or batch.spec.model.student
        entry: dict[str, Any] = {"run_id": batch.run_id, "step": batch.step, "tokens": batch.num_tokens,
                                 "logged": batch.logged_loss, "trained": batch.trained, "path": str(batch.path)}
        try:  # every variant on the same tokens, or the step is left out for all of them
            replayed = {}
            for name, variant in zip(names, [None, *variants]):
                spec = variant_spec(batch, variant)
                replayed[name] = replay_batch(batch, spec, _weights(batch, spec, variant), rescorer)
        except Unreplayable as exc:
            result.unreplayed.append((batch.run_id, batch.step, str(exc)))
            log.warning("not replayed: %s", exc)
            continue
        for name, out in replayed.items():
            entry[name] = out.loss
            result.terms[name].append(out.terms)
            result.grads[name].append(out.grads)
        t = np.concatenate([np.arange(n) for n in batch.lengths]) if batch.lengths else np.zeros(0)
        T = np.repeat(batch.lengths, batch.lengths)
        result.position.append(((t + 0.5) / np.maximum(T, 1)).astype(np.float32))
        result.where.append(np.stack([np.full(len(t), len(result.steps)), np.repeat(np.arange(len(batch.lengths)),
                                                                                      batch.lengths), t], -1))
        result.ids.append(batch.tokens["ids"])
        entry["rows"] = [(r["problem_id"], int(r["sample_idx"])) for r in batch.rows]
        result.steps.append(entry)
        log.info("replayed %s step %d (%d tokens)", batch.run_id, batch.step, batch.num_tokens)
    if not result.steps:
        reasons = "".join(f"\n  - {run} step {step}: {why}" for run, step, why in result.unreplayed)
        raise SpecError(f"{sweep_dir}: no step shard with the student's rollouts could be replayed{reasons}")
    return result


__all__ = ["Unreplayable", "Variant", "parse_variants", "StepBatch", "read_batches", "replay_batch", "replay_sweep",
           "ReplayResult", "BASELINE", "REPLAYABLE"]
