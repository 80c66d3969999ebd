"""The run's roles: the models (student, teacher, frozen reference), the rollout engine that samples
the student (transformers in process, or vLLM's server) and the weight sync that keeps it on the
weights a step samples with, the LoRA wrapper, the EMA teacher's state, and the saved student.

What the rest of `train/` asks of a model goes through here; the stages (collect, update) and the
loop on top hold no model of their own.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcdistill.distill import contexts
from hpcdistill.devices import RoleDevices
from hpcdistill.errors import LaunchError
from hpcdistill.models import teachers
from hpcdistill.models.generation import generate
from hpcdistill.models.loading import ModelHandle, load_model_id
from hpcdistill.models.parity import check_template_parity
from hpcdistill.models.teachers import self_teacher
from hpcdistill.rundir import RunPaths
from hpcdistill.spec.schema import Spec
from hpcdistill.spec.teacher_rules import teacher_placement
from hpcdistill.tasks import Problem, Verdict
from hpcdistill.train.trainer_checkpoint import checkpoint_file
from hpcdistill.train.policy_lag import LAG_FILE, behaviour_version
from hpcdistill.train.teacher_role import remote_teacher_handle

log = logging.getLogger(__name__)


@dataclass
class Models:
    """The run's model roles and the engines around them, filled in as the loop sets them up."""

    student: ModelHandle
    teacher: ModelHandle  # the same object as `student` when model.teacher = "same"
    rollout_server: Any = None  # a VLLMServer when rollout.backend = "vllm" (rank 0 only)
    trainer: Any = None  # the student's `train.distributed.Trainer` while training; None = measurement
    policy_lag: Any = None  # a train.policy_lag.PolicyLag when rollout.policy_lag > 0 (training only)
    # the teacher role apart from the trainer (train.teacher_role): a TeacherClient or a VLLMTeacher;
    # then `teacher` is a handle without a model (its tokenizer and stop tokens)
    teacher_service: Any = None

    @property
    def weight_version(self) -> int | None:
        """The weights the rollout engine samples with (the server's version, or the lagged version
        the in-process sampler last used), if it tracks one."""
        if self.rollout_server is not None:
            return self.rollout_server.weight_version
        lag = self.policy_lag
        return None if lag is None or not lag.in_process else lag.sampled_version

    def behaviour_weights(self, step: int):
        """Around a step's rollout sampling: the student holds the weights that step samples with
        (`rollout.policy_lag` on the in-process backend; vLLM's server already serves them)."""
        if self.policy_lag is None or not self.policy_lag.in_process:
            return contextlib.nullcontext()
        return self.policy_lag.sampling(self.student.model, step)

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shards and the model (every rank runs the loop)."""
        return self.trainer is None or self.trainer.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.trainer is None else self.trainer.world_size

    def full_parameters(self):
        """Context for forwards that call the decoder body directly (scoring): under FSDP or
        ZeRO-3 the student's parameters are gathered there; a no-op otherwise."""
        return contextlib.nullcontext() if self.trainer is None else self.trainer.full_parameters()


# ---------------------------------------------------------------------------- loading


def resolve_device(spec: Spec, roles: RoleDevices) -> str:
    if spec.model.device != "auto":
        return spec.model.device
    return "cuda" if (torch.cuda.is_available() and not roles.on_cpu) else "cpu"


def _load(model_id: str, spec: Spec, device: str) -> ModelHandle:
    return load_model_id(model_id, dtype=spec.model.dtype, device=device,
                         enable_thinking=spec.model.enable_thinking)


def load_models(spec: Spec, roles: RoleDevices) -> Models:
    """The student and the teacher: the student itself, a self-teacher made from its weights
    (`teacher.weights`; before any update they equal the student, so measurement runs share it),
    or a separate frozen model."""
    device = resolve_device(spec, roles)
    student = _load(spec.model.student, spec, device)
    if teacher_placement(spec) != "trainer":  # the teacher role loads it (train.teacher_role)
        return Models(student, remote_teacher_handle(spec, student))
    if spec.model.teacher in ("same", spec.model.student):
        weights = spec.teacher.weights if spec.train.steps > 0 else "live"
        return Models(student, self_teacher(weights, student, mix=spec.teacher.trust_region_mix))
    return Models(student, _load(spec.model.teacher, spec, device))


def load_reference_model(spec: Spec, models: Models, model_id: str) -> torch.nn.Module:
    """A named frozen reference model (ExOPD's `train.exopd_reference`) on the student's device;
    it must share the student's tokenizer, since it scores the student's token ids."""
    handle = _load(model_id, spec, str(models.student.device))
    if handle.tokenizer is not None and models.student.tokenizer is not None and \
            handle.tokenizer.get_vocab() != models.student.tokenizer.get_vocab():
        raise ValueError(f"train.exopd_reference = {model_id!r} has another vocabulary than model.student = "
                         f"{spec.model.student!r}; the reference scores the student's tokens, so it needs the "
                         "student's tokenizer")
    return handle.model.eval()


