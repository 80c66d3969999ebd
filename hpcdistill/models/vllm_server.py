"""The vLLM server as a child process: started with vLLM's own Python, on a free local port, in its
own process group, stopped on every exit path; its HTTP requests and weight sync.

vLLM lives in its own Python (it pins torch and transformers versions of its own), so the server
runs as a separate process started with that interpreter: `rollout.vllm_python` in the spec,
overridden by `$HPCDISTILL_VLLM_PYTHON` (see `resolve_vllm_python`). This module only speaks HTTP
and never imports vllm; rollouts over it are `models.vllm_backend.generate_vllm`.

Lifecycle (`VLLMServer`): a free port (bound to 0 by the OS, so array tasks sharing a node never
collide), its own process group (the API server spawns an engine-core and a worker process; we kill
the whole group), `/health` polled with a timeout, and shutdown on every exit path: the `with` block
ending normally or by an exception, SIGTERM / SIGUSR2 (Slurm's and submitit's preemption signals:
the server is killed first, then the previous handler runs), and atexit. It is started with
`--logprobs-mode raw_logprobs` (see `models.vllm_backend` for what the log-probs mean).

Weight sync (`VLLMServer.load_weights`): the server runs with `VLLM_SERVER_DEV_MODE=1`, bound to
127.0.0.1, which enables `/collective_rpc`; we call the workers' `reload_weights(weights_path=DIR)`
(in place, about 1 s for SmolLM2-135M on CPU), reset the prefix cache (cached KV blocks were
computed with the old weights) and set vLLM's own weight version (`/update_weight_version`,
readable at `/weight_info`). Where that endpoint is missing (older vLLM) the server is restarted on
the new directory. LoRA adapters are loaded at run time with `/v1/load_lora_adapter`
(`VLLMServer(..., lora_max_rank=R)`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from hpcdistill.errors import ModelError
from hpcdistill.models.child_process import ChildProcess

log = logging.getLogger(__name__)

ENV_VLLM_PYTHON = "HPCDISTILL_VLLM_PYTHON"


def resolve_vllm_python(configured: str = "python3") -> str:
    """The interpreter that runs vLLM: `$HPCDISTILL_VLLM_PYTHON` if set, else the spec's value."""
    return os.environ.get(ENV_VLLM_PYTHON) or configured


def vllm_importable(python: str) -> bool:
    """Whether `python -c "import vllm"` succeeds (a few seconds: vllm imports torch)."""
    try:
        done = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago: bind to port 0 and let the OS choose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _cuda_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return bool(torch.cuda.is_available())


def model_stop_token_ids(model_dir: str | os.PathLike) -> tuple[int, ...]:
    """Stop tokens of a checkpoint directory, by the same rule as `loading.stop_token_ids`."""
    from transformers import AutoTokenizer, GenerationConfig

    from hpcdistill.models.loading import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    try:
        gen_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    except OSError:  # no generation_config.json
        gen_config = None
    return stop_token_ids(tokenizer, SimpleNamespace(generation_config=gen_config))


