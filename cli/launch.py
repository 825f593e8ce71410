"""The ``trellis`` command's entry point: the imports of a command run without Python's cyclic
garbage collector.

A command spends most of its CPU importing (SQLAlchemy, SQLModel's tables, pydantic's models,
cryptography): ~0.8 s, during which the collector runs again and again over tens of thousands
of new objects that are all still in use, and frees nothing. Without it a command starts ~0.1 s
sooner (10 to 12 %, best and mean of eight runs of ``trellis certs list``), and the suite starts
the CLI hundreds of times. The collector comes back, with the start-up objects frozen out of its
way as a server's are (``api.app.freeze_startup_heap``), once the command is resolved
(``imports_done``, from the root callback): a long-running command (``trellis agent``) collects
as usual from then on.
"""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        from cli.main import main as run
    except BaseException:
        gc.enable()
        raise
    run()


def imports_done() -> None:
    """The command and its module are loaded: collect as usual from here on. Nothing to do in a
    process that did not start through ``main`` (tests running the CLI in-process)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
