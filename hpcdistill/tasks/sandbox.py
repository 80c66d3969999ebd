"""Run untrusted Python (model-generated programs) with layered isolation.

`run_python(source, stdin=...)` writes the program into a fresh private working directory and
starts the supervisor `sandbox_launch.py` in its own session. The layers, outermost first:

- wall-clock deadline, enforced by the supervisor and, as a backstop, here;
- kernel namespaces where allowed: network (no interfaces but a down loopback), pid (every process
  the program starts dies with it), mount (the file system read-only except the working dir);
  as non-root these come through an unprivileged user namespace, when the kernel permits one;
- an unprivileged uid when running as root: a uid from a private pool (61000+, one per concurrent
  sandbox, held with a file lock) so RLIMIT_NPROC is enforced by the kernel (it is not for root)
  and the program cannot write anything it does not own;
- rlimits: CPU seconds, address space, file size (also caps captured output: stdout and stderr
  are files), process count, open files, no core files;
- the supervisor is a child subreaper: after the program ends every descendant is killed and reaped,
  even ones that left the process group with setsid;
- a Python audit hook (sandbox_guard.py) refusing writes outside the working directory, sockets,
  subprocesses, fork, signals and ctypes, with a message that names the reason;
- a minimal environment (PATH, HOME and TMPDIR = the working directory), stdin from a file (EOF at
  the end of the test input), `python -I -S -B` (no user site, no site-packages, no bytecode).

Which layers were on is recorded in `SandboxResult.isolation`, so a verdict says when, e.g.,
network isolation was unavailable on a host.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("sandbox_launch.py")
GUARD = Path(__file__).with_name("sandbox_guard.py")
UID_POOL = range(61000, 62000)
UID_LOCK_DIR = Path(tempfile.gettempdir()) / "hpcdistill-sandbox-uids"
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 6.0  # wall clock
    cpu_s: float | None = None  # CPU seconds per process; None = timeout_s
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_processes: int = 16  # processes and threads of the sandbox uid (RLIMIT_NPROC)
    max_output_bytes: int = 1 << 20  # per stream, and any file the program writes (RLIMIT_FSIZE)
    max_open_files: int = 64
    network_namespace: bool = True
    pid_namespace: bool = True  # off: only the subreaper cleanup catches escaped processes
    readonly_filesystem: bool = True
    python_guard: bool = True  # the audit-hook layer; tests turn it off to exercise the kernel layers


@dataclass(frozen=True)
class SandboxResult:
    status: str  # ok | runtime_error | blocked | timeout | memory | output_limit | killed | sandbox_error
    reason: str  # one human line: "Time limit exceeded (wall clock 2 s)", "" when ok
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    isolation: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _others_can_run(path: str) -> bool:
    """Whether a uid that owns nothing can execute `path` (every directory above it traversable)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def sandbox_python() -> tuple[str, bool]:
    """(interpreter, drop_privileges): the interpreter the program runs under.

    Root drops to a pool uid, which must be able to run the interpreter: ours when it is reachable
    (not under a 0700 /root), else the system's. Non-root keeps its uid and its interpreter.
    """
    if os.geteuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, *SYSTEM_PYTHONS):
        if candidate and _others_can_run(candidate):
            return candidate, True
    logger.warning("no Python interpreter is usable by an unprivileged uid; sandbox runs as root")
    return sys.executable, False


@contextmanager
def pool_uid() -> Iterator[int]:
    """A uid of the pool no other live sandbox (any process on this host) holds; no passwd entry."""
    UID_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    start = os.getpid() % len(UID_POOL)
    for i in range(len(UID_POOL)):
        uid = UID_POOL[(start + i) % len(UID_POOL)]
        try:
            pwd.getpwuid(uid)
            continue  # a real account: never borrow it
        except KeyError:
            pass
        fd = os.open(UID_LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"all {len(UID_POOL)} sandbox uids are in use")


@contextmanager
def _maybe_uid(drop: bool) -> Iterator[int | None]:
    if not drop:
        yield None
        return
    with pool_uid() as uid:
        yield uid


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    text = data[:cap].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > cap else "")


