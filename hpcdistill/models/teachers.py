"""Which weights the self-teacher runs (`teacher.weights`, model.teacher = "same").

    live          the student itself: one set of weights (SDPO without EMA, seed 000)
    initial       a frozen copy of the initial student
    ema           a copy updated after every step: theta_T <- (1 - rate) theta_T + rate theta_S
                  (SDPO's EMA teacher, ema_update_rate = 0.05)
    trust_region  logits lerp(initial, live, mix) = (1 - mix) z_initial + mix z_live
                  (SDPO's TrustRegionTeacher: the initial and the current model mixed, in logit space)

A frozen separate teacher (model.teacher = "<id>") is loaded by `train.roles.load_models`.
The copies are made from the student before LoRA or a trainer strategy wraps it, so they hold
plain weights under the base model's parameter names.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from hpcdistill.models.loading import ModelHandle
from hpcdistill.rundir import CHECKPOINT_EMA_TEACHER

log = logging.getLogger(__name__)

EMA_FILE = CHECKPOINT_EMA_TEACHER  # inside the trainer checkpoint folder


class LogitMix:
    """A teacher whose logits are sum_i w_i z_i of several causal LMs (w: the mixing weights).

    `members` hold callables that return each model when asked, so the live student's member
    follows the handle after LoRA or a trainer strategy replaced its model. Callable like a causal
    LM for the decode loop (`models.generation`): `past_key_values` is a tuple, one cache per
    member. Scoring projects each member's hidden states itself (`teacher_members`).
    """

    def __init__(self, members: list[tuple[Callable[[], Any], float]]):
        self.members = members

    def models(self) -> list[tuple[Any, float]]:
        return [(get(), weight) for get, weight in self.members]

    def __call__(self, *, past_key_values=None, **kwargs) -> SimpleNamespace:
        pasts = past_key_values or (None,) * len(self.members)
        outs = [model(past_key_values=past, **kwargs) for (model, _), past in zip(self.models(), pasts)]
        logits = sum(weight * out.logits.float() for (_, weight), out in zip(self.models(), outs))
        return SimpleNamespace(logits=logits, past_key_values=tuple(out.past_key_values for out in outs))

    def get_output_embeddings(self):
        return self.models()[-1][0].get_output_embeddings()

    @property
    def config(self):
        return self.models()[-1][0].config

    def eval(self) -> "LogitMix":
        return self


def teacher_members(handle: ModelHandle) -> list[tuple[Any, float]]:
    """(model, weight) pairs whose logits, weighted and summed, are the teacher's logits."""
    if isinstance(handle.model, LogitMix):
        return handle.model.models()
    return [(handle.model, 1.0)]


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def self_teacher(weights: str, student: ModelHandle, *, mix: float = 0.05) -> ModelHandle:
    """The teacher handle for `teacher.weights` when the teacher is the student's own weights."""
    if weights == "live":
        return student
    if weights not in ("initial", "ema", "trust_region"):
        raise ValueError(f"teacher.weights must be live, initial, ema or trust_region, got {weights!r}")
    initial = _frozen_copy(student.model)
    model: Any = initial
    if weights == "trust_region":
        model = LogitMix([(lambda: initial, 1.0 - mix), (lambda: student.model, mix)])
    log.info("self-teacher: %s weights of %s", weights, student.model_id)
    return ModelHandle(model=model, tokenizer=student.tokenizer, model_id=f"{student.model_id} ({weights})",
                       device=student.device, dtype=student.dtype, stop_token_ids=student.stop_token_ids)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student_state: Mapping[str, torch.Tensor], rate: float) -> None:
    """theta_T <- (1 - rate) theta_T + rate theta_S, parameter by parameter (by name)."""
    for name, param in teacher.named_parameters():
        param.mul_(1.0 - rate).add_(student_state[name].to(param.device, param.dtype), alpha=rate)


def student_weights(models: Any) -> dict[str, torch.Tensor]:
    """The student's current weights under the base model's names, on every trainer rank.

    Sharded strategies gather them (collective: every rank calls); LoRA is merged on a copy.
    """
    trainer = models.trainer
    if trainer is not None and trainer.shards_parameters:
        return trainer.gathered_state_dict()
    model = models.student.model
    if hasattr(model, "merge_and_unload"):  # LoRA: the teacher averages the merged weights
        return copy.deepcopy(model).merge_and_unload().state_dict()
    return dict(model.state_dict())


def ema_state(teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the EMA teacher (parameters only, tied weights once)."""
    return {name: p.detach().to("cpu").clone().contiguous() for name, p in teacher.named_parameters()}


def save_ema(path: Path, teacher: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    save_file(ema_state(teacher), str(path))


@torch.no_grad()
def load_ema(path: Path, teacher: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    for name, param in teacher.named_parameters():
        param.copy_(state[name].to(param.device, param.dtype))


__all__ = ["LogitMix", "teacher_members", "self_teacher", "ema_update", "student_weights",
           "ema_state", "save_ema", "load_ema", "EMA_FILE"]