class VLLMServer(ChildProcess):
    """vLLM's OpenAI-compatible server on a free local port; use as a context manager.

    `weight_version` is the training step whose weights the server holds (0 = the initial
    weights); the caller stores it with every rollout it samples.
    """

    what = "the vLLM server"

    def __init__(self, model_dir: str | os.PathLike, *, python: str, dtype: str = "float32",
                 port: int | None = None, max_logprobs: int = 20, startup_timeout_s: float = 300,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, host: str = "127.0.0.1",
                 served_model_name: str = "policy", lora_max_rank: int | None = None,
                 request_timeout_s: float = 1800, weight_version: int = 0):
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="hpcdistill-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        super().__init__(log_path, startup_timeout_s)
        self.model_dir = Path(model_dir)
        self.python = python
        self.dtype = dtype
        self.requested_port = port
        self.max_logprobs = max_logprobs
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.host = host
        self.served_model_name = served_model_name
        self.lora_max_rank = lora_max_rank
        self.request_timeout_s = request_timeout_s
        self.weight_version = weight_version
        self.model_name = served_model_name  # what requests ask for: the base, or a LoRA adapter
        self.port: int | None = None
        self.last_sync: tuple[str, float] | None = None  # (method, seconds) of the last load_weights
        self._stop_tokens: tuple[int, ...] | None = None

    # ---------------------------------------------------------------------------------------------
    # lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def command(self, port: int) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_dir), "--served-model-name", self.served_model_name,
               "--host", self.host, "--port", str(port), "--dtype", self.dtype, "--enforce-eager",
               "--max-logprobs", str(self.max_logprobs), "--logprobs-mode", "raw_logprobs"]
        if self.lora_max_rank is not None:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.lora_max_rank), "--max-loras", "1"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if not _cuda_visible():
            env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="2")
        # Dev mode enables /collective_rpc (weight reload) and /reset_prefix_cache; the server
        # listens on the loopback address only.
        env.update(VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        env.update(self.extra_env)
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait for `/health`; raises ModelError if it does not come up."""
        if self._proc is not None:
            raise RuntimeError("this VLLMServer is already running")
        attempts = 1 if self.requested_port else 3  # a chosen free port can be taken meanwhile
        for attempt in range(attempts):
            port = self.requested_port or free_port(self.host)
            try:
                self._start_on(port)
                return self
            except ModelError:
                if attempt + 1 < attempts and "address already in use" in self.log_tail().lower():
                    log.warning("port %d was taken before vLLM bound it; trying another", port)
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_on(self, port: int) -> None:
        t0 = time.monotonic()
        self.port = port
        self._spawn(self.command(port), self.environment(),
                    hint=f"Set rollout.vllm_python or ${ENV_VLLM_PYTHON} to a Python that has vllm installed "
                         "(docs/vllm.md)")
        log.info("vLLM server starting on %s (pid %d, log %s)", self.url, self.pid, self.log_path)
        self._await_ready(self._healthy, str(self.model_dir), t0, expect=f"answer /health on {self.url}")
        self._set_remote_version()
        log.info("vLLM server healthy on %s after %.1f s", self.url, self.startup_s)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # ---------------------------------------------------------------------------------------------
    # HTTP

    def request(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """GET (body None) or POST JSON to the server; returns the decoded JSON (None if empty)."""
        if not self.running():
            raise ModelError(f"the vLLM server is not running. Last lines of {self.log_path}:\n"
                             f"{self.log_tail()}")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise ModelError(f"vLLM server: {path} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            alive = "running" if self.running() else "no longer running"
            raise ModelError(f"vLLM server: {path} failed ({exc}); the server is {alive}. Last "
                             f"lines of {self.log_path}:\n{self.log_tail()}") from exc
        return json.loads(raw) if raw.strip() else None

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        if self._stop_tokens is None:
            self._stop_tokens = model_stop_token_ids(self.model_dir)
        return self._stop_tokens

    # ---------------------------------------------------------------------------------------------
    # weight sync

    def _set_remote_version(self) -> None:
        try:
            self.request("/update_weight_version", {"new_version": str(self.weight_version)})
        except ModelError:  # an older vLLM without the endpoint: our own record is what counts
            log.debug("vLLM server has no /update_weight_version")

    def load_weights(self, model_dir: str | os.PathLike, version: int, *,
                     method: str = "auto") -> float:
        """Serve the full weights saved in `model_dir` (same architecture) from now on, as
        weight version `version`. method: "reload" (in place through /collective_rpc),
        "restart" (a new server on the new directory) or "auto" (reload, else restart).
        Call between rollouts, not while requests are in flight. Returns the seconds it took."""
        if method not in ("auto", "reload", "restart"):
            raise ValueError(f"method must be auto, reload or restart, not {method!r}")
        t0 = time.monotonic()
        model_dir = Path(model_dir)
        used = method
        if method in ("auto", "reload"):
            try:
                self.request("/collective_rpc", {"method": "reload_weights",
                                                 "kwargs": {"weights_path": str(model_dir)}})
                self.request("/reset_prefix_cache", {})
                used = "reload"
            except ModelError as exc:
                if method == "reload" or not self.running():
                    raise
                log.warning("in-place weight reload failed (%s); restarting the server", exc)
                used = "restart"
        if used == "restart":
            self.stop()
            self.model_dir = model_dir
            self.weight_version = version
            self.start()
        self.model_dir = model_dir
        self.weight_version = version
        self.model_name = self.served_model_name
        self._set_remote_version()
        seconds = time.monotonic() - t0
        self.last_sync = (used, seconds)
        log.info("vLLM server now serves %s as weight version %d (%s, %.2f s)",
                 model_dir, version, used, seconds)
        return seconds

    def load_lora(self, adapter_dir: str | os.PathLike, version: int) -> float:
        """Serve base weights + the PEFT adapter in `adapter_dir` as weight version `version`
        (needs `lora_max_rank`). The previous adapter is unloaded."""
        if self.lora_max_rank is None:
            raise ModelError("load_lora needs a server started with lora_max_rank=R (--enable-lora)")
        t0 = time.monotonic()
        name = f"{self.served_model_name}-v{version}"
        self.request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)})
        previous = self.model_name
        self.model_name, self.weight_version = name, version
        if previous != self.served_model_name:
            self.request("/v1/unload_lora_adapter", {"lora_name": previous})
        self._set_remote_version()
        seconds = time.monotonic() - t0
        self.last_sync = ("lora", seconds)
        return seconds


__all__ = ["VLLMServer", "free_port", "resolve_vllm_python", "vllm_importable", "model_stop_token_ids",
           "ENV_VLLM_PYTHON"]
