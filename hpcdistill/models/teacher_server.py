"""The teacher role as its own process: the teacher model on the teacher's devices, serving the
trainer ranks' scoring and sampling requests over a local socket (DESIGN.md section 5).

The task starts it (`TeacherServer`, rank 0) with the teacher role's own `CUDA_VISIBLE_DEVICES`;
with several teacher GPUs the model is spread over them by transformers' device map. It loads the
teacher once, listens on a free port (`multiprocessing.connection`, pickled messages behind an
HMAC challenge with a per-run key that travels on the child's stdin and to the other ranks over
the trainer's process group, never through a file or a log), writes a small ready file and
answers, one request at a time:

    hello     -> model id, vocabulary size, stop tokens, pid
    score     TeacherRequest -> the teacher's half of a scoring batch (`models.split_scoring`)
    generate  prompts, sampling settings -> Generations (regenerations, completions, prefixes)
    status    -> what it has done: requests, scored tokens, generated sequences

Every scoring request is logged with its token count, so the teacher's log (RUN_DIR/teacher.log)
shows that each token of a step is scored once whatever the number of trainer ranks.

Lifecycle: `models.child_process.ChildProcess` (own process group, stopped on every exit path of
the trainer: normal end, exception, SIGTERM / SIGUSR2, exit); the child also exits when its parent
is gone (a trainer killed by SIGKILL). A teacher that dies mid-run makes the next request fail with
`TeacherGone` (what it was asked, its exit code, its log's last lines): the run fails like any
other failure and `hpcdistill resubmit` resumes it from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from hpcdistill.errors import ModelError
from hpcdistill.models.child_process import ChildProcess

log = logging.getLogger(__name__)

READY_FILE = "ready.json"
PARENT_POLL_S = 2.0


class TeacherGone(ModelError):
    """The teacher process stopped answering (it crashed, was killed, or was stopped)."""


class TeacherServer(ChildProcess):
    """The teacher process (module docstring); use as a context manager. `env`: the role's
    variables (its CUDA_VISIBLE_DEVICES); `host`: the address it listens on (127.0.0.1 unless
    trainer ranks on other nodes connect)."""

    what = "the teacher process"

    def __init__(self, model_id: str, *, dtype: str = "float32", device: str = "auto",
                 enable_thinking: bool | None = None, log_path: str | os.PathLike, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, startup_timeout_s: float = 1800, python: str | None = None):
        super().__init__(log_path, startup_timeout_s)
        self.model_id = model_id
        self.config = {"model_id": model_id, "dtype": dtype, "device": device, "enable_thinking": enable_thinking,
                       "host": host}
        self.host = host
        self.extra_env = dict(env or {})
        self.python = python or sys.executable
        self.authkey = secrets.token_bytes(32)
        self.port: int | None = None
        self.info: dict[str, Any] = {}
        self._ready_dir: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, int(self.port))

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> TeacherServer:
        """Start the child, wait until it has loaded the teacher and listens, then check it answers."""
        t0 = time.monotonic()
        self._ready_dir = tempfile.mkdtemp(prefix="hpcdistill-teacher-")
        ready = Path(self._ready_dir) / READY_FILE
        env = dict(os.environ) | self.extra_env
        proc = self._spawn([self.python, "-m", "hpcdistill.models.teacher_server"], env, stdin=subprocess.PIPE)
        proc.stdin.write(json.dumps(self.config | {"authkey": self.authkey.hex(), "ready": str(ready)}).encode())
        proc.stdin.close()  # the key is the child's only on its stdin
        log.info("teacher process starting for %s (pid %d, %s, log %s)", self.model_id, proc.pid,
                 ", ".join(f"{k}={v}" for k, v in self.extra_env.items()) or "inherited devices", self.log_path)
        self._await_ready(ready.exists, self.model_id, t0, expect="load the teacher and listen")
        self.port = int(json.loads(ready.read_text())["port"])
        with TeacherClient(self.address, self.authkey, server=self) as client:
            self.info = client.hello
        log.info("teacher process ready on port %d after %.1f s: %s", self.port, self.startup_s, self.info)
        return self

    def stop(self) -> None:
        super().stop()
        if self._ready_dir is not None:
            import shutil

            shutil.rmtree(self._ready_dir, ignore_errors=True)
            self._ready_dir = None


class TeacherClient:
    """One trainer rank's connection to the teacher process: a `TeacherService` (`score`) plus
    `generate` and `status`. `server`: the `TeacherServer` when this process started it (its
    exit code and log go into the message of a `TeacherGone`)."""

    def __init__(self, address: tuple[str, int], authkey: bytes, *, server: TeacherServer | None = None,
                 log_path: str | os.PathLike | None = None):
        self.address, self.server = tuple(address), server
        self.log_path = Path(log_path) if log_path else (server.log_path if server else None)
        try:
            self._conn = Client(self.address, authkey=authkey)
        except OSError as exc:
            raise TeacherGone(self._gone_message("connect", exc)) from exc
        self.hello: dict[str, Any] = self._call("hello")
        self.vocab_size = int(self.hello["vocab_size"])
        self.stop_token_ids = tuple(self.hello["stop_token_ids"])

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass

    def score(self, request):
        return self._call("score", request)

    def generate(self, prompts: list[list[int]], **kwargs: Any):
        return self._call("generate", prompts, kwargs)

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def _call(self, op: str, *args: Any) -> Any:
        try:
            self._conn.send((op, args))
            kind, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise TeacherGone(self._gone_message(op, exc)) from exc
        if kind == "error":
            raise ModelError(f"the teacher process failed a {op!r} request:\n{value}")
        return value

    def _gone_message(self, op: str, exc: BaseException) -> str:
        code = None
        if self.server is not None:
            for _ in range(20):  # a killed child is reaped a moment after its socket closes
                if (code := self.server.exit_code()) is not None:
                    break
                time.sleep(0.1)
        state = f"exited with code {code}" if code is not None else "stopped answering"
        where = f"{self.address[0]}:{self.address[1]}"
        tail = self.server.log_tail() if self.server is not None else "(on rank 0's node)"
        return (f"the teacher process at {where} {state} during a {op!r} request ({type(exc).__name__}: {exc}). "
                f"The run fails here; `hpcdistill resubmit` resumes it from its last checkpoint. "
                f"Last lines of {self.log_path or 'its log'}:\n{tail}")


# ------------------------------------------------------------------------------- the child process


def _load_teacher(config: dict[str, Any]):
    """The teacher handle on this process's devices: several visible GPUs spread the model over
    them (transformers' device map), one holds it whole, none: the CPU."""
    import torch

    from hpcdistill.models.chat import set_chat_options
    from hpcdistill.models.loading import load_model, load_model_id

    device = config["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spread = device == "cuda" and torch.cuda.device_count() > 1
    if spread:
        handle = load_model(config["model_id"], dtype=config["dtype"], device=device, spread=True)
        set_chat_options(handle.tokenizer, enable_thinking=config["enable_thinking"])
    else:
        handle = load_model_id(config["model_id"], dtype=config["dtype"], device=device,
                               enable_thinking=config["enable_thinking"])
    log.info("teacher %s loaded on %s%s", config["model_id"], handle.device,
             f" spread over {torch.cuda.device_count()} GPUs" if spread else "")
    return handle


class _Teacher:
    """What the child serves: one request at a time (a lock around the model), counted."""

    def __init__(self, handle):
        self.handle = handle
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "scored_tokens": 0, "generated_sequences": 0}

    def handle_request(self, op: str, args: tuple) -> Any:
        from hpcdistill.models.generation import generate
        from hpcdistill.models.split_scoring import teacher_columns

        with self.lock:
            self.counts["requests"] += 1
            if op == "hello":
                h = self.handle
                return {"model_id": h.model_id, "vocab_size": h.vocab_size, "stop_token_ids": list(h.stop_token_ids),
                        "pid": os.getpid(), "device": str(h.device)}
            if op == "status":
                return dict(self.counts)
            if op == "score":
                (request,) = args
                out = teacher_columns(self.handle, request)
                self.counts["scored_tokens"] += request.num_tokens
                log.info("scored %d sequences, %d tokens (total %d)", len(request.seqs), request.num_tokens,
                         self.counts["scored_tokens"])
                return out
            if op == "generate":
                prompts, kwargs = args
                out = generate(self.handle, prompts, progress=False, **kwargs)
                self.counts["generated_sequences"] += sum(len(g) for g in out)
                log.info("generated %d sequences", sum(len(g) for g in out))
                return out
            raise ValueError(f"unknown request {op!r}")


def _serve_connection(conn, teacher: _Teacher) -> None:
    with conn:
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                return  # the rank closed its connection (or is gone)
            try:
                reply = ("ok", teacher.handle_request(op, args))
            except Exception:  # noqa: BLE001 - the rank gets the traceback and fails with it
                log.exception("request %r failed", op)
                reply = ("error", traceback.format_exc())
            conn.send(reply)


def _exit_with_parent(parent: int) -> None:
    """The trainer that started us is gone (SIGKILL leaves no handler to stop us): exit too."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            log.warning("the trainer process %d is gone; the teacher process exits", parent)
            os._exit(3)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s teacher[%(process)d] %(levelname)s %(message)s")
    config = json.loads(sys.stdin.read())
    authkey, ready = bytes.fromhex(config.pop("authkey")), Path(config.pop("ready"))
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    teacher = _Teacher(_load_teacher(config))
    listener = Listener((config["host"], 0), authkey=authkey)
    port = listener.address[1]
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, ready)
    log.info("listening on %s:%d", config["host"], port)
    while True:
        try:
            conn = listener.accept()
        except Exception as exc:  # noqa: BLE001 - a failed handshake must not stop the teacher
            log.warning("a connection was refused: %s", exc)
            continue
        threading.Thread(target=_serve_connection, args=(conn, teacher), daemon=True).start()


if __name__ == "__main__":
    main()


__all__ = ["TeacherServer", "TeacherClient", "TeacherGone"]
