"""Settings (``TRELLIS_*`` environment variables, overridden by CLI flags) and the one factory
that turns them into a running context. No module keeps global state: everything is built here
and passed down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import Engine

from ca.clock import Clock, SystemClock
from ca.errors import Unavailable
from ca.files import data_directory
from ca.keys.backend import KeyBackend
from ca.keys.file import FileKeyBackend, load_or_create_passphrase
from ca.keys.store import KeyStore
from ca.store import db
from ca.store.batch import GroupCommit, GroupRead

__all__ = ["Context", "Settings", "build_context"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRELLIS_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8443
    trust_domain: str | None = None
    key_passphrase: SecretStr | None = None
    public_url: str | None = None
    server_names: list[str] = []
    key_backend: str = "file"  # where new authorities keep their keys: file or vault
    bundle_refresh_hint: int = 300  # seconds, published as spiffe_refresh_hint

    # Vault / OpenBao (the vault key backend; see docs/vault.md)
    vault_addr: str | None = None
    vault_auth_method: str = "token"  # token | approle | kubernetes
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
    vault_timeout: float = 10.0

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'trellis.db').resolve()}"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def server_tls_dir(self) -> Path:
        return self.data_dir / "server"


@dataclass
class Context:
    """Everything a ``ca`` operation needs: built once per process by ``build_context``."""

    settings: Settings
    engine: Engine
    keys: KeyStore
    clock: Clock = field(default_factory=SystemClock)
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
    migrate: bool = True,
    serving: bool = False,
) -> Context:
    """``serving``: for ``trellis serve``, which on SQLite checkpoints in a thread of its own."""
    data_directory(settings.data_dir)
    for name in ("secrets", "server"):  # keys/: FileKeyBackend below; these when first used
        data_directory(settings.data_dir / name, create=False)
    if settings.key_passphrase is not None:
        passphrase = settings.key_passphrase.get_secret_value().encode()
    else:
        passphrase_file, keys_dir = settings.data_dir / "key-passphrase", settings.data_dir / "keys"
        if not passphrase_file.exists() and keys_dir.is_dir() and any(keys_dir.iterdir()):
            # A new random passphrase would open none of them (a restored data dir, say).
            raise Unavailable(
                f"the CA keys in {keys_dir} are encrypted, and {passphrase_file} is missing:"
                " put it back, or set TRELLIS_KEY_PASSPHRASE"
            )
        passphrase = load_or_create_passphrase(passphrase_file)
    backends: dict[str, KeyBackend] = {
        "file": FileKeyBackend(settings.data_dir / "keys", passphrase)
    }
    if settings.vault_addr:
        from ca.keys.vault import VaultKeyBackend  # only imported where Vault is configured

        backends["vault"] = VaultKeyBackend.from_settings(settings)
    keys = KeyStore(backends, default=settings.key_backend)
    engine = db.connect(settings.effective_database_url, background_checkpoints=serving)
    if migrate:
        db.upgrade(engine)
    ctx = Context(settings=settings, engine=engine, keys=keys, clock=clock or SystemClock())
    database = engine.url.database
    if serving and engine.dialect.name == "sqlite" and database and database != ":memory:":
        ctx.checkpointer = db.Checkpointer(database).start()
    return ctx
