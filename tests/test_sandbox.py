"""The sandbox against real hostile programs: each is stopped, scored, cleaned up, and the next runs.

Small limits keep every test to a few seconds. Tests of a kernel layer turn the Python guard off,
so the kernel (rlimits, uid, namespaces) is what stops the program, not the audit hook.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from hpcdistill.tasks.sandbox import UID_POOL, SandboxLimits, run_python

FAST = SandboxLimits(timeout_s=2.0, memory_mb=128, max_processes=8)
NO_GUARD = SandboxLimits(timeout_s=2.0, memory_mb=128, max_processes=8, python_guard=False)
IS_ROOT = os.geteuid() == 0


def sandbox_processes() -> list[int]:
    """Live processes that belong to a sandbox: a pool uid, or a sandbox directory on the command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        state = next(line for line in status.splitlines() if line.startswith("State:"))
        if "Z" in state.split()[1]:
            continue
        if uid in UID_POOL or b"hpcdistill-sandbox-" in cmdline:
            found.append(int(entry))
    return found


def assert_next_program_runs() -> None:
    result = run_python("print(int(input()) * 2)\n", stdin="21\n", limits=FAST)
    assert result.status == "ok", result
    assert result.stdout == "42\n"


def test_correct_program_reads_stdin_and_writes_stdout():
    result = run_python("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n",
                        stdin="2 40\n", limits=FAST)
    assert result.status == "ok" and result.reason == ""
    assert result.exit_code == 0 and result.stdout == "42\n" and result.stderr == ""


def test_runtime_error_keeps_the_traceback_tail():
    result = run_python("x = [1, 2]\nprint(x[5])\n", limits=FAST)
    assert result.status == "runtime_error" and result.exit_code == 1
    assert "IndexError: list index out of range" in result.stderr
    assert 'File "main.py", line 2' in result.stderr


def test_syntax_error_is_a_runtime_error_with_the_line():
    result = run_python("def f(:\n    pass\n", limits=FAST)
    assert result.status == "runtime_error"
    assert "SyntaxError" in result.stderr and "main.py" in result.stderr


def test_infinite_loop_is_stopped_at_the_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1.0, memory_mb=128))
    assert time.monotonic() - start < 4.0
    assert result.status == "timeout"
    assert result.reason in ("Time limit exceeded (wall clock 1 s)", "Time limit exceeded (CPU time 1 s)")
    assert sandbox_processes() == []
    assert_next_program_runs()


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    result = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout_s=8.0, cpu_s=1.0, memory_mb=128))
    assert result.status == "timeout", result
    assert result.reason == "Time limit exceeded (CPU time 1 s)", result
    assert result.wall_s < 7.0


