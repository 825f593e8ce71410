"""The ``trellis`` command's entry point: Ctrl-C is one line and exit 130, and the imports of a
command run without Python's cyclic garbage collector.

SIGINT raises :class:`Interrupted` instead of ``KeyboardInterrupt`` from the first line of
``main``: a command spends most of a second importing, where a ``KeyboardInterrupt`` ended in a
traceback, and once it runs Typer turns a ``KeyboardInterrupt`` into a silent exit 130 of its
own. ``Interrupted`` is neither, so it reaches ``main`` wherever it was raised, after the
``finally`` and ``except BaseException`` blocks on its way have removed what the command left
half done (a temporary file, a staged SVID directory, a data dir an init was setting up). A
second Ctrl-C while they run is ignored: it would interrupt the clean-up itself. So is one
after the command is done (``finished``): it exits with its own status. A SIGINT that
the parent ignores (a background job of a script, ``nohup``) stays ignored. ``trellis agent``
installs its own handler: a stop request, exit 0 (docs/rotation.md).

A command spends most of its CPU importing (SQLAlchemy, SQLModel's tables, pydantic's models,
cryptography): ~0.8 s, during which the collector runs again and again over tens of thousands
of new objects that are all still in use, and frees nothing. Without it a command starts ~0.1 s
sooner (10 to 12 %, best and mean of eight runs of ``trellis certs list``), and the suite starts
the CLI hundreds of times. The collector comes back, with the start-up objects frozen out of its
way as a server's are (``api.app.freeze_startup_heap``), once the command is resolved
(``imports_done``, from the root callback): a long-running command (``trellis agent``) collects
as usual from then on.

What ``ca`` logs for an operator (a CRL file that could not be rewritten after a revocation, a
key left behind) reaches a command's stderr as one line, ``warning: ...`` or ``error: ...``
(``OneLineLog``): with no handler of its own it went through Python's last-resort handler,
as a bare line that read as if it were the command's output, with a traceback for an
``exception``. ``trellis serve`` and ``trellis agent`` replace it with the server's log
(``ca.logs.configure_logging``), where ``TRELLIS_DEBUG=1`` adds Trellis's debug records.

``trellis serve`` ignores SIGHUP from here until it serves: its handler (``cli.single``, the
supervisor's) is installed only once the server starts, a second or more after the process, and
until then SIGHUP's default killed it. An ignored signal stays ignored across the ``exec`` into
``cli.supervisor``, whose interpreter would otherwise start with the default again. A SIGHUP
asks a running server to take a new certificate or code; one that is starting loads both anyway.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from types import FrameType

from ca.logs import DEBUG_VARIABLE, debugging

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command Ctrl-C ended


class Interrupted(BaseException):
    """Ctrl-C (SIGINT). A ``BaseException`` as ``KeyboardInterrupt`` is, so that no
    ``except Exception`` takes it for a failure to report or retry."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up on the way out runs to its end
    raise Interrupted


def finished() -> None:
    """The command is done: its result is out (printed, or its ``trellis:`` line) and its work
    committed. A Ctrl-C from here on is ignored, and the command exits with its own status,
    quietly: what is left is closing the database (the pool's connections) and the
    interpreter's shutdown, where ``Interrupted`` came out as a traceback from inside
    SQLAlchemy's pool, and after Python's shutdown restored SIGINT's default, as a death by
    SIGINT; and exit 130 would tell a script that a command it should not repeat (a token
    created, a certificate revoked) did not run. Only our own handler is replaced: a SIGINT
    the parent ignored stays ignored, and ``trellis agent``'s stop request is its own."""
    if signal.getsignal(signal.SIGINT) is _interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class OneLineLog(logging.Handler):
    """A record of WARNING and above as one line on stderr, its level's name first, as the
    command's own ``warning:`` lines read (cli.common). No traceback: a command's failure is
    its one ``trellis:`` line (cli.main), and a log record's traceback is for a server's log.
    The messages are those written for a server's operator, which name no secret.

    A record made with a traceback (an unforeseen failure ``ca`` caught and recorded, such as a
    federation refresh's) says how to see it: with ``TRELLIS_DEBUG=1`` in the environment the
    command's log has INFO records too and each traceback after its line, since a command run
    by hand has no server log to look in."""

    def __init__(self, debug: bool = False) -> None:
        super().__init__(logging.INFO if debug else logging.WARNING)
        self.debug = debug

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = logging.getLevelName(record.levelno).lower()
            message = " ".join(record.getMessage().split())  # libpq's text spans lines
            if record.exc_info and not self.debug:
                message += f" ({DEBUG_VARIABLE}=1 shows its traceback)"
            sys.stderr.write(f"{level}: {message}\n")
            if record.exc_info and self.debug:
                sys.stderr.write(logging.Formatter().formatException(record.exc_info) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


# cli.main.root's options that take a value: what comes after one is not the command.
ROOT_OPTIONS_WITH_VALUES = ("--data-dir", "--database-url")


def command_of(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names, read before Click has been imported."""
    args = iter(argv)
    for arg in args:
        if arg in ROOT_OPTIONS_WITH_VALUES:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    started = time.time()  # when the command was given, before its second of imports
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    if command_of(sys.argv[1:]) == "serve" and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # On the root logger, so that configure_logging (serve, agent) replaces it.
    debug = debugging()
    logging.getLogger().addHandler(OneLineLog(debug))
    if debug:  # Trellis's own: Alembic's and httpx's INFO lines are noise here
        logging.getLogger("trellis").setLevel(logging.INFO)
    try:
        _run(started)
    except Interrupted:
        sys.stderr.write("trellis: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


def _run(started: float) -> None:
    gc.disable()
    try:
        from cli.common import STATE
        from cli.main import main as run
    except BaseException:
        gc.enable()
        raise
    STATE.started = started
    run()


def imports_done() -> None:
    """The command and its module are loaded: collect as usual from here on. Nothing to do in a
    process that did not start through ``main`` (tests running the CLI in-process)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
