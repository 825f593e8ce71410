"""A progress bar on stderr for commands that run long, shown only to a person watching: when
stderr is a terminal and ``--json`` is not given, so that scripts, pipes and tests see exactly
the output they always did (docs/cli.md, "Progress")."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ca.progress import Progress as Report


@contextmanager
def shown(label: str, *, json_out: bool, bytes_: bool = False) -> Iterator[Report | None]:
    """A ``ca.progress.Progress`` drawing a bar labelled ``label`` (amounts in bytes if
    ``bytes_``, otherwise counted), or None when nobody would see it. The bar is removed when
    the block ends, so the command's own output follows as it always did."""
    if json_out or not sys.stderr.isatty():
        yield None
        return
    # Imported here: every command of these modules would load rich's bars otherwise, and a
    # plain command loads nothing it does not use (tests/cli/test_startup.py).
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    amount = DownloadColumn() if bytes_ else MofNCompleteColumn()
    bar = Progress(
        SpinnerColumn(),
        TextColumn(label),
        BarColumn(),
        amount,
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    task = bar.add_task(label, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update
