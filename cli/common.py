"""What every command shares: the context, output rendering and the error → exit-code map."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import shlex
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from ca import backup, errors
from ca.config import (
    SQLITE_SUFFIXES,
    Context,
    Settings,
    build_context,
    load_data_paths,
    load_settings,
)
from ca.files import OwnData, check_writable
from ca.logs import CLI_REQUEST_PREFIX, REQUEST_ID
from ca.redact import MASK, masked_url
from ca.store.db import SchemaPolicy

if TYPE_CHECKING:
    from ca.certs import CertificateInfo

# The one place errors become exit codes (documented in docs/cli.md). 2 is click's usage error.
EXIT_CODES: dict[type[errors.TrellisError], int] = {
    errors.InvalidInput: 2,
    errors.AuthenticationFailed: 3,
    errors.PermissionDenied: 4,
    errors.NotFound: 5,
    errors.Conflict: 6,
    errors.NotInitialised: 7,
    errors.Unavailable: 8,
    errors.InternalError: 1,
}


def writable(*, directory: bool) -> Callable[[typer.CallbackParam, Path | None], Path | None]:
    """An option callback: ``ca.files.check_writable`` for the file (or, with ``directory``,
    the directory) a command writes, refused under the option's own name (``--out``,
    ``--p12``, ``--dir``), as is a path of Trellis's own data (``STATE.own_data``)."""

    def check(param: typer.CallbackParam, value: Path | None) -> Path | None:
        if value is None:
            return None
        what = f"{param.opts[0]} {value}"
        return check_writable(value, directory=directory, what=what, own=STATE.own_data())

    return check


out_dir = writable(directory=True)  # the directory a command writes its files to
out_file = writable(directory=False)  # the file a command writes


def svid_dir(param: typer.CallbackParam, value: Path | None) -> Path | None:
    """An option callback for a directory a command publishes an SVID in
    (``ca.workload.check_svid_directory``), under the option's own name, as ``writable``."""
    if value is None:
        return None
    # Here, not at the top: every command imports this module, three of them publish SVIDs.
    from ca.workload import check_svid_directory

    what = f"{param.opts[0]} {value}"
    return check_svid_directory(value, what=what, own=STATE.own_data())


