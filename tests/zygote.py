"""``trellis`` commands for the tests without paying for Python's imports on every one.

A run of the suite starts the CLI ~800 times, and each start spent ~0.5 s of its ~0.6 s of CPU
importing SQLAlchemy, SQLModel's tables, pydantic and cryptography: most of a core for the
whole run, on a 2-core machine where the suite must finish in 10 minutes. So each pytest worker
keeps one *zygote*: a Python process that has imported ``cli`` and its command modules once,
and forks a child for each command. The child is a process of its own, as an ``exec`` of the
``trellis`` script would be: its own pid, the caller's stdin/stdout/stderr, environment,
working directory and umask, the signal dispositions of a fresh interpreter, ``sys.argv`` as
the script sees it; it runs the script's entry point (``cli.launch.main``) and leaves through
the interpreter's normal exit (``atexit``, threads joined, files flushed). What it skips is the
import, so what a test checks about the import or the life of the process itself runs the
real executable instead:

* ``serve`` and ``agent``, unless the caller says otherwise (``real=False``: a ``serve`` that
  must refuse its settings before it starts anything): servers, signals, workers and their
  supervisor;
* a caller asking for it (``real=True``): the README walkthrough, start-up tests;
* an environment whose ``PYTHON*`` settings differ from the zygote's (they act at start-up);
* every call, with ``TRELLIS_TESTS_EXEC=1`` in the environment of the test run.

The zygote is a child of the worker and ends when the worker does (EOF on its stdin).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRELLIS = str(Path(sys.executable).with_name("trellis"))
REAL_BY_DEFAULT = frozenset({"serve", "agent"})  # their process life is what tests check
# Settings read once at start-up that change nothing a command does once it runs.
_START_UP_ONLY = frozenset({"PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"})
_MESSAGE = 1 << 20

__all__ = ["TRELLIS", "run"]


# --- the zygote process ----------------------------------------------------------------------


def _serve(path: str) -> None:
    """Import, then fork a child per request, and report each child's pid and wait status.

    No ``try``/``with`` here: a child leaves this function by ``SystemExit`` (or an uncaught
    exception) raised from the command, through the interpreter's own exit."""
    import cli.launch
    import cli.main

    for name, (module, _attribute) in cli.main.COMMANDS.items():
        if name != "agent":  # a ``serve`` refusing its settings is asked for; an agent never
            importlib.import_module(module)
    import gc

    gc.collect()
    gc.freeze()  # what the children inherit stays out of their collector's way, as in a server

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    os.write(1, b"ready\n")

    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, wake_read, 0], [], [])
        if 0 in readable and not os.read(0, 4096):
            break  # the worker is gone
        if wake_read in readable:
            os.read(wake_read, 4096)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            with contextlib.suppress(OSError):
                connection.send(json.dumps({"status": status}).encode())
            connection.close()
        if listener in readable:
            connection, _ = listener.accept()
            message, fds, _flags, _address = socket.recv_fds(connection, _MESSAGE, 3)
            pid = os.fork()
            if pid == 0:
                _become(json.loads(message), fds, [listener, connection], [wake_read, wake_write])
            for fd in fds:
                os.close(fd)
            children[pid] = connection
            with contextlib.suppress(OSError):
                connection.send(json.dumps({"pid": pid}).encode())
    os.unlink(path)


