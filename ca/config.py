"""Settings (``TRELLIS_*`` environment variables, overridden by CLI flags) and the one factory
that turns them into a running context. No module keeps global state: everything is built here
and passed down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from ca.clock import Clock, SystemClock
from ca.connlimits import MAX_CONNECTIONS, REQUEST_TIMEOUT
from ca.csr import check_dns_name, is_host, no_port_to_reach
from ca.errors import InvalidInput, TrellisError
from ca.files import OwnData, data_directory, private_file
from ca.jwks import DEFAULT_REFRESH_HINT, MAX_REFRESH_HINT
from ca.keys.backend import KeyBackend
from ca.keys.file import MIN_PASSPHRASE, FileKeyBackend, KeyPassphrase
from ca.keys.store import KNOWN_BACKENDS, KeyStore, check_backend_name, unconfigured_backend
from ca.redact import masked_url
from ca.restored import read_marker
from ca.store import db
from ca.store.batch import GroupCommit, GroupRead

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_WORKERS",
    "REQUEST_TIMEOUT",
    "SQLITE_SUFFIXES",
    "Context",
    "DataPaths",
    "Settings",
    "build_context",
    "load_data_paths",
    "load_settings",
]


# What Trellis keeps in the data dir (docs/configuration.md, "The data directory"): made and
# rewritten by Trellis alone, so no output option may name them (``ca.files.OwnData``).
_OWN_NAMES = frozenset(
    {
        "keys",  # CA key files (ca.keys.file)
        "secrets",  # sealed secrets (ca.tlscryptv2)
        "server",  # the serving certificate and key (ca.serving)
        "metrics",  # serve --workers' counters (cli.server)
        "key-passphrase",
        "admin-token",
        "bundle.pem",  # rewritten by the scheduled jobs (ca.bundle.write_bundle_file)
        "scheduler.lock",  # api.asgi
    }
)
# Files beside a SQLite database: its journals, and the flocks of its one writer at a time
# (ca.store.batch) and its one audit sealer (ca.audit.one_sealer). A lock file replaced under a
# holder's flock no longer excludes anyone: they are as much Trellis's as the database is.
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".write-lock", ".seal-lock")

# ``trellis serve``'s worker processes, at most (``TRELLIS_WORKERS``; 0, one per core, stops
# there too). A fixed number, not a multiple of the cores: a setting valid on one host is valid
# on the next. Each worker is a whole server (~100 MiB, and on PostgreSQL up to 33 connections,
# docs/deploy.md): 64 need ~6 GiB and up to 2,112 database connections, twenty times
# PostgreSQL's default max_connections. More is a typo, which started that many.
MAX_WORKERS = 64
# What deploy/'s examples hold where a secret of one's own goes (tests/deploy holds them to it).
PLACEHOLDER = "CHANGE-ME"

# What one ``trellis serve`` process holds for its clients (cli/http.py, docs/configuration.md).


class DataPaths(BaseSettings):
    """Where Trellis keeps its data: the part of ``Settings`` that commands which never open
    the CA read too (the workload commands and the agent check their outputs against it), so
    that a ``TRELLIS_*`` variable they have no use for and cannot parse (Kubernetes sets
    ``TRELLIS_PORT=tcp://...`` in pods beside a service named trellis) does not stop them."""

    model_config = SettingsConfigDict(env_prefix="TRELLIS_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, value: Any) -> Any:
        # Path("") is the current directory: an empty variable (a template's unset value) put
        # the CA in whatever directory the command ran from and made that directory 0700.
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: name the data directory (./var when not set)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):  # ValueError: a port that is no number, say
            # Its own words are not repeated: ``int()``'s quote a piece of the URL.
            raise ValueError("not a database URL (sqlite:///path or postgresql://...)") from None
        if url.drivername not in db.DRIVERS:
            raise ValueError(f"unsupported database {url.drivername[:40]!r}: {db.URL_FORMS}")
        if url.drivername == "sqlite":
            _check_sqlite(url)
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return db.sqlite_url((self.data_dir / "trellis.db").resolve())

    def own_data(self) -> OwnData:
        """Trellis's own files: the data dir's, and a SQLite database outside it."""
        files: frozenset[Path] = frozenset()
        url = make_url(self.effective_database_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            files = frozenset(Path(f"{url.database}{suffix}") for suffix in SQLITE_SUFFIXES)
        names = _OWN_NAMES | {f"trellis.db{suffix}" for suffix in SQLITE_SUFFIXES}
        return OwnData(self.data_dir, names, files)


class Settings(DataPaths):
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=1, le=65535)
    workers: int = Field(1, ge=0, le=MAX_WORKERS)  # serve's worker processes; 0: one per core
    max_connections: int = Field(MAX_CONNECTIONS, ge=1)  # per serve process (worker)
    request_timeout: float = Field(REQUEST_TIMEOUT, gt=0, le=3600, allow_inf_nan=False)
    trust_domain: str | None = None
    key_passphrase: SecretStr | None = None
    public_url: str | None = None
    # NoDecode: parsed by the validator below, so that a value that is not JSON is a
    # validation error naming the variable, not pydantic-settings' SettingsError.
    server_names: Annotated[list[str], NoDecode] = []
    # seconds, published as spiffe_refresh_hint (at most a day: ca.jwks.MAX_REFRESH_HINT)
    bundle_refresh_hint: int = Field(DEFAULT_REFRESH_HINT, gt=0, le=MAX_REFRESH_HINT)
    # The node whose files this process keeps (gateway truststores) and whose node-scoped jobs
    # it runs (``ca.jobs.Scope.NODE``): two replicas sharing a file system must share it, two
    # on different machines must not. The host name fits, except where it is a pod's, which
    # changes with every pod: files on a hostPath outlive it (docs/configuration.md).
    node_name: str = Field(default_factory=socket.gethostname)

    # Vault / OpenBao (the vault key backend; see docs/vault.md)
    vault_addr: str | None = None
    vault_auth_method: Literal["token", "approle", "kubernetes"] = "token"
    vault_token: SecretStr | None = None
    vault_token_file: Path | None = None
    vault_role_id: str | None = None
    vault_secret_id_file: Path | None = None
    vault_kubernetes_role: str | None = None
    vault_kubernetes_token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    vault_kubernetes_mount: str = "kubernetes"
    vault_transit_mount: str = "transit"
    vault_kv_mount: str = "secret"
    vault_key_prefix: str = "trellis-"
    vault_ca_cert: Path | None = None
    vault_client_cert: Path | None = None
    vault_client_key: Path | None = None
    vault_namespace: str | None = None
    vault_timeout: float = Field(10.0, gt=0, allow_inf_nan=False)
    # Where new authorities keep their keys: file or vault. After the Vault settings, so that
    # its validator sees TRELLIS_VAULT_ADDR.
    key_backend: str = "file"

    @field_validator("key_passphrase")
    @classmethod
    def _key_passphrase(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_PASSPHRASE:
            raise ValueError(f"at least {MIN_PASSPHRASE} characters")
        # deploy/'s examples (trellis.env.example, the Secrets) hold a placeholder of the right
        # length: an example installed unedited encrypted the CA keys with a published value.
        if value is not None and PLACEHOLDER in value.get_secret_value():
            raise ValueError(
                f"still the examples' {PLACEHOLDER} placeholder: set a passphrase of your own"
                " (openssl rand -base64 32), or leave it out to have one generated into the data"
                " dir"
            )
        return value

    @field_validator("key_backend")
    @classmethod
    def _key_backend(cls, value: str, info: ValidationInfo) -> str:
        if value not in KNOWN_BACKENDS:
            raise ValueError(f"not a key backend: {' or '.join(KNOWN_BACKENDS)}")
        if value == "vault" and not info.data.get("vault_addr"):
            raise ValueError(
                "the vault key backend needs TRELLIS_VAULT_ADDR and its auth settings"
                " (TRELLIS_VAULT_TOKEN, or TRELLIS_VAULT_AUTH_METHOD and its own: docs/vault.md)"
            )
        return value

    @field_validator("vault_addr")
    @classmethod
    def _vault_addr(cls, value: str | None) -> str | None:
        """Checked here, not at the first call, where a port out of range (``:99999``) was
        an unreachable Vault (exit 8), not the setting it is."""
        if value is None:
            return None
        from ca.keys.vault import address_problem  # hvac and requests stay unimported

        if (problem := address_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("vault_token")
    @classmethod
    def _vault_token(cls, value: SecretStr | None) -> SecretStr | None:
        """It goes into an HTTP header (X-Vault-Token), which carries printable ASCII only;
        Vault's tokens are. The error never repeats the value."""
        if value is not None and not _is_header_value(value.get_secret_value()):
            raise ValueError("not a Vault token: only printable ASCII characters, no spaces")
        return value

    @field_validator("vault_token_file")
    @classmethod
    def _vault_token_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Both a token and a file: which is meant? The file used to win, silently."""
        if value is not None and info.data.get("vault_token") is not None:
            raise ValueError("TRELLIS_VAULT_TOKEN is set too: give the token or the file, not both")
        return value

    @field_validator(
        "vault_namespace", "vault_kubernetes_mount", "vault_transit_mount", "vault_kv_mount"
    )
    @classmethod
    def _vault_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A request path or header, and part of the commands Trellis suggests: ``../x`` or a
        newline got as far as Vault (``cannot reach Vault: InvalidHeader``, exit 8). An empty
        namespace is the root namespace."""
        from ca.keys.vault import is_vault_path  # hvac and requests stay unimported

        if value is None or (value == "" and info.field_name == "vault_namespace"):
            return value
        if not is_vault_path(value):
            raise ValueError(
                "not a Vault path: names of letters, digits, '.', '_' and '-' between slashes"
            )
        return value

    @field_validator("vault_ca_cert", "vault_client_cert", "vault_client_key")
    @classmethod
    def _vault_tls_file(cls, value: Path | None) -> Path | None:
        """Read by every connection: one that cannot be read failed each call with requests'
        own words (exit 8), not as the setting it is."""
        if value is not None and not (value.is_file() and os.access(value, os.R_OK)):
            raise ValueError("no such file, or it cannot be read")
        return value

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str) -> str:
        """Recorded with each truststore and shown by ``trellis jobs list`` (128 characters,
        ``job_run.node``); a space or control character there would only ever be a typo."""
        if not 1 <= len(value) <= 128 or not _is_header_value(value):
            raise ValueError("1 to 128 printable ASCII characters, no spaces")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        """An address to bind, or a name resolving to one; it also goes into the serving
        certificate (``ca.serving``), so a name must be a DNS name."""
        if not is_host(value):
            raise ValueError("not an IP address or a host name")
        return value

    @field_validator("server_names", mode="before")
    @classmethod
    def _server_names_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
            if not isinstance(value, list):
                raise ValueError("not a JSON list of names ('[\"trellis.example.org\"]')")
        return value

    @field_validator("server_names")
    @classmethod
    def _server_names(cls, value: list[str]) -> list[str]:
        """Each goes into the serving certificate as an iPAddress or a dNSName SAN (RFC 5280
        §4.2.1.6: a dNSName is a preferred name syntax host name, never empty)."""
        names = []
        for name in value:
            try:
                names.append(str(ipaddress.ip_address(name)))
                continue
            except ValueError:
                pass
            try:
                names.append(check_dns_name(name))
            except TrellisError as error:
                raise ValueError(f"{error.detail}: give DNS names or IP addresses") from None
        return names

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        """The base of the CRL, OCSP and caIssuers URLs in every certificate issued
        (``RevocationUrls.under`` appends ``/v1/...``) and of Istio's ``spiffeBundleUrl``:
        clients fetch them over HTTP(S), so no query or fragment (the appended path would
        land inside it) and no user:password@ (it would be published in every certificate).

        Scheme and host are case-insensitive (RFC 3986 §6.2.2.1), but not to every reader:
        istiod tests a ``spiffeBundleUrl`` for ``https://`` case-sensitively and puts
        ``https://`` before one that fails (``HTTPS://x`` is fetched from ``https://HTTPS://x``),
        so both are kept in their lower-case, normal form; the path is case-sensitive and
        kept as given."""
        if value is None or value == "":
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise ValueError("not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an absolute http:// or https:// URL with a host")
        if no_port_to_reach(parts):
            raise ValueError("a port of 0, or a ':' with no port: give 1 to 65535, or none")
        if parts.query or parts.fragment or "?" in value or "#" in value:
            raise ValueError("a query or fragment: give a base URL such as https://ca.example.org")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "a user name or password in the URL: it is published in every certificate"
            )
        if any(ch.isspace() for ch in value) or not value.isascii():
            raise ValueError("spaces or non-ASCII characters: not a URL")
        if not is_host(parts.hostname):
            raise ValueError(f"{parts.hostname[:64]!r} is not a host name or an IP address")
        # No user information (refused above): the netloc is the host and port only.
        return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))

    def check_new_key_backend(self, name: str | None) -> None:
        """What ``KeyStore.new_keys_backend`` would refuse, before an init sets anything up (a
        refused init leaves nothing behind): an unknown backend, or Vault without its
        address, named with the settings to give (exit 2)."""
        chosen = name or self.key_backend
        check_backend_name(chosen)
        if chosen == "vault" and not self.vault_addr:
            raise unconfigured_backend(chosen)

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def server_tls_dir(self) -> Path:
        return self.data_dir / "server"

    @property
    def server_key_path(self) -> Path:
        """The serving certificate's key (``ca.serving``), which uvicorn loads."""
        return self.server_tls_dir / "tls.key"