def read_input(option: str, path: Path) -> bytes:
    """The content of a file named by ``option``. One that is not there (or is a directory) is
    a wrong argument, exit 2, as click's own checks of arguments are; one that is there but
    cannot be read (permissions, an I/O error) is exit 8, like any file (docs/cli.md)."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise errors.InvalidInput(f"{option} {path}: no such file") from None


def exit_code(error: errors.TrellisError) -> int:
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


_SET_UP_HINT = (
    "set one up with 'trellis init' (or 'trellis gateway init', 'trellis openvpn init'),"
    " or 'trellis restore' a backup"
)


def require_set_up(settings: Settings) -> None:
    if not settings.data_dir.is_dir():
        raise errors.NotInitialised(f"no Trellis data dir at {settings.data_dir}: {_SET_UP_HINT}")
    require_database(settings)


def require_database(settings: Settings) -> None:
    """A SQLite database file must exist (opening one would create it, empty); a PostgreSQL
    database is asked for by connecting. ``trellis migrate`` needs nothing else: the data dir
    holds keys and files, which the schema does not involve."""
    url = make_url(settings.effective_database_url)
    database = url.database if url.get_backend_name() == "sqlite" else None
    if database not in (None, "", ":memory:") and not Path(str(database)).exists():
        raise errors.NotInitialised(f"no Trellis database at {database}: {_SET_UP_HINT}")


class State:
    """Global options, set by the root callback; the context is built on first use."""

    data_dir: str | None = None  # as given: ca.config refuses an empty one
    database_url: str | None = None
    started: float | None = None  # the process's start (cli.launch): None when run in-process
    _ctx: Context | None = None
    _request: contextvars.Token[str | None] | None = None

    def settings(self, **overrides: Any) -> Settings:
        values = {k: v for k, v in overrides.items() if v is not None}
        if self.data_dir is not None:
            values["data_dir"] = self.data_dir
        if self.database_url is not None:
            values["database_url"] = self.database_url
        return load_settings(**values)

    def given_at(self) -> dt.datetime | None:
        """When the command was given: the process's start, before the second its imports
        take, in which another replica's command may already have done its work
        (``AuthorityParams.given_at``)."""
        if self.started is None:
            return None
        return dt.datetime.fromtimestamp(self.started, dt.UTC)

    def given_options(self) -> tuple[list[str], bool]:
        """The root options this command was given, as a command line repeating it needs them
        (``more``): without them the next page reads another instance (``./var``, or what
        ``TRELLIS_*`` names). Whether a password in ``--database-url`` was masked: it is never
        printed, since stderr ends up in logs and terminals' scrollback."""
        options: list[str] = []
        if self.data_dir is not None:
            options += ["--data-dir", shlex.quote(self.data_dir)]
        masked = False
        if self.database_url is not None:
            url, masked = masked_url(self.database_url)
            options += ["--database-url", shlex.quote(url)]
        return options, masked

    def own_data(self) -> OwnData:
        """Trellis's own files, which no output option may name (docs/cli.md). Option
        callbacks run after the root callback has set the global options. Only the data dir
        and the database are read: a command that never opens the CA (the workload commands,
        the agent) is not stopped by another ``TRELLIS_*`` variable it has no use for."""
        values = {"data_dir": self.data_dir, "database_url": self.database_url}
        given = {key: value for key, value in values.items() if value is not None}
        return load_data_paths(**given).own_data()

    def context(
        self,
        *,
        serving: bool = False,
        create: bool = False,
        schema: SchemaPolicy = SchemaPolicy.REQUIRE_CURRENT,
        **overrides: Any,
    ) -> Context:
        """``create``: the command sets a data dir up (the ``init`` commands). Any other
        refuses one that does not exist yet instead of making an empty one and answering from
        it (an empty certificate list, a working admin token for a CA that is not there).
        ``schema``: only ``serve``, ``migrate`` and ``init --exists-ok`` migrate an older one.

        A command that opens the CA is one request: what it changes records the id
        ``cli-<16 hex>`` (``ca.logs.REQUEST_ID``, which ``ca`` reads where a REST request's id
        would be, ``X-Request-ID``), until ``close``. ``serving``: ``trellis serve`` is no
        request; each it serves sets its own id."""
        if self._ctx is None:
            settings = self.settings(**overrides)
            if not create:
                require_set_up(settings)
            self._ctx = build_context(settings, serving=serving, schema=schema)
            if not serving:
                self.begin_request()
        return self._ctx

    def begin_request(self) -> None:
        """Make the command one request (``cli-<16 hex>``, see ``context``) without opening
        the CA: ``trellis restore`` records into the database it restores, which no context
        can open before it is there."""
        if self._request is None:
            self._request = REQUEST_ID.set(f"{CLI_REQUEST_PREFIX}{uuid.uuid4().hex[:16]}")

    @contextlib.contextmanager
    def setting_up(
        self, schema: SchemaPolicy = SchemaPolicy.REQUIRE_CURRENT, **overrides: Any
    ) -> Iterator[Context]:
        """The context of an init command, around the part that sets the CA up, and writes the
        files that make it usable (``admin-token``, ``bundle.pem``). If that fails,
        what it made in the file system is removed again, as docs/cli.md promises ("a refused
        init leaves nothing behind"): the data dir if it was not there, otherwise only the
        entries it did not hold (what a dir held stays), and a SQLite database file outside it
        that was not there, with its journals, its write lock and the directories made for it.
        Keys it made in Vault are destroyed by the init itself. A restore running into the
        data dir refuses the init (exit 6) before anything is made or removed, and no restore
        starts there until the init ends (``ca.backup.setting_up``). ``overrides``: the
        command's options over the ``TRELLIS_*`` variables, as ``settings`` takes them."""
        settings = self.settings(**overrides)
        made = _Made.before(settings)
        with backup.setting_up(settings):
            try:
                yield self.context(create=True, schema=schema, **overrides)
            except BaseException:
                self.close()  # the database file is closed before it is removed
                made.remove()
                raise

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._request is not None:
            REQUEST_ID.reset(self._request)
            self._request = None


