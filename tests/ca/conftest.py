"""Fixtures for the ``ca`` tests: a second, unrelated authority and cheap big RSA keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.authority import AuthorityParams, Issuer, active_issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.identity import TrustDomain
from ca.keys import KeyType, PrivateKey
from tests.conftest import migrated_sqlite

TRUST_DOMAIN = TrustDomain.parse("example.org")  # the same as tests/conftest.py's
PASSPHRASE = "test-passphrase-not-secret"


@pytest.fixture(scope="session")
def _slow_rsa_keys() -> dict[KeyType, PrivateKey]:
    return {}


@pytest.fixture
def cached_big_rsa(
    monkeypatch: pytest.MonkeyPatch, _slow_rsa_keys: dict[KeyType, PrivateKey]
) -> None:
    """Generate RSA-3072/4096 keys once per session; every other type stays freshly random.

    Only the generator is cached: the backends still encrypt, store and load each key.
    """
    original = KeyType.generate

    def generate(self: KeyType) -> PrivateKey:
        if self in (KeyType.RSA_3072, KeyType.RSA_4096):
            if self not in _slow_rsa_keys:
                _slow_rsa_keys[self] = original(self)
            return _slow_rsa_keys[self]
        return original(self)

    monkeypatch.setattr(KeyType, "generate", generate)


def make_context(data_dir: Path, clock: FixedClock, passphrase: str = PASSPHRASE) -> Context:
    settings = Settings(
        data_dir=data_dir,
        database_url=migrated_sqlite(data_dir / "trellis.db"),
        key_passphrase=passphrase,  # type: ignore[arg-type]
    )
    return build_context(settings, clock=clock)


@pytest.fixture
def foreign_ctx(tmp_path: Path, clock: FixedClock) -> Iterator[Context]:
    """Another authority for the *same* trust domain name, in its own data dir and database:
    same subject names, different keys, so only a key-based check can tell them apart."""
    ctx = make_context(tmp_path / "foreign", clock)
    init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
    yield ctx
    ctx.close()


@pytest.fixture
def foreign_issuer(foreign_ctx: Context) -> Issuer:
    return active_issuer(foreign_ctx)
