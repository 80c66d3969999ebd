"""The first code the sandboxed interpreter runs (passed with `python -I -S -B -c`; stdlib only).

argv: [-c, CONFIG_JSON, PROGRAM]. Installs an audit hook (PEP 578) that refuses, with a
PermissionError naming the reason, what a solution to a programming problem never needs: opening
files for writing outside the working directory (and removing, renaming, linking there), sockets,
starting processes (fork, exec, spawn, subprocess, os.system), signals to other processes and
loading native code through ctypes. Then runs PROGRAM as `__main__`.

This is one layer of several (see `hpcdistill.tasks.sandbox`); an audit hook can be bypassed by
determined native code, which is why the kernel layers (uid, rlimits, namespaces) stay underneath.
Must run on any Python >= 3.8, since the sandbox may use the system interpreter.
"""

import json
import os
import sys


def _install_guard(work):
    realpath, join, fspath = os.path.realpath, os.path.join, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = {
        "socket.__new__": "opening a socket", "socket.connect": "network access",
        "socket.bind": "network access", "subprocess.Popen": "starting a subprocess",
        "os.system": "starting a subprocess", "os.exec": "starting a program", "os.posix_spawn":
        "starting a program", "os.spawn": "starting a program", "os.fork": "forking a process",
        "os.forkpty": "forking a process", "pty.spawn": "starting a program",
        "os.kill": "sending a signal", "os.killpg": "sending a signal", "ctypes.dlopen": "loading native code",
        "ctypes.dlsym": "loading native code", "os.setuid": "changing user",
    }
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2,
                   "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "shutil.rmtree": 1}

    def inside(path):
        if isinstance(path, int):  # an already open descriptor (stdout, ...)
            return True
        full = realpath(join(work, fspath(path)))
        return full == work or full.startswith(work + os.sep)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
        elif event in refused:
            raise PermissionError(f"sandbox: {refused[event]} is not allowed ({event})")
        elif event in path_events:
            for path in args[:path_events[event]]:
                if path is not None and not isinstance(path, int) and not inside(path):
                    raise PermissionError(
                        f"sandbox: changing files outside the working directory is not allowed: {path!r}")

    sys.addaudithook(hook)


def _main():
    config, program = json.loads(sys.argv[1]), sys.argv[2]
    work = os.path.realpath(config["work"])
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, os.path.basename(program), "exec")
    if config["guard"]:
        _install_guard(work)
    sys.argv = [program]
    module = type(sys)("__main__")
    module.__file__ = program
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


_main()
