"""py-spy on running Trellis workers, and a plain-text summary of what it sampled.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``, root first,
each frame ``function (file:line)``); the summary gives, over all sampled workers, the share of
samples where a function is on the stack (inclusive) and where it is the leaf (self), with idle
samples (``--idle`` is off, so threads waiting in the event loop are not sampled) left out.
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
)
# Where a request's CPU goes: (label, a function that marks it when on the stack), first match.
CATEGORIES = (
    ("join_grant (token + entry lookups)", "join_grant (ca/grants.py)"),
    ("active_issuer (per-call queries)", "active_issuer (ca/authority.py)"),
    ("parse_csr (load + verify)", "parse_csr (ca/csr.py)"),
    ("leaf build + sign", "sign (ca/profiles.py)"),
    ("check_leaf (self-check)", "check_leaf (ca/checks.py)"),
    ("_persist (token use, certificate + audit rows, commit)", "_persist (ca/issue.py)"),
    ("rest of the route (render, metrics)", "request_svid (api/routes/svid.py)"),
    ("FastAPI/Starlette/pydantic around the route", "app (starlette/routing.py)"),
    ("scheduler jobs (parent process)", "BackgroundScheduler._main_loop"),
    ("event loop in C (uvloop: TLS, sockets)", "Runner.run (asyncio/runners.py)"),
)


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
            present = set(frames)
            for function in present:
                inclusive[function] += count
            label = next(
                (name for name, marker in CATEGORIES if any(marker in f for f in present)),
                "other",
            )
            categories[label] += count
    if not total:
        return {"inclusive": [], "self": [], "breakdown": []}

    def fmt(counter: Counter[str], n: int = top) -> list[str]:
        return [f"{100 * k / total:5.1f} %  {name}" for name, k in counter.most_common(n)]

    return {
        "samples": [f"{total} working, {idle} idle (left out)"],
        "breakdown": fmt(categories, len(CATEGORIES) + 1),
        "inclusive": fmt(inclusive),
        "self": fmt(self_time),
    }
