"""What server processes cost, read from /proc: CPU time of a process tree and sampled memory.

CPU of a tree is the sum over its live processes of utime + stime + cutime + cstime: a child
that exits and is reaped moves its time into its parent's cutime/cstime, so nothing is lost or
counted twice as long as the tree's root stays alive. Memory is the sum of VmRSS (what the
issue's goal is stated in; it counts pages shared between forked workers once per process, so
it overstates) and, sampled less often, the sum of Pss (shared pages split between sharers).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MemorySampler",
    "SystemCpu",
    "connections_by_process",
    "process_tree",
    "rss_by_process",
    "rss_kib",
    "tree_cpu_seconds",
]

_TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(roots: Iterable[int]) -> list[int]:
    """The roots and all their live descendants."""
    children = _children()
    seen: list[int] = []
    stack = [pid for pid in roots if Path(f"/proc/{pid}").exists()]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, []))
    return seen


def _cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[11..14] are utime, stime, cutime, cstime (stat fields 14-17)
    return sum(int(x) for x in fields[11:15])


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    return sum(_cpu_ticks(pid) for pid in process_tree(roots)) / _TICK


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_kib(pids: Iterable[int]) -> int:
    return sum(_status_kib(pid, "VmRSS:") for pid in pids)


def _label(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in argv if a][:4]
    return f"{pid} {' '.join(words)[:60]}"


def cpu_by_process(roots: Iterable[int]) -> dict[str, float]:
    """CPU seconds so far of each process of the trees, keyed like ``rss_by_process``."""
    out = {}
    for pid in process_tree(roots):
        with contextlib.suppress(OSError):
            out[_label(pid)] = _cpu_ticks(pid) / _TICK
    return out


def connections_by_process(pids: Iterable[int], port: int) -> dict[int, int]:
    """Established TCP connections to local ``port`` held by each of ``pids``: how the
    kernel's SO_REUSEPORT hashing spread a load generator's connections over the workers."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    established.add(fields[9])  # the socket's inode
    counts = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            counts[pid] = sum(
                1 for fd in Path(f"/proc/{pid}/fd").iterdir() if _inode(fd) in established
            )
    return counts


def _inode(fd: Path) -> str:
    """'12345' for a link 'socket:[12345]'; '' for anything else, or an fd closed meanwhile."""
    try:
        link = os.readlink(fd)
    except OSError:
        return ""
    return link[8:-1] if link.startswith("socket:[") else ""


def rss_by_process(roots: Iterable[int]) -> dict[str, float]:
    """RSS (MiB) of each process of the trees, keyed by pid and a short command line."""
    out = {}
    for pid in process_tree(roots):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            words = [a.decode(errors="replace") for a in argv if a][1:4]
            out[f"{pid} {' '.join(words)[:60]}"] = round(rss_kib([pid]) / 1024, 1)
    return out


def pss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


@dataclass
class MemorySampler:
    """Samples the summed RSS of one or more process trees in a thread until ``stop()``."""

    groups: dict[str, list[int]]  # label -> tree roots
    interval: float = 0.2
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    peak_pss_kib: dict[str, int] = field(default_factory=dict)
    last_rss_kib: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self, with_pss: bool) -> None:
        for label, roots in self.groups.items():
            pids = process_tree(roots)
            rss = rss_kib(pids)
            self.last_rss_kib[label] = rss
            self.peak_rss_kib[label] = max(self.peak_rss_kib.get(label, 0), rss)
            if with_pss:
                pss = pss_kib(pids)
                self.peak_pss_kib[label] = max(self.peak_pss_kib.get(label, 0), pss)

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            self._sample(with_pss=count % 5 == 0)
            count += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample(with_pss=True)


class SystemCpu:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat, to show how much of a
    cell's CPU went to processes that are neither the server nor the load generator."""

    @staticmethod
    def busy_seconds() -> float:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(x) for x in fields]
        idle = values[3] + values[4]  # idle + iowait
        steal = values[7] if len(values) > 7 else 0
        return (sum(values[:8]) - idle - steal) / _TICK

    @staticmethod
    def now() -> tuple[float, float]:
        return time.monotonic(), SystemCpu.busy_seconds()
