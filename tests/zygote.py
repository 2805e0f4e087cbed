"""`python -m trainer ARGS` for the tests, forked from a process that has imported torch and the trainer.

Why: a trainer process spends ~2-3 s of CPU importing torch, torchvision and the trainer before it does
any work, and the suite starts ~50 of them: on a 2-core machine that is a good part of `make test`.
Each call here is still a process of its own (its pid, exit status, stdout, stderr, DataLoader workers,
signals); only the imports happen once per test process, in a zygote that never runs a torch operation,
so forking it is what the DataLoader does for its workers anyway. A call that passes its own
environment or working directory, or made after a test changed os.environ (other than pytest's
PYTEST_CURRENT_TEST), gets a fresh interpreter as before (variables such as allocator settings are read
at import).

Protocol (one JSON line each way, on the zygote's stdin/stdout): {"argv", "cwd", "env", "out", "err"} -> {"pid"},
then {"returncode"} once the child has exited. The child writes its stdout/stderr to the files named.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torchvision", "trainer.cli", "trainer.fit", "trainer.predict", "trainer.probe", "trainer.export")


def _child(request: dict[str, Any]) -> None:
    """In the forked child: `python -m trainer ARGV` with stdout/stderr to the request's files; never returns."""
    import runpy

    code: Any = 0
    try:
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])  # differs from the zygote's only in PER_TEST (run_trainer checks)
        sys.argv = ["trainer", *request["argv"]]
        runpy.run_module("trainer", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # what an uncaught exception does to `python -m trainer`: traceback, status 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def serve() -> None:
    """The zygote: imports, then forks one child per request until stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    """One zygote per test process, started on first use; run() is subprocess.run's answer for `-m trainer`."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, env=self.env)
        self.buffer = b""
        self.lock = threading.Lock()  # one request at a time on the pipe

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _reply(self, timeout: float | None) -> dict[str, Any] | None:
        """The next line from the zygote, or None after TIMEOUT seconds without one."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the test zygote exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        with self.lock, tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "out": str(out), "err": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._reply(None)["pid"]
            done = self._reply(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                raise subprocess.TimeoutExpired(["trainer", *argv], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess([sys.executable, "-m", "trainer", *argv], done["returncode"],
                                               out.read_text(), err.read_text())


_zygote: Zygote | None = None
PER_TEST = {"PYTEST_CURRENT_TEST"}  # pytest sets it for every test; the child gets the caller's value


def _import_env(env: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in PER_TEST}


def run_trainer(*args: str | os.PathLike[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run([python, -m, trainer, *ARGS], capture_output=True, text=True, timeout=TIMEOUT, **KW)."""
    global _zygote
    argv = [str(a) for a in args]
    if kw or (_zygote is not None and _import_env(os.environ) != _import_env(_zygote.env)):
        return subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True,
                              timeout=timeout, **kw)
    if _zygote is None or not _zygote.alive():
        _zygote = Zygote()
    return _zygote.run(argv, timeout)


if __name__ == "__main__":
    serve()