def run_python(source: str, *, stdin: str = "", files: dict[str, str] | None = None,
               limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as `main.py` in a fresh sandbox; `files` are extra files in its working dir."""
    python, drop = sandbox_python()
    with tempfile.TemporaryDirectory(prefix="hpcdistill-sandbox-") as run_dir, _maybe_uid(drop) as uid:
        run = Path(run_dir)
        run.chmod(0o711)  # the sandbox uid may pass through to work/, not list or read run/
        work = run / "work"
        work.mkdir(mode=0o700)
        for name, text in {**(files or {}), "main.py": source}.items():
            (work / name).write_text(text, encoding="utf-8")
        if uid is not None:
            for p in [work, *work.iterdir()]:
                os.chown(p, uid, uid)
        (run / "stdin.txt").write_text(stdin, encoding="utf-8")
        cfg = {"work": str(work.resolve()), "program": str((work / "main.py").resolve()), "python": python,
               "uid": uid, "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s or limits.timeout_s,
               "memory_mb": limits.memory_mb, "max_processes": limits.max_processes,
               "max_file_bytes": limits.max_output_bytes, "max_open_files": limits.max_open_files,
               "network_namespace": limits.network_namespace, "pid_namespace": limits.pid_namespace,
               "readonly_filesystem": limits.readonly_filesystem,
               "python_guard": limits.python_guard, "guard_source": GUARD.read_text(),
               "report_path": str(run / "report.json")}
        (run / "config.json").write_text(json.dumps(cfg))
        with open(run / "stdin.txt", "rb") as fin, open(run / "stdout.txt", "wb") as fout, \
                open(run / "stderr.txt", "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(LAUNCHER), str(run / "config.json")],
                                    stdin=fin, stdout=fout, stderr=ferr, start_new_session=True,
                                    close_fds=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            try:
                proc.wait(timeout=limits.timeout_s + 10)
            except subprocess.TimeoutExpired:  # the supervisor itself hung: kill its whole session
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stdout = _read_capped(run / "stdout.txt", limits.max_output_bytes)
        stderr = _read_capped(run / "stderr.txt", limits.max_output_bytes)
        try:
            report = json.loads((run / "report.json").read_text())
        except (OSError, ValueError):
            return SandboxResult("sandbox_error", f"Sandbox error: the supervisor exited with {proc.returncode}",
                                 None, None, stdout, stderr, 0.0, 0.0, {})
    return _classify(report, stdout, stderr, limits)


def _classify(report: dict, stdout: str, stderr: str, limits: SandboxLimits) -> SandboxResult:
    code, sig = report["exit_code"], report["signal"]
    cpu_limit = limits.cpu_s or limits.timeout_s
    status, reason = "ok", ""
    if report["timed_out"]:
        status, reason = "timeout", f"Time limit exceeded (wall clock {limits.timeout_s:g} s)"
    elif sig in (signal.SIGXCPU, signal.SIGKILL) and report["cpu_s"] >= cpu_limit - 0.05:
        status, reason = "timeout", f"Time limit exceeded (CPU time {cpu_limit:g} s)"
    elif "MemoryError" in stderr[-2000:] or (sig is not None and report["max_rss_kb"] >= limits.memory_mb * 900):
        status, reason = "memory", f"Memory limit exceeded ({limits.memory_mb} MB)"
    elif sig == signal.SIGXFSZ or "File too large" in stderr[-2000:] or "[output truncated]" in stdout:
        status, reason = "output_limit", f"Output limit exceeded ({limits.max_output_bytes} bytes)"
    elif "PermissionError: sandbox:" in stderr:
        line = next(s for s in reversed(stderr.splitlines()) if "PermissionError: sandbox:" in s)
        status, reason = "blocked", "Blocked by the sandbox: " + line.split("sandbox:", 1)[1].strip()
    elif sig is not None:
        status, reason = "killed", f"Killed: signal {signal.Signals(sig).name}"
    elif code == 126 and "sandbox setup failed" in stderr:
        status, reason = "sandbox_error", "Sandbox error: " + stderr.strip().splitlines()[-1]
    elif code != 0:
        status, reason = "runtime_error", f"Runtime error (exit code {code})"
    return SandboxResult(status, reason, code, sig, stdout, stderr, report["wall_s"], report["cpu_s"],
                         report["isolation"])


__all__ = ["SandboxLimits", "SandboxResult", "run_python", "sandbox_python", "pool_uid"]