def _become(
    request: dict[str, Any], fds: list[int], sockets: list[socket.socket], pipes: list[int]
) -> None:
    """In the child: take the caller's files, environment, directory and umask, and run the
    command as the ``trellis`` script does. Never returns: the command's exit ends the process."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sock in sockets:
        sock.close()
    for fd in pipes:
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(TRELLIS).parent)  # the script's directory, as for the executable
    sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())  # as a new interpreter decides
    from cli.launch import main

    sys.exit(main())


# --- the tests' side --------------------------------------------------------------------------


class _Zygote:
    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="trellis-zygote-")
        self.path = os.path.join(self.directory, "socket")
        # A test's own settings (it may be the first to ask) stay out of what is imported.
        self.environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TRELLIS_", "PROMETHEUS_"))
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
            env=self.environment,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the test zygote did not start (exit {self.process.wait()})")

    def serves(self, env: Mapping[str, str]) -> bool:
        def python(environment: Mapping[str, str]) -> dict[str, str]:
            return {
                key: value
                for key, value in environment.items()
                if key.startswith("PYTHON") and key not in _START_UP_ONLY
            }

        return self.process.poll() is None and python(env) == python(self.environment)

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


_zygote: _Zygote | None = None
_starting = threading.Lock()


def _the_zygote() -> _Zygote:
    global _zygote
    with _starting:
        if _zygote is None or _zygote.process.poll() is not None:
            _zygote = _Zygote()
            import atexit

            atexit.register(_zygote.close)
        return _zygote


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise RuntimeError("no Umask in /proc/self/status")


def _text(data: bytes) -> str:
    """As ``subprocess.run(text=True)`` decodes: the locale's UTF-8, universal newlines."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
    cwd: str | os.PathLike[str] | None = None,
    merge_stderr: bool = False,
    real: bool | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([TRELLIS, *args], capture_output=True, text=True)``, in a child of the
    zygote unless the command, the caller or the environment needs the real executable."""
    argv = [TRELLIS, *args]
    environment = dict(os.environ if env is None else env)
    from cli.launch import command_of

    if real is None:
        real = command_of(list(args)) in REAL_BY_DEFAULT
    every_exec = os.environ.get("TRELLIS_TESTS_EXEC", "") not in ("", "0")
    if real or every_exec or not _the_zygote().serves(environment):
        return subprocess.run(
            argv,
            env=environment,
            input=input,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
    return _forked(argv, environment, input, timeout, cwd, merge_stderr)


def _forked(
    argv: list[str],
    environment: dict[str, str],
    input: str | None,
    timeout: float,
    cwd: str | os.PathLike[str] | None,
    merge_stderr: bool,
) -> subprocess.CompletedProcess[str]:
    out_read, out_write = os.pipe()
    err_read, err_write = (out_read, out_write) if merge_stderr else os.pipe()
    in_read, in_write = os.pipe() if input is not None else (os.dup(0), -1)
    request = {
        "argv": argv,
        "env": environment,
        "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
        "umask": _umask(),
    }
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(_the_zygote().path)
        socket.send_fds(connection, [json.dumps(request).encode()], [in_read, out_write, err_write])
    finally:
        for fd in {in_read, out_write, err_write}:
            os.close(fd)
    deadline = time.monotonic() + timeout
    pid = json.loads(connection.recv(_MESSAGE))["pid"]
    if in_write != -1:
        writer = threading.Thread(target=_feed, args=(in_write, (input or "").encode()))
        writer.start()
    output: dict[int, bytearray] = {out_read: bytearray(), err_read: bytearray()}
    status: int | None = None
    with selectors.DefaultSelector() as selector:
        for fd in output:
            selector.register(fd, selectors.EVENT_READ)
        selector.register(connection, selectors.EVENT_READ)
        open_pipes = len(output)
        while open_pipes or status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _close(output, connection)
                raise subprocess.TimeoutExpired(argv, timeout, bytes(output[out_read]))
            for key, _ in selector.select(left):
                if key.fileobj is connection:
                    status = json.loads(connection.recv(_MESSAGE))["status"]
                    selector.unregister(connection)
                    continue
                fd = int(key.fd)
                chunk = os.read(fd, 65536)
                if chunk:
                    output[fd] += chunk
                else:
                    selector.unregister(fd)
                    open_pipes -= 1
    _close(output, connection)
    if in_write != -1:
        writer.join()
    assert status is not None
    return subprocess.CompletedProcess(
        argv,
        os.waitstatus_to_exitcode(status),
        _text(bytes(output[out_read])),
        None if merge_stderr else _text(bytes(output[err_read])),
    )


def _feed(fd: int, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError), open(fd, "wb") as pipe:
        pipe.write(data)


def _close(output: Mapping[int, Any], connection: socket.socket) -> None:
    for fd in output:
        os.close(fd)
    connection.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
