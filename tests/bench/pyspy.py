"""py-spy on running Trellis workers, and a plain-text summary of what it sampled.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``, root first,
each frame ``function (file:line)``); the summary gives, over all sampled workers, the share of
samples where a function is on the stack (inclusive) and where it is the leaf (self), with idle
samples (``--idle`` is off, so threads waiting in the event loop are not sampled) left out.

Shares are of samples, not of CPU: a thread inside a system call py-spy cannot tell idle from
working counts while it waits. SQLite's checkpointing thread, for one, showed 4 % of a worker's
samples and used 8 µs of CPU a certificate (under 1 %, read per thread from ``/proc``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["record", "summarise", "wait"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _binary() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def record(
    pids: list[int], out: Path, seconds: int
) -> list[tuple[subprocess.Popen[bytes], Path]] | None:
    binary = _binary()
    if binary is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    recorders = []
    for pid in pids:
        path = out / f"worker-{pid}.txt"
        process = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
             "--format", "raw", "--nonblocking", "--output", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        recorders.append((process, path))
    return recorders


def wait(recorders: list[tuple[subprocess.Popen[bytes], Path]]) -> list[Path]:
    for process, _ in recorders:
        process.wait(120)
    return [path for _, path in recorders if path.exists()]


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file}:{match['line'] or '?'})"


def _function(frame: str) -> str:
    """The frame without its line number: samples in one function add up."""
    return re.sub(r":\d+\)$", ")", _short(frame))


# A thread parked in these (leaf frame) is waiting, not working: py-spy cannot always tell.
IDLE_LEAVES = (
    "Condition.wait (threading.py)",
    "wait (threading.py)",
    "Connection._recv (multiprocessing/connection.py)",
    "EpollSelector.select (selectors.py)",
    "_worker (concurrent/futures/thread.py)",  # an executor's thread waiting for work
)
# Where a worker's CPU goes: (label, functions that mark it when on the stack), first match
# wins, so a stage of the issuance is found before the layers around it. Markers are
# substrings of ``function (file)``; they follow the code, so a renamed function lands in
# "other" until it is added here (an "other" above a few per cent means: look at "self").
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("join_grant (token + entry lookups)", ("join_grant",)),
    ("parse_csr (load + verify)", ("parse_csr (ca/csr.py)",)),
    (
        "leaf build + sign",
        ("signed_leaf (ca/leafder.py)", "sign (ca/profiles.py)", "leaf_builder (ca/profiles.py)"),
    ),
    ("check_leaf (self-check)", ("check_leaf (ca/checks.py)",)),
    ("group commit (token use, certificate + audit rows)", ("GroupCommit.", "_persist (ca/")),
    ("grouped reads (credential and entry lookups)", ("GroupRead.",)),
    ("audit sealer", ("(ca/audit.py)",)),
    ("SQLite checkpoints (thread)", ("Checkpointer._run",)),
    ("scheduler jobs", ("(ca/scheduler.py)", "BackgroundScheduler._main_loop")),
    # PostgreSQL's batches run in greenlets, whose stacks do not show the group commit.
    ("database driver (psycopg, SQLAlchemy)", ("(psycopg/", "(sqlalchemy/")),
    ("sending responses (TLS, socket)", ("Corked.write", "Corked._flush")),
    ("logging (the access log)", ("(logging/__init__.py)", "(ca/logs.py)")),
    ("rest of the route (authorise, render, metrics)", ("(api/routes/",)),
    ("HTTP around the route (uvicorn, middlewares)", ("run_asgi (uvicorn/",)),
    ("reading requests (TLS, HTTP parsing)", ("data_received (uvicorn/", "SSLObject.")),
)
# Samples whose innermost Python frame is the event loop's: uvloop's own C (socket reads, its
# TLS protocol), which py-spy without ``--native`` cannot see into, and its waits in epoll,
# which py-spy does not always tell from work: on PostgreSQL, whose loops wait on the
# database, a fifth of the samples.
_LOOP_LEAF = "Runner.run (asyncio/runners.py)"


def _category(frames: list[str]) -> str:
    for name, markers in CATEGORIES:
        if any(marker in frame for frame in frames for marker in markers):
            return name
    if frames[-1] == _LOOP_LEAF:
        return "event loop in C (uvloop: sockets, TLS, and epoll waits)"
    return "other"


def summarise(files: list[Path], top: int = 30) -> dict[str, list[str]]:
    """Inclusive and self shares of the working (non-idle) samples, and a breakdown."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = idle = 0
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_function(f) for f in stack.split(";")]
            if frames[-1] in IDLE_LEAVES:
                idle += count
                continue
            total += count
            self_time[frames[-1]] += count
            for function in set(frames):
                inclusive[function] += count
            categories[_category(frames)] += count
    if not total:
        return {"inclusive": [], "self": [], "breakdown": []}

    def fmt(counter: Counter[str], n: int = top) -> list[str]:
        return [f"{100 * k / total:5.1f} %  {name}" for name, k in counter.most_common(n)]

    return {
        "samples": [f"{total} working, {idle} idle (left out)"],
        "breakdown": fmt(categories, len(CATEGORIES) + 2),
        "inclusive": fmt(inclusive),
        "self": fmt(self_time),
    }