def _check_sqlite(url: URL) -> None:
    """A SQLite URL names a file and nothing else: the file Trellis makes 0600, locks, backs
    up, counts as its own and checkpoints must be the one SQLite opens.

    An in-memory database is gone when the command exits: 'init' "succeeded" and left keys
    and an admin token for a CA no later command could find. A query is SQLAlchemy's and
    pysqlite's: with ``uri=true`` and another option it opened ``<path>?<option>`` while
    Trellis made, backed up and cleaned up ``<path>`` (a backup of no tables, exit 0); a value
    it could not parse (``timeout=abc``) was a traceback, and an unknown option (``mode=ro``)
    a warning and ignored. Trellis sets the connection's options itself (``db.connect``), so
    none is taken. A name starting ``file:`` is a URI to sqlite3 wherever Trellis hands it the
    path as it is (``sqlite3.connect(path)``: the backup snapshot, the checkpointer): the
    backup of ``sqlite:///file:ca.db`` was of a new, empty ``ca.db``."""
    database = url.database or ""
    if (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    ):
        raise ValueError("an in-memory database keeps nothing: use sqlite:///path")
    if url.query:
        names = ", ".join(repr(name[:40]) for name in sorted(url.query)[:5])
        raise ValueError(
            f"SQLite query options are not supported ({names}): Trellis sets the connection's"
            " options itself; give sqlite:///path alone"
        )
    if url.username is not None or url.password is not None or url.host or url.port:
        raise ValueError(
            "a user, password or host in a SQLite URL: give sqlite:///relative/path or"
            " sqlite:////absolute/path"
        )
    if database.startswith("file:"):
        raise ValueError("a SQLite URI filename (file:...): give the file's path, sqlite:///path")