def test_sleeping_program_is_stopped_at_the_wall_clock_limit():
    result = run_python("import time\ntime.sleep(60)\n", limits=SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout" and result.wall_s < 2.0
    assert result.reason == "Time limit exceeded (wall clock 1 s)"


def test_program_reading_stdin_forever_gets_eof_and_is_stopped():
    source = "import sys\nwhile True:\n    sys.stdin.read()\n"  # EOF returns '' forever: a busy loop
    result = run_python(source, stdin="1\n", limits=SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout"
    blocking = run_python("while True:\n    input()\n", stdin="1\n2\n", limits=FAST)
    assert blocking.status == "runtime_error" and "EOFError" in blocking.stderr  # stdin is closed


def test_fork_bomb_is_refused_by_the_guard():
    result = run_python("import os\nwhile True:\n    os.fork()\n", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == "Blocked by the sandbox: forking a process is not allowed (os.fork)"


@pytest.mark.skipif(not IS_ROOT, reason="the pool uid (kernel-enforced RLIMIT_NPROC) needs root")
def test_fork_bomb_without_the_guard_is_contained_and_every_process_killed():
    source = ("import os, time\n"
              "while True:\n"
              "    try:\n"
              "        if os.fork() == 0:\n"
              "            os.setsid()  # try to leave the process group\n"
              "    except OSError:\n"
              "        time.sleep(0.01)\n")
    result = run_python(source, limits=NO_GUARD)
    assert result.status == "timeout"
    assert result.isolation["user"].startswith("uid ")
    assert sandbox_processes() == []
    assert_next_program_runs()


@pytest.mark.skipif(not IS_ROOT, reason="the pool uid (kernel-enforced RLIMIT_NPROC) needs root")
def test_escaped_daemon_is_killed_by_the_subreaper_without_a_pid_namespace():
    source = ("import os, time\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"
              "    if os.fork() == 0:\n"
              "        time.sleep(60)  # a daemon: new session, parent gone\n"
              "    os._exit(0)\n"
              "print('parent done')\n")
    limits = SandboxLimits(timeout_s=2.0, python_guard=False, pid_namespace=False)
    result = run_python(source, limits=limits)
    assert result.status == "ok" and result.stdout == "parent done\n"
    assert result.isolation["pid_namespace"] == "off (not requested)"
    assert sandbox_processes() == []


def test_memory_bomb_is_stopped_with_memory_limit_exceeded():
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    result = run_python(source, limits=NO_GUARD)
    assert result.status == "memory"
    assert result.reason == "Memory limit exceeded (128 MB)"
    assert sandbox_processes() == []
    assert_next_program_runs()


def test_huge_output_is_capped():
    limits = SandboxLimits(timeout_s=2.0, max_output_bytes=10_000)
    result = run_python("while True:\n    print('x' * 1000)\n", limits=limits)
    assert result.status == "output_limit"
    assert len(result.stdout) <= 10_000 + len("\n[output truncated]")


def _outside_target() -> Path:
    return Path("/tmp") / f"hpcdistill-escape-{uuid.uuid4().hex}.txt"  # /tmp is world-writable


def test_write_outside_the_working_directory_is_refused_by_the_guard():
    target = _outside_target()
    result = run_python(f"open({str(target)!r}, 'w').write('escaped')\n", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == f"Blocked by the sandbox: writing outside the working directory is not allowed: '{target}'"
    assert not target.exists()
    inside = run_python("open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())\n", limits=FAST)
    assert inside.status == "ok" and inside.stdout == "ok\n"  # its own directory stays writable


def test_write_outside_without_the_guard_fails_in_the_kernel():
    target = _outside_target()
    source = f"import os\nos.system('true')\nopen({str(target)!r}, 'w').write('escaped')\n"
    result = run_python(source, limits=NO_GUARD)
    assert not target.exists()
    assert result.status == "runtime_error"
    if result.isolation["readonly_filesystem"] == "on":
        assert "Read-only file system" in result.stderr
    else:  # without a mount namespace only the uid protects, and /tmp is world-writable
        pytest.skip(f"read-only filesystem layer: {result.isolation['readonly_filesystem']}")
    assert_next_program_runs()


def test_socket_is_refused_by_the_guard():
    result = run_python("import socket\nsocket.socket()\n", limits=FAST)
    assert result.status == "blocked"
    assert result.reason == "Blocked by the sandbox: opening a socket is not allowed (socket.__new__)"


def test_network_namespace_cuts_off_a_local_server():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        source = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                  "s.sendall(b'leak')\nprint('connected')\n")
        result = run_python(source, limits=NO_GUARD)
        if result.isolation["network_namespace"] != "on":
            pytest.skip(f"network namespace: {result.isolation['network_namespace']}")
        assert result.status == "runtime_error" and "connected" not in result.stdout
        assert "OSError" in result.stderr or "unreachable" in result.stderr.lower()
        with pytest.raises(TimeoutError):
            server.accept()
    assert_next_program_runs()


def test_environment_is_minimal_and_home_is_the_working_directory():
    source = "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())\n"
    os.environ["HPCDISTILL_SECRET_FOR_TEST"] = "do-not-leak"
    try:
        result = run_python(source, limits=FAST)
    finally:
        del os.environ["HPCDISTILL_SECRET_FOR_TEST"]
    assert result.status == "ok"
    names, home_is_cwd = result.stdout.splitlines()
    assert "HPCDISTILL_SECRET_FOR_TEST" not in names and home_is_cwd == "True"


def test_isolation_layers_are_recorded():
    result = run_python("pass\n", limits=FAST)
    assert set(result.isolation) >= {"network_namespace", "pid_namespace", "readonly_filesystem", "user",
                                     "python_guard"}
    assert result.isolation["python_guard"] == "on"
    assert all(v == "on" or v.startswith(("unavailable", "partial", "uid")) for v in result.isolation.values())
