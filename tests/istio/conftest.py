"""Fixtures for the Istio tests: the ``trellis`` CLI in-process against ``ctx``'s data dir and
database, Trellis-issued workloads, and a foreign Trellis (same trust domain name, other keys)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ca.authority import AuthorityParams, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.grants import admin_grant
from ca.identity import SpiffeId
from ca.issue import mint_svid
from ca.keys import KeyType
from tests.conftest import PASSPHRASE, TRUST_DOMAIN, migrated_sqlite
from tests.istio.istiokit import Cli, Peer

# The certificates do not depend on the database: these suites run on SQLite, except the JWKS
# endpoint tests, whose sequence is stored.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def cli(ctx: Context, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("TRELLIS_PUBLIC_URL", raising=False)
    return Cli(ctx.settings.data_dir, ctx.settings.effective_database_url, capsys)


def trellis_workload(ctx: Context, path: str, key_type: KeyType = KeyType.EC_P256) -> Peer:
    """A workload holding a Trellis SVID, trusting only the Trellis bundle."""
    spiffe_id = SpiffeId.from_path(TRUST_DOMAIN, path)
    key = key_type.generate()
    svid = mint_svid(ctx, admin_grant(ctx, spiffe_id, "tests/istio"), key)
    return Peer(str(spiffe_id), (svid.certificate, *svid.issuer.chain), key, svid.bundle_pem)


@pytest.fixture
def workload(ctx: Context) -> Callable[..., Peer]:
    return lambda path, key_type=KeyType.EC_P256: trellis_workload(ctx, path, key_type)


@pytest.fixture
def foreign_ctx(tmp_path: Path, clock: FixedClock) -> Iterator[Context]:
    """Another Trellis for the same trust domain name: its own data dir, database and keys."""
    data_dir = tmp_path / "foreign"
    settings = Settings(
        data_dir=data_dir,
        database_url=migrated_sqlite(data_dir / "trellis.db"),
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )
    ctx = build_context(settings, clock=clock)
    init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
    yield ctx
    ctx.close()
