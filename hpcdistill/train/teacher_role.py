"""The teacher role when it runs apart from the trainer (`spec.teacher_rules.teacher_placement`):
its own process on the teacher's GPUs (`models.teacher_server`) or a vLLM server
(`models.vllm_teacher`), started by rank 0 before the first step and stopped on every exit path.

The trainer then holds no teacher weights: `models.teacher` is a handle with the teacher's
tokenizer and stop tokens and no model, `models.teacher_service` answers the scoring requests
(`models.split_scoring`) and the teacher's sampling (`teacher_generate`). Every trainer rank
connects to the teacher process (address and key from rank 0 over the process group) and sends it
its own share of the batch, so the teacher scores each token once; a vLLM teacher is rank 0's, which
scores the whole batch and shares it (`train.collect.Scorer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

import torch

from hpcdistill.devices import RoleDevices
from hpcdistill.models.generation import generate
from hpcdistill.models.loading import ModelHandle, load_tokenizer
from hpcdistill.rundir import RunPaths
from hpcdistill.spec.schema import Spec
from hpcdistill.spec.teacher_rules import self_teacher, teacher_model_id, teacher_placement

log = logging.getLogger(__name__)


def remote_teacher_handle(spec: Spec, student: ModelHandle) -> ModelHandle:
    """What the trainer keeps of a teacher that runs elsewhere: its tokenizer (for the teacher's
    prompts and the parity check), no model; the stop tokens arrive when the role starts."""
    from hpcdistill.models.chat import set_chat_options

    if self_teacher(spec):
        tokenizer = student.tokenizer
    else:
        tokenizer = load_tokenizer(spec.model.teacher) if not spec.model.teacher.startswith("tiny-random:") \
            else student.tokenizer
        set_chat_options(tokenizer, enable_thinking=spec.model.enable_thinking)
    return ModelHandle(model=None, tokenizer=tokenizer, model_id=teacher_model_id(spec), device=torch.device("cpu"),
                       dtype=student.dtype, stop_token_ids=student.stop_token_ids if self_teacher(spec) else ())


@contextlib.contextmanager
def teacher_engine(spec: Spec, models, paths: RunPaths, roles: RoleDevices):
    """Run the teacher role for the `with` block when it is apart from the trainer (else a no-op)."""
    placement = teacher_placement(spec)
    if placement == "trainer":
        yield models
        return
    with contextlib.ExitStack() as stack:
        if placement == "process":
            models.teacher_service = stack.enter_context(_teacher_process(spec, models, paths, roles))
        elif models.is_main:
            models.teacher_service = stack.enter_context(_vllm_teacher(spec, models, paths, roles))
        service = models.teacher_service
        if service is not None:
            models.teacher = _with_stop_tokens(models.teacher, service.stop_token_ids)
        try:
            yield models
        finally:
            models.teacher_service = None


def _with_stop_tokens(handle: ModelHandle, stop_token_ids) -> ModelHandle:
    import dataclasses

    return dataclasses.replace(handle, stop_token_ids=tuple(stop_token_ids))


@contextlib.contextmanager
def _teacher_process(spec: Spec, models, paths: RunPaths, roles: RoleDevices):
    from hpcdistill.models.teacher_server import TeacherClient, TeacherServer

    several_nodes = spec.launch.nodes > 1  # ranks on other nodes connect to node 0's address
    server = None
    with contextlib.ExitStack() as stack:
        if models.is_main:
            server = TeacherServer(teacher_model_id(spec), dtype=spec.model.dtype, device=spec.model.device,
                                   enable_thinking=spec.model.enable_thinking, log_path=paths.teacher_log,
                                   host="0.0.0.0" if several_nodes else "127.0.0.1", env=roles.env("teacher"))
            stack.enter_context(server)
        address, authkey = _share(models, (_node0_address() if several_nodes else "127.0.0.1",
                                           server.port if server else None), server.authkey if server else None)
        client = stack.enter_context(TeacherClient(address, authkey, server=server, log_path=paths.teacher_log))
        log.info("rank %d scores through the teacher process at %s:%d", _rank(models), *address)
        yield client


@contextlib.contextmanager
def _vllm_teacher(spec: Spec, models, paths: RunPaths, roles: RoleDevices):
    from hpcdistill.models.vllm_server import resolve_vllm_python
    from hpcdistill.models.vllm_teacher import VLLMTeacher, start_vllm_teacher

    server = start_vllm_teacher(vllm_model_source(teacher_model_id(spec)),
                                python=resolve_vllm_python(spec.rollout.vllm_python),
                                dtype="float32" if spec.model.dtype == "float32" else spec.model.dtype,
                                top_k=spec.scoring.top_k, log_path=paths.teacher_log,
                                startup_timeout_s=spec.rollout.vllm_startup_timeout_s, env=roles.env("teacher"))
    with server:
        yield VLLMTeacher(server, vocab_size=models.student.vocab_size)


def vllm_model_source(model_id: str) -> str:
    """What vLLM loads for a spec's model id: the converted folder of a bundled or GGUF model, a
    local folder or a hub id as they are."""
    from pathlib import Path

    from hpcdistill.models.loading import BUNDLED_PREFIX, bundled_gguf_path, converted_gguf_dir

    if model_id.startswith(BUNDLED_PREFIX):
        name = model_id[len(BUNDLED_PREFIX):]
        return str(converted_gguf_dir(bundled_gguf_path(name), name))
    if model_id.endswith(".gguf"):
        gguf = Path(model_id).expanduser().resolve()
        return str(converted_gguf_dir(gguf, gguf.stem))
    return model_id


def _node0_address() -> str:
    """Where the other nodes' ranks reach node 0: the rendezvous host torchrun gave every worker
    (MASTER_ADDR, the first host of the job's node list, which they have already reached), else
    this host's name."""
    return os.environ.get("MASTER_ADDR") or socket.gethostname()


def _rank(models) -> int:
    return 0 if models.trainer is None else models.trainer.rank


def _share(models, address: tuple[str, Any], authkey: bytes | None) -> tuple[tuple[str, int], bytes]:
    """Rank 0's (address, key) on every rank: over the trainer's process group, never a file."""
    if models.world_size == 1:
        return address, authkey
    import torch.distributed as dist

    box = [address, authkey]
    dist.broadcast_object_list(box, src=0)
    return tuple(box[0]), box[1]


def teacher_generate(models, prompts: list[list[int]], **kwargs: Any) -> list[list[Any]]:
    """The teacher's samples ([prompt][sample] Generations): in process, or asked of the teacher
    role by rank 0 and shared with the other ranks (which compute the same items)."""
    if models.teacher_service is None and models.teacher.model is not None:
        return generate(models.teacher, prompts, **kwargs)
    if models.world_size == 1:
        return _remote_generate(models, prompts, kwargs)
    import torch.distributed as dist

    out = [_remote_generate(models, prompts, kwargs) if models.is_main else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def _remote_generate(models, prompts, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "progress"}
    if getattr(models.teacher_service, "generate", None) is None:
        raise RuntimeError("this teacher role does not sample")
    return models.teacher_service.generate(prompts, **kwargs)


__all__ = ["teacher_engine", "teacher_generate", "remote_teacher_handle", "vllm_model_source"]