def _is_header_value(value: str) -> bool:
    return value.isascii() and value.isprintable() and " " not in value


_Loaded = TypeVar("_Loaded", bound=DataPaths)


def load_settings(**given: Any) -> Settings:
    """The settings, ``given`` (a command's options) over the ``TRELLIS_*`` variables. A bad
    one is one ``InvalidInput`` line (exit 2) for the first, named as the operator set it: the
    option when a command passed one, else the variable (pydantic's report is a dozen lines and
    a URL). A secret's value is never repeated, nor a password in a URL (``ca.redact``): the
    line goes to a terminal or a log."""
    return _loaded(Settings, given)


def load_data_paths(**given: Any) -> DataPaths:
    """``load_settings`` for the data dir and the database alone (``DataPaths``)."""
    return _loaded(DataPaths, given)


def _loaded(model: type[_Loaded], given: dict[str, Any]) -> _Loaded:
    try:
        return model(**given)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        name = f"--{field.replace('_', '-')}" if field in given else f"TRELLIS_{field.upper()}"
        message = str(first["msg"]).removeprefix("Value error, ")  # a validator's own ValueError
        info = model.model_fields.get(field)
        if info is not None and SecretStr in (info.annotation, *get_args(info.annotation)):
            raise InvalidInput(f"{name}: {message}") from None
        # Masked before it is cut: a cut through ``user:password@`` leaves a password unmasked.
        shown, _ = masked_url(str(first.get("input")))
        raise InvalidInput(f"{name}={shown[:80]!r}: {message}") from None


