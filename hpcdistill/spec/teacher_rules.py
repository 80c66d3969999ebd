"""Where the teacher runs (`teacher_placement`) and what each placement can serve.

A frozen teacher (model.teacher = a separate model, or "same" with teacher.weights = "initial") can
run apart from the trainer: in its own process on the launch.gpus.teacher devices
(`models.teacher_server`), or as a vLLM server (`teacher.backend = "vllm"`). A self-teacher that
follows the student's weights (live, ema, trust_region) is the trainer's own model and runs in every
trainer rank. What a teacher apart cannot serve is refused here, with the key to change:

- the full vocabulary in one place: `scoring.full_vocab` (the full KL) and `train.support = "full"`
  (the loss over the whole vocabulary) need both models' full rows side by side;
- a vLLM teacher answers at the sampled token and its own top-k only: `train.topk_support` must be
  "teacher" (the student's and the union's ids need the teacher at the student's ids), and
  `teacher.context = "regen"` (scored at the student's tokens under the teacher's own prefix) is
  not served either.
"""

from __future__ import annotations

from typing import Literal

from hpcdistill.spec.schema import Spec

Placement = Literal["trainer", "process", "vllm"]
FOLLOWING_WEIGHTS = ("live", "ema", "trust_region")  # self-teachers that change with the student
NOT_DISTILL = ("exopd", "context_distill", "sft")  # the objectives that read no train.support


def self_teacher(spec: Spec) -> bool:
    return spec.model.teacher in ("same", spec.model.student)


def teacher_placement(spec: Spec) -> Placement:
    """"vllm": a vLLM server; "process": the teacher process; "trainer": inside every trainer rank."""
    if spec.teacher.backend == "vllm":
        return "vllm"
    mode = spec.launch.teacher_process
    if mode == "never" or (mode == "auto" and spec.launch.gpus.teacher == 0):
        return "trainer"
    return "process"


def teacher_model_id(spec: Spec) -> str:
    """The weights the teacher role loads: the separate teacher, or the initial student."""
    return spec.model.student if self_teacher(spec) else spec.model.teacher


def teacher_role_errors(spec: Spec) -> list[tuple[str, str]]:
    """(dotted key, message) for each thing the spec's teacher placement cannot serve."""
    placement = teacher_placement(spec)
    why = {"process": "the teacher runs in its own process (launch.gpus.teacher > 0, or launch.teacher_process "
                      f"= {spec.launch.teacher_process!r})",
           "vllm": "the teacher is a vLLM server (teacher.backend = 'vllm')"}.get(placement)
    gpus = spec.launch.gpus.teacher
    if placement == "trainer":
        return []
    errors = []
    if self_teacher(spec) and spec.teacher.weights in FOLLOWING_WEIGHTS:
        if spec.launch.teacher_process == "auto" and placement == "process":
            errors.append(("launch.gpus.teacher", f"is {gpus}, but teacher.weights = {spec.teacher.weights!r} is "
                           "a self-teacher that follows the student's weights, so it runs inside the trainer ranks "
                           "and those GPUs would sit idle: set launch.gpus.teacher = 0 (give them to "
                           "launch.gpus.trainer), or teacher.weights = 'initial' for a frozen teacher on its own GPUs"))
        else:
            errors.append(("teacher.weights", f"is {spec.teacher.weights!r}: that self-teacher follows the student's "
                           f"weights and runs inside the trainer, but {why}; use teacher.weights = 'initial' (a "
                           "frozen copy of the initial student) or a separate model.teacher"))
    if spec.scoring.full_vocab:
        errors.append(("scoring.full_vocab", f"needs both models' full-vocabulary rows in one place, but {why}; "
                       "set scoring.full_vocab = false, or run the teacher in the trainer "
                       "(launch.teacher_process = 'never', teacher.backend = 'transformers')"))
    distill = spec.train.objective not in NOT_DISTILL and spec.train.steps > 0  # distill or a preset of it
    if distill and spec.train.support == "full":
        errors.append(("train.support", f"is 'full': the loss over the whole vocabulary needs the teacher's full "
                       f"rows beside the student's, but {why}; use train.support = 'topk' or 'sampled', or run "
                       "the teacher in the trainer (launch.teacher_process = 'never', teacher.backend = "
                       "'transformers')"))
    if placement != "vllm":
        return errors
    if spec.launch.teacher_process == "never":
        errors.append(("launch.teacher_process", "is 'never', but teacher.backend = 'vllm' is a server of its own; "
                       "set launch.teacher_process = 'auto' or teacher.backend = 'transformers'"))
    if distill and spec.train.support == "topk" and spec.train.topk_support != "teacher":
        errors.append(("train.topk_support", f"is {spec.train.topk_support!r}: it needs the teacher's log-probs at "
                       "the student's top-k ids, which a vLLM teacher (teacher.backend = 'vllm') cannot be asked "
                       "for; use train.topk_support = 'teacher', or teacher.backend = 'transformers', which "
                       "serves every support"))
    trainer = spec.trainer
    if trainer.strategy == "fsdp" or (trainer.strategy == "deepspeed" and trainer.zero_stage == 3):
        errors.append(("trainer.strategy", f"shards the student's parameters ({trainer.strategy!r}), so every rank "
                       "takes part in each scoring forward, but a vLLM teacher is rank 0's alone; use "
                       "teacher.backend = 'transformers' (its own process serves every rank), or DeepSpeed ZeRO "
                       "stage 1 or 2"))
    if spec.teacher.context == "regen":
        errors.append(("teacher.context", "is 'regen': the teacher is scored at the student's tokens under its own "
                       "regenerated prefix, which vLLM's prompt log-probs do not give; use teacher.backend = "
                       "'transformers' for it"))
    return errors


__all__ = ["teacher_placement", "teacher_model_id", "teacher_role_errors", "self_teacher", "Placement"]