def check_parity(spec: Spec, models: Models, problems: list[Problem]) -> None:
    """Stop before anything runs if the two sides' chat templates would misalign positions
    (models.parity); probes the teacher context of the first problem with a placeholder feedback."""
    if not problems or models.student.tokenizer is None:
        return
    problem = problems[0]
    verdict = Verdict(0.0, False, "placeholder feedback", {})
    student = contexts.student_messages(problem, spec.rollout.system_prompt)
    if spec.teacher.context == "regen":
        teacher = contexts.regen_messages(problem, "placeholder attempt", verdict, spec.teacher)
    else:
        teacher = contexts.teacher_contexts([problem, problem], ["placeholder attempt"] * 2,
                                            [verdict, Verdict(1.0, True, "", {})], spec.teacher,
                                            spec.rollout.system_prompt)[0].messages
    check_template_parity(models.student.tokenizer, models.teacher.tokenizer or models.student.tokenizer,
                          student, teacher, student_name=spec.model.student,
                          teacher_name=spec.model.student if spec.model.teacher == "same" else spec.model.teacher)


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


# ---------------------------------------------------------------------------- the rollout engine


def save_for_serving(model, tokenizer, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The student's current weights as a folder vLLM can serve and reload, written atomically.

    Tied input/output embeddings are written untied (lm_head.weight a copy of the embedding, the
    config saying so): vLLM's in-place weight reload updates the embedding but not a tied lm_head
    (measured: a 0.9-nat sampler/trainer gap after one reload), so the served model must not tie.
    `state`: the whole model's weights when `model` is sharded (FSDP, ZeRO-3: `Trainer.full_state_dict`).
    """
    from safetensors.torch import save_file

    if state is not None:
        output = model.get_output_embeddings().weight
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is output)
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
        state["lm_head.weight"] = state[name].clone()
    else:
        if hasattr(model, "merge_and_unload"):  # LoRA: serve the merged weights
            model = copy.deepcopy(model).merge_and_unload()
        state = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in model.state_dict().items()}
        state["lm_head.weight"] = model.get_output_embeddings().weight.detach().to("cpu").clone().contiguous()
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def serve_student_weights(models: Models, paths: RunPaths) -> Path | None:
    """The student's current weights in `rollout_weights/`, for the rollout server.

    Every trainer rank calls (gathering FSDP / ZeRO-3 weights is collective); rank 0 writes and
    gets the folder, the other ranks None.
    """
    trainer = models.trainer
    state = trainer.full_state_dict() if trainer is not None and trainer.shards_parameters else None
    if trainer is not None and not trainer.is_main:
        return None
    return save_for_serving(models.student.model, models.student.tokenizer, paths.rollout_weights,
                            state=state)


@contextlib.contextmanager
def rollout_engine(spec: Spec, models: Models, paths: RunPaths):
    """Start the rollout role's engine for the run (vLLM's server) and stop it on every exit.

    Over several trainer ranks only rank 0 runs the server; `sample_student` sends its samples
    to the other ranks.
    """
    if spec.rollout.backend != "vllm":
        yield models
        return
    from hpcdistill.models.vllm_backend import VLLMServer, resolve_vllm_python

    served = serve_student_weights(models, paths)
    if served is None:  # not rank 0
        yield models
        return
    server = VLLMServer(served, python=resolve_vllm_python(spec.rollout.vllm_python),
                        dtype="float32" if spec.model.dtype == "float32" else spec.model.dtype,
                        max_logprobs=max(20, spec.scoring.top_k), log_path=paths.vllm_log,
                        startup_timeout_s=spec.rollout.vllm_startup_timeout_s)
    with server:
        models.rollout_server = server
        try:
            yield models
        finally:
            models.rollout_server = None


def sample_student(spec: Spec, models: Models, prompts: list[list[int]], *, seed: int,
                   prefixes: list[list[int]] | None = None, temperature: float | None = None,
                   n: int | None = None, max_new_tokens: int | None = None) -> list[list[Any]]:
    """The student's rollouts on the rollout backend: transformers in process, or vLLM's server."""
    ro = spec.rollout
    kwargs = dict(n=n or ro.samples_per_problem, max_new_tokens=max_new_tokens or ro.max_new_tokens,
                  temperature=ro.temperature if temperature is None else temperature, top_p=ro.top_p,
                  top_k=ro.top_k, seed=seed, prefix_ids=prefixes)
    if ro.backend == "vllm" and models.world_size > 1:  # rank 0 samples, every rank trains on it
        import torch.distributed as dist

        from hpcdistill.models.vllm_backend import generate_vllm

        out = [generate_vllm(models.rollout_server, prompts, stop_token_ids=models.student.stop_token_ids,
                             **kwargs) if models.rollout_server is not None else None]
        dist.broadcast_object_list(out, src=0)
        return out[0]
    if models.rollout_server is not None:
        from hpcdistill.models.vllm_backend import generate_vllm

        return generate_vllm(models.rollout_server, prompts,
                             stop_token_ids=models.student.stop_token_ids, **kwargs)
    return generate(models.student, prompts, batch_size=ro.batch_size, **kwargs)


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


# ---------------------------------------------------------------------------- state a checkpoint keeps


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