@dataclass
class Context:
    """Everything a ``ca`` operation needs: built once per process by ``build_context``."""

    settings: Settings
    engine: Engine
    keys: KeyStore
    # Of the file key backend and of sealed secrets: read when one of them first needs it.
    passphrase: KeyPassphrase
    clock: Clock = field(default_factory=SystemClock)
    # Above any CRL number the instance a backup was taken of signed before it was restored
    # here (``ca.restored``); 0 for an instance never restored.
    crl_floor: int = 0
    # Caches of unlocked signers and rendered PEM, keyed by CA row id (see ``ca.authority``).
    cache: dict[object, object] = field(default_factory=dict)
    # Issuing transactions of concurrent requests, committed together (``ca.store.batch``).
    writes: GroupCommit = field(init=False, repr=False)
    # For single-statement reads on the hot paths (``ca.store.db.autocommit_engine``).
    reads: Engine = field(init=False, repr=False)
    # Hot-path reads of the requests ready on an event loop, made together (``ca.store.batch``).
    lookups: GroupRead = field(init=False, repr=False)
    # SQLite only, in servers: checkpoints the WAL off the event loop (``ca.store.db``).
    checkpointer: db.Checkpointer | None = None
    # In a server, the event loop serving requests, while it does (``ca.jobs.seal_audit``).
    serving_loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    # What building the context did to the schema (None: ``SchemaPolicy.TRUSTED`` asked
    # nothing), for ``trellis serve`` to log once its logging is set up.
    migration: db.Migration | None = None

    def __post_init__(self) -> None:
        self.writes = GroupCommit(self.engine)
        self.reads = db.autocommit_engine(self.engine)
        self.lookups = GroupRead(self.reads)

    @property
    def signs_locally(self) -> bool:
        """Whether every issuing key is a file: then an issuance is CPU work plus short reads,
        cheaper to run in place on an event loop than to hand to a thread, and its commit is
        made apart (``GroupCommit.run_async``). A Vault signature waits on the network, for
        its timeout when Vault hangs, and must not hold up anything else."""
        return self.keys.names == ("file",)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.writes.close()
        self.engine.dispose()
        if self.reads is not self.engine:
            self.reads.dispose()


