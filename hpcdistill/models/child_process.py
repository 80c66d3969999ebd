"""A server the task runs as a child process: its own process group, a log file, a readiness
wait that fails with the log's last lines, and a stop on every exit path.

Two roles use it: the rollout role's vLLM server (`models.vllm_server.VLLMServer`) and the teacher
role (`models.teacher_server.TeacherServer`). The child leads its own process group (vLLM's API
server spawns an engine-core and a worker process), so `stop` signals the whole group: SIGTERM,
then SIGKILL after a grace period. It runs when the `with` block ends normally or by an
exception, on SIGTERM / SIGUSR2 (Slurm's and submitit's preemption signals: the child is stopped
first, then the previous handler runs) and at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcdistill.errors import ModelError

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
LOG_TAIL_LINES = 40
SHUTDOWN_GRACE_S = 15.0


class ChildProcess:
    """Lifecycle of one child server; subclasses say how to start it and when it is ready.
    `what`: how messages name it ("the vLLM server", "the teacher process")."""

    what = "the child process"

    def __init__(self, log_path: str | os.PathLike, startup_timeout_s: float):
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.startup_s: float | None = None
        self._proc: subprocess.Popen | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._stop_lock = threading.RLock()  # re-entered by a signal arriving mid-stop

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _spawn(self, cmd: Sequence[str], env: Mapping[str, str], *, stdin: Any = subprocess.DEVNULL,
               hint: str = "") -> subprocess.Popen:
        """Start `cmd` in its own process group, output appended to the log; install the stops."""
        if self._proc is not None:
            raise RuntimeError(f"{self.what} is already running")
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n# hpcdistill: {' '.join(cmd)}\n".encode())
            log_file.flush()
            try:
                self._proc = subprocess.Popen(list(cmd), stdout=log_file, stderr=subprocess.STDOUT, stdin=stdin,
                                              env=dict(env), start_new_session=True)  # own process group
            except OSError as exc:
                self._proc = None
                raise ModelError(f"cannot start {self.what} ({cmd[0]!r}): {exc}. {hint}".rstrip()) from exc
        self._install_handlers()
        atexit.register(self.stop)
        return self._proc

    def _await_ready(self, ready: Callable[[], bool], subject: str, t0: float, expect: str = "get ready") -> None:
        """Poll `ready` until it holds; on the child's exit or the startup timeout, stop it and
        raise ModelError with the log's last lines. `subject`: what it serves; `expect`: what it
        failed to do in time, for the message."""
        deadline = t0 + self.startup_timeout_s
        while True:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                self.stop()
                raise ModelError(f"{self.what} for {subject} exited with code {code} during startup. "
                                 f"Last lines of {self.log_path}:\n{self.log_tail()}")
            if ready():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ModelError(f"{self.what} for {subject} did not {expect} within {self.startup_timeout_s:.0f} s. "
                                 f"Last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        """Terminate the child's whole process group (SIGTERM, then SIGKILL after a grace period).
        Safe to call more than once and from a signal handler."""
        with self._stop_lock:
            proc, self._proc = self._proc, None
            self._restore_handlers()
            atexit.unregister(self.stop)
            if proc is None:
                return
            pgid = proc.pid  # start_new_session: the child leads its own group
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            while time.monotonic() < deadline:
                proc.poll()
                if proc.returncode is not None and not _group_alive(pgid):
                    break
                time.sleep(0.1)
            else:
                log.warning("%s (group %d) did not stop within %.0f s; killing it", self.what, pgid, SHUTDOWN_GRACE_S)
                _signal_group(pgid, signal.SIGKILL)
                proc.wait()
            log.info("%s (pid %d) stopped", self.what, pgid)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still applies
        for sig in PREEMPTION_SIGNALS:
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:  # unless someone replaced ours since
                signal.signal(sig, previous)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        log.warning("signal %d: stopping %s before passing it on", signum, self.what)
        self.stop()
        if callable(previous):
            previous(signum, frame)  # e.g. submitit's checkpoint-and-requeue handler
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["ChildProcess", "PREEMPTION_SIGNALS", "SHUTDOWN_GRACE_S"]
