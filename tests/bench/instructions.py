"""Instructions per issuance, this checkout against a base revision, counted by valgrind
(``.venv/bin/python -m tests.bench.instructions --base REV``).

``tests.bench.pairs`` times served issuances; on this shared machine the same code moves by a
quarter between runs, so a change of a few per cent needs many pairs, and even then the
machine's drift can lean one way for minutes. An instruction count does not depend on what else
runs: valgrind's cachegrind counts every instruction the interpreter, cryptography, OpenSSL
and SQLite execute, the same for the same code within a fraction of a per cent, whatever the
load. It does not see what costs time without instructions (cache misses, waits on locks and on
the disk, the kernel's side of a system call), so it answers "does this change add work to an
issuance", not "is it faster served"; a change that passes here and still moves pairs is about
memory or waiting.

Each tree's workload (``instructions_load.py``: 16 issuances at once on one loop, on SQLite:
join-token issuances through the ``ca`` path or the ASGI application, or renewals through the
ASGI application) is run twice under cachegrind, with no measured batches and with
``--batches``; the difference divided by the issuances it made is what one issuance costs, with
set-up, imports and the warm-up subtracted. Two valgrinds run at a time, one per core: ~3
minutes a mode on two cores. Counts of the same code differ by up to ~1 % from run to run
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.bench.pairs import worktree

ROOT = Path(__file__).resolve().parents[2]
LOAD = Path(__file__).with_name("instructions_load.py")
AT_ONCE = 16  # instructions_load.AT_ONCE (not imported: that module runs as a script)
MODES = ("ca", "asgi", "renew")


def count(tree: Path, mode: str, batches: int, out: Path) -> int:
    """Instructions (cachegrind's ``I refs``) of one workload run from ``tree``."""
    env = os.environ | {"PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [
            "valgrind", "--tool=cachegrind", "--cache-sim=no",
            f"--cachegrind-out-file={out}", sys.executable, str(LOAD), mode, str(batches),
        ],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the {mode} workload failed in {tree}:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_issuance(
    trees: dict[str, Path], modes: list[str], batches: int, tmp: Path
) -> dict[str, dict[str, float]]:
    """{mode: {side: instructions per issuance}}."""
    runs = [
        (side, mode, n) for mode in modes for side in trees for n in (0, batches)
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counted = dict(
            zip(
                runs,
                pool.map(
                    lambda run: count(
                        trees[run[0]], run[1], run[2], tmp / f"{run[0]}-{run[1]}-{run[2]}.out"
                    ),
                    runs,
                ),
                strict=True,
            )
        )
    return {
        mode: {
            side: (counted[(side, mode, batches)] - counted[(side, mode, 0)]) / (batches * AT_ONCE)
            for side in trees
        }
        for mode in modes
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (git)")
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--batches", type=int, default=25, help="measured batches of 16 (<= 30)")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    with (
        worktree(args.base) as (tree, commit),
        tempfile.TemporaryDirectory(prefix="trellis-bench-instructions-") as tmp,
    ):
        print(
            f"instructions per issuance, base {commit[:12]} against this checkout "
            f"({args.batches} batches of {AT_ONCE}, {', '.join(modes)}) ...",
            file=sys.stderr,
        )
        found = per_issuance({"base": tree, "new": ROOT}, modes, args.batches, Path(tmp))
    for mode, sides in found.items():
        ratio = sides["new"] / sides["base"]
        print(
            f"{mode:4}: base {sides['base'] / 1e6:.3f} M, new {sides['new'] / 1e6:.3f} M "
            f"instructions per issuance: new/base {ratio:.4f}x"
        )
    if args.json is not None:
        document: dict[str, Any] = {"base": commit, "batches": args.batches, "per_issuance": found}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
