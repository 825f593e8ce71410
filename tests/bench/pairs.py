"""Alternated pairs: this checkout's Trellis against a named base revision, on one machine, one
run after the other (``.venv/bin/python -m tests.bench.pairs --base REV``).

A full ``make bench`` compares Trellis with OpenBao; it cannot tell whether a change to Trellis
helped, because this machine's speed drifts by a quarter within minutes, more than most changes
move it. What "What changed" in docs/benchmarks.md reports for each change is pairs instead:
the code before and the code after, served the same way and driven by the same load, run in
turn (the order swapped from one pair to the next), and averaged; a change is kept when the
pairs agree, not when one run looks good.

The base revision is checked out into a temporary git worktree and served from there
(``PYTHONPATH`` puts its packages before this checkout's editable install; the virtualenv and
this benchmark harness are shared). Each run starts its own server on a fresh database (SQLite,
or a new database on one embedded PostgreSQL), warms up, and measures one wrk cell as
``make bench`` does (``measure_cell``): certificates per second, p99, and server CPU per
certificate, PostgreSQL's processes included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench import wrk
from tests.bench.drivers import start_system
from tests.bench.issuance import CSRS, ENTRIES, measure_cell, progress
from tests.bench.loadgen import Csr, make_csrs
from tests.bench.servers import postgres_server

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("trellis-sqlite", "trellis-postgres")


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[tuple[Path, str]]:
    """``revision`` checked out in a temporary worktree: (its path, its commit)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="trellis-bench-base-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), commit],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield path, commit
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True
            )


@contextlib.contextmanager
def served_from(tree: Path | None) -> Iterator[None]:
    """Trellis servers started inside run ``tree``'s code (None: this checkout's). They are
    started from ``tree`` as well: ``trellis serve`` runs its supervisor with ``python -m``,
    which puts the working directory first on ``sys.path``, before ``PYTHONPATH``."""
    before, cwd = os.environ.get("PYTHONPATH"), Path.cwd()
    if tree is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), before]))
    os.chdir(tree or ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def check_served(tree: Path) -> None:
    """That what ``trellis serve`` starts under ``served_from(tree)`` imports ``tree``'s code:
    its console script (whose own directory heads ``sys.path``) and its supervisor (``python
    -m``, the working directory first). Without the second, the base runs had served this
    checkout's code, and eight pairs of the same code differed by 0.7 % (docs/benchmarks.md)."""
    with tempfile.TemporaryDirectory() as tmp, served_from(tree):
        script = Path(tmp) / "which.py"
        script.write_text("import ca\nprint(ca.__file__)\n")
        found = [
            subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
            for command in (
                [sys.executable, str(script)],
                [sys.executable, "-c", "import ca; print(ca.__file__)"],
            )
        ]
    for path in found:
        if not Path(path).is_relative_to(tree):
            raise SystemExit(f"the base revision's servers would run {path}, not {tree}")


def one_run(
    args: argparse.Namespace,
    csrs: list[Csr],
    tree: Path | None,
    postgres: tuple[str, Path] | None,
    tmp: Path,
) -> dict[str, Any]:
    with (
        served_from(tree),
        start_system(
            args.system, tmp, csrs, entries=ENTRIES, workers=args.workers, postgres=postgres
        ) as driver,
    ):
        result = measure_cell(
            driver, args.concurrency, args.warmup, args.seconds,
            [c.spiffe_id for c in csrs], args.loadgen,
        )  # fmt: skip
    if result["errors"]:
        raise SystemExit(f"{result['errors']} errors in a run: {result['error_samples'][:2]}")
    return {
        "certs_per_s": result["certs_per_s"],
        "p99_ms": result["p99_ms"],
        "server_ms_per_cert": 1000 * result["server_cores"] / result["certs_per_s"],
    }


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    means = {
        side: {key: statistics.mean(run[key] for run in results) for key in results[0]}
        for side, results in runs.items()
    }
    wins = sum(
        new["certs_per_s"] > base["certs_per_s"]
        for base, new in zip(runs["base"], runs["new"], strict=True)
    )
    return {
        "means": means,
        "new_faster_in": f"{wins} of {len(runs['new'])}",
        "ratio": means["new"]["certs_per_s"] / means["base"]["certs_per_s"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (git)")
    parser.add_argument("--system", choices=SYSTEMS, default="trellis-sqlite")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the runs and the summary here")
    args = parser.parse_args(argv)
    if args.loadgen == "auto":
        args.loadgen = "wrk" if wrk.available() else "python"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    csrs = make_csrs(CSRS, [f"spiffe://example.org/bench/w{i:02d}" for i in range(ENTRIES)])
    with (
        worktree(args.base) as (tree, commit),
        tempfile.TemporaryDirectory(prefix="trellis-bench-pairs-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        check_served(tree)
        postgres = None
        if args.system == "trellis-postgres":
            postgres = stack.enter_context(postgres_server())
        progress(
            f"{args.system}, c={args.concurrency}, {args.pairs} pairs: base {commit[:12]} "
            f"against this checkout (load generator: {args.loadgen})"
        )
        for pair in range(args.pairs):
            order = ["base", "new"] if pair % 2 == 0 else ["new", "base"]
            for side in order:
                served = tree if side == "base" else None
                result = one_run(args, csrs, served, postgres, Path(tmp) / f"{pair}-{side}")
                runs[side].append(result)
                progress(
                    f"pair {pair + 1} {side:4}: {result['certs_per_s']:7.1f} certs/s  "
                    f"p99 {result['p99_ms']:5.1f} ms  "
                    f"{result['server_ms_per_cert']:.3f} ms of server CPU per certificate"
                )
    found = summary(runs)
    for side in ("base", "new"):
        mean = found["means"][side]
        print(
            f"{side:4} mean: {mean['certs_per_s']:7.1f} certs/s  p99 {mean['p99_ms']:5.1f} ms  "
            f"{mean['server_ms_per_cert']:.3f} ms/cert"
        )
    print(f"new/base: {found['ratio']:.3f}x; new faster in {found['new_faster_in']} pairs")
    if args.json is not None:
        document = {"base": commit, "settings": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(document | {"runs": runs, **found}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
