"""The sandbox supervisor: `python -I -S -B sandbox_launch.py CONFIG.json` (stdlib only).

Started by `hpcdistill.tasks.sandbox.run_python` in a new session with stdin/stdout/stderr already
pointing at files. It never imports hpcdistill (the -I interpreter does not see the package), so
this file must stay self-contained. Steps:

1. enter new namespaces where the kernel allows (net: no network; pid: the program is PID 1 of
   its own namespace, so the kernel kills every process left in it when the program exits; mount:
   the whole file system read-only except the working directory);
2. fork the program's process: own session, cwd = working directory, rlimits (CPU, address space,
   file size, process count, open files, no core files), unprivileged uid when run as root,
   minimal environment; exec the interpreter with the Python guard (`sandbox_guard.py`);
3. wait with a wall-clock deadline, then kill everything that descends from this supervisor (it is
   a child subreaper, so orphans come back to it) and write a report (exit status, signal,
   timeout, CPU seconds, which isolation layers were on) to the report path of the config.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 16384, 1 << 18, 1 << 21
PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG = 36, 1
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

libc = ctypes.CDLL(None, use_errno=True)


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def enter_namespaces(want_net: bool, want_pid: bool, want_user: bool) -> dict[str, str]:
    """unshare() what the kernel allows; as non-root through a user namespace mapping our own uid.

    The mount namespace comes later, in the init process, so that the supervisor keeps a writable
    view (it writes the report); `want_user` asks for the user namespace that makes that possible.
    """
    wanted = {"network_namespace": (want_net, CLONE_NEWNET), "pid_namespace": (want_pid, CLONE_NEWPID)}
    state = {k: "off (not requested)" for k, (want, _) in wanted.items() if not want}
    flags = {k: f for k, (want, f) in wanted.items() if want}
    if not flags and not want_user:
        return state
    if os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
        if libc.unshare(CLONE_NEWUSER) != 0:
            reason = f"unavailable: not root and user namespaces are refused ({_errno_text()})"
            return {**state, **{k: reason for k in flags}}
        try:  # map our own uid/gid so the files we create stay ours
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as e:
            return {**state, **{k: f"unavailable: user namespace id mapping failed ({e})" for k in flags}}
    for name, flag in flags.items():
        if libc.unshare(flag) == 0:
            state[name] = "on"
        else:
            state[name] = f"unavailable: unshare refused ({_errno_text()})"
    return state


def make_filesystem_readonly(work: str) -> str:
    """In our own mount namespace: every mount read-only except a bind mount of `work`."""
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"unavailable: cannot make mounts private ({_errno_text()})"
    wb = work.encode()
    if libc.mount(wb, wb, None, MS_BIND | MS_REC, None) != 0:
        return f"unavailable: cannot bind the working directory ({_errno_text()})"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    failed = []
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point == work or point.startswith(work + "/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= MOUNT_FLAGS.get(opt, 0)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            failed.append(point)
    if failed:
        return f"partial: {len(failed)} of {len(mounts)} mounts stay writable ({', '.join(failed[:3])})"
    return "on"


def count_user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            count += int(line.split()[1]) == uid
                            break
            except OSError:
                pass
    return count


def set_limits(cfg: dict) -> None:
    cpu = max(1, int(cfg["cpu_s"] + 0.999))
    nproc = cfg["max_processes"]
    if cfg["uid"] is None and os.getuid() != 0:  # the count is per uid: leave room for our own processes
        nproc += count_user_processes(os.getuid())
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
              (resource.RLIMIT_AS, cfg["memory_mb"] * 1024 * 1024),
              (resource.RLIMIT_FSIZE, cfg["max_file_bytes"]), (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
              (resource.RLIMIT_NPROC, nproc)]
    for which, value in limits:
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(which, (soft, hard))


def run_program(cfg: dict) -> None:
    """In the program's process: never returns (exec, or _exit(126) with the reason on stderr)."""
    try:
        os.setsid()
        os.chdir(cfg["work"])
        set_limits(cfg)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        env = {"PATH": "/usr/bin:/bin", "HOME": cfg["work"], "TMPDIR": cfg["work"], "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONHASHSEED": "0"}
        argv = [cfg["python"], "-I", "-S", "-B", "-c", cfg["guard_source"],
                json.dumps({"work": cfg["work"], "guard": cfg["python_guard"]}), cfg["program"]]
        os.execve(cfg["python"], argv, env)
    except BaseException as e:  # noqa: BLE001 - report anything, never return into the supervisor
        try:
            os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        finally:
            os._exit(126)


def run_init(cfg: dict, report_fd: int) -> None:
    """The program's parent (PID 1 of the pid namespace when there is one): a minimal init.

    The program itself is not PID 1, so signals (SIGXCPU at the CPU limit) act on it normally.
    Reaps orphans; when the program exits, sends its wait status to the supervisor and exits, and
    the kernel then kills whatever is left in the namespace.
    """
    try:
        isolation = cfg["isolation"]
        if not cfg["readonly_filesystem"]:
            isolation["readonly_filesystem"] = "off (not requested)"
        elif libc.unshare(CLONE_NEWNS) != 0:  # our own: the supervisor's stays writable
            isolation["readonly_filesystem"] = f"unavailable: no mount namespace ({_errno_text()})"
        else:
            isolation["readonly_filesystem"] = make_filesystem_readonly(cfg["work"])
        program = os.fork()
        if program == 0:
            os.close(report_fd)
            run_program(cfg)
        while True:
            pid, status = os.wait()
            if pid == program:
                break
        os.write(report_fd, json.dumps({"status": status, "isolation": isolation}).encode())
    finally:
        os._exit(0)


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
                    pids.append(int(entry))
            except (OSError, ValueError):
                pass
    return pids


def kill_descendants() -> int:
    """Kill and reap every process below us; as a subreaper, orphans are our children too."""
    me, killed = os.getpid(), 0
    for _ in range(2000):
        kids = child_pids(me)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if not kids:
                return killed
        time.sleep(0.002)
    return killed


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # our verifier died: die too
    isolation = enter_namespaces(cfg["network_namespace"], cfg["pid_namespace"], cfg["readonly_filesystem"])
    isolation["python_guard"] = "on" if cfg["python_guard"] else "off (not requested)"
    isolation["user"] = (f"uid {cfg['uid']} (dropped from root)" if cfg["uid"] is not None
                         else f"unavailable: not root, runs as uid {os.getuid()}" if os.getuid() != 0
                         else "unavailable: no interpreter readable by an unprivileged uid")
    cfg["isolation"] = isolation
    report_r, report_w = os.pipe()
    start = time.monotonic()
    init = os.fork()
    if init == 0:
        os.close(report_r)
        run_init(cfg, report_w)
    os.close(report_w)
    deadline, timed_out, pause = start + cfg["timeout_s"], False, 0.001
    while not os.waitpid(init, os.WNOHANG)[0]:
        if time.monotonic() >= deadline:
            timed_out = True
            os.kill(init, signal.SIGKILL)  # with a pid namespace, the kernel kills all of it
            os.waitpid(init, 0)
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    wall = time.monotonic() - start
    leftover = kill_descendants()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with os.fdopen(report_r) as f:
        text = f.read()
    from_init = json.loads(text) if text else {"status": None, "isolation": isolation}
    status = from_init["status"]
    report = {"exit_code": os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None,
              "signal": os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None,
              "timed_out": timed_out, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
              "max_rss_kb": usage.ru_maxrss, "leftover_processes_killed": leftover,
              "isolation": from_init["isolation"]}
    with open(cfg["report_path"], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