@dataclass(frozen=True, slots=True)
class _Made:
    """What existed before an init, so that a failed one can take away only what it made."""

    data_dir: Path
    new_root: Path | None  # the outermost directory of data_dir's path that did not exist
    held: frozenset[str]  # the names data_dir held
    new_files: tuple[Path, ...]  # a SQLite database outside data_dir, its journals and lock
    new_database_root: Path | None  # the outermost directory made for that database

    @classmethod
    def before(cls, settings: Settings) -> _Made:
        data_dir = settings.data_dir.absolute()
        new_root = None
        for path in (data_dir, *data_dir.parents):
            if path.exists():
                break
            new_root = path
        held = frozenset(p.name for p in data_dir.iterdir()) if new_root is None else frozenset()
        url = make_url(settings.effective_database_url)
        files: tuple[Path, ...] = ()
        database_root = None
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            database = Path(str(url.database)).absolute()
            if not database.is_relative_to(data_dir):
                candidates = [Path(f"{database}{suffix}") for suffix in SQLITE_SUFFIXES]
                files = tuple(path for path in candidates if not path.exists())
                for path in database.parents:
                    if path.exists():
                        break
                    database_root = path
        return cls(data_dir, new_root, held, files, database_root)

    def remove(self) -> None:
        if self.new_root is not None:
            shutil.rmtree(self.new_root, ignore_errors=True)
        else:
            for path in self.data_dir.iterdir():
                if path.name in self.held:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        for path in self.new_files:
            path.unlink(missing_ok=True)
        if self.new_database_root is not None:
            shutil.rmtree(self.new_database_root, ignore_errors=True)


STATE = State()


def confirm(question: str) -> None:
    """Go on only if a person at a terminal says yes (docs/cli.md): without a terminal (a pipe,
    cron, CI) refuse and point at ``--yes``. The question goes to stderr, so that ``--json``
    stays one document on stdout. Declined or refused: exit 1."""
    if not sys.stdin.isatty():
        typer.echo("trellis: not confirmed: no terminal to ask on (pass --yes)", err=True)
        raise typer.Exit(1)
    if not typer.confirm(question, err=True):
        typer.echo("trellis: not confirmed", err=True)
        raise typer.Exit(1)


def warn_crl_skipped(revoked: Iterable[CertificateInfo]) -> None:
    """What a revocation command prints, on stderr, for each issuer whose CRL could not be
    re-signed to list what it revoked (a revoked intermediate whose key is gone: the
    certificates are revoked all the same, ``ca.certs.revoke_certificate``); ``--json`` has it
    as ``crl_skipped``."""
    for skipped in sorted({info.crl_skipped for info in revoked if info.crl_skipped}):
        typer.echo(
            f"warning: the issuer's CRL was not re-signed ({skipped}); the issuer is revoked"
            " and listed on the root's CRL, and the certificates' status (OCSP) says revoked",
            err=True,
        )


def more(
    command: str,
    given: Mapping[str, str | bool | None],
    *,
    limit: int,
    json_out: bool,
    next_after: object | None,
) -> None:
    """End a page that has more after it (``next_after``, the cursor of a ``ca`` page) with
    the command for the next one on stderr (docs/cli.md): ``command`` (``trellis`` and its
    sub-command), with the root options given (``--data-dir``, ``--database-url``: the same
    instance) after ``trellis``, the filters ``given`` (option: value, those set; a flag set:
    True), ``--limit``, ``--json`` and ``--after``. Stderr, so that ``--json`` stays the array
    promised; a last page says nothing. A password in ``--database-url`` is masked, and a
    second line says so."""
    if next_after is None:
        return
    program, _, sub_command = command.partition(" ")
    root, masked = STATE.given_options()
    again = [
        name if value is True else f"{name} {shlex.quote(value)}"
        for name, value in given.items()
        if value
    ]
    again += [f"--limit {limit}", "--json"] if json_out else [f"--limit {limit}"]
    line = " ".join([program, *root, sub_command, *again])
    typer.echo(f"more: {line} --after {next_after}", err=True)
    if masked:
        typer.echo(
            f"note: the --database-url password is shown as {MASK}: put yours back in its"
            " place (or give the URL in TRELLIS_DATABASE_URL instead of --database-url)",
            err=True,
        )


def emit_json(value: BaseModel | Sequence[BaseModel | dict[str, Any]] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [
            item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in value
        ]
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Plain aligned columns: readable in a terminal, greppable in a pipe."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    for line in lines:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def when(value: object) -> str:
    return "-" if value is None else str(value).replace("+00:00", "Z")


def iso(value: dt.datetime) -> str:
    """An instant in ``--json`` output as the REST models write it (``2026-11-27T15:30:54Z``,
    docs/cli.md), for the documents the CLI builds itself; a naive one is UTC, as stored."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