def build_context(
    settings: Settings,
    *,
    clock: Clock | None = None,
    schema: db.SchemaPolicy = db.SchemaPolicy.MIGRATE,
    serving: bool = False,
) -> Context:
    """``schema``: what opening the store may do to an older schema (``db.SchemaPolicy``: the
    CLI's commands other than ``serve`` and ``migrate`` leave one alone). ``serving``: for
    ``trellis serve``, which on SQLite checkpoints in a thread of its own."""
    data_directory(settings.data_dir)
    for name in ("secrets", "server"):  # keys/: FileKeyBackend below; these when first used
        data_directory(settings.data_dir / name, create=False)
    # The secrets of the data dir that Trellis never reads back itself (uvicorn loads the
    # serving key; the admin token is for the operator's REST calls), so no read tightens them
    # as one does a key file, key-passphrase or a sealed secret: every command does, here.
    for secret in (settings.admin_token_path, settings.server_key_path):
        private_file(secret)
    given = settings.key_passphrase
    passphrase = KeyPassphrase(
        settings.data_dir, given.get_secret_value().encode() if given is not None else None
    )
    if settings.key_backend == "file":
        # New keys go to files: a passphrase that cannot be had stops every command now (exit
        # 8, naming the file), not the first one that makes a key. A missing one is generated
        # only by the first key or secret it encrypts, as ``init --key-backend vault`` and the
        # commands that encrypt nothing would leave one behind for nothing. With the vault
        # backend it is read only when a file key or a sealed secret is used (docs/vault.md).
        passphrase.check()
    backends: dict[str, KeyBackend] = {
        "file": FileKeyBackend(settings.data_dir / "keys", passphrase)
    }
    if settings.vault_addr:
        from ca.keys.vault import VaultKeyBackend  # only imported where Vault is configured

        backends["vault"] = VaultKeyBackend.from_settings(settings)
    restored = read_marker(settings.data_dir)
    keys = KeyStore(backends, default=settings.key_backend, shared=restored.shared)
    engine = db.connect(
        settings.effective_database_url, background_checkpoints=serving, data_dir=settings.data_dir
    )
    try:
        migration = db.settle_schema(engine, schema)
    except BaseException:
        engine.dispose()
        raise
    ctx = Context(
        settings=settings,
        engine=engine,
        keys=keys,
        passphrase=passphrase,
        clock=clock or SystemClock(),
        crl_floor=restored.crl_floor,
        migration=migration,
    )
    database = engine.url.database
    if serving and engine.dialect.name == "sqlite" and database and database != ":memory:":
        ctx.checkpointer = db.Checkpointer(database).start()
    return ctx
