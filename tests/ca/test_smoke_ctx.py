from ca.authority import active_issuer
from ca.config import Context


def test_authority_initialises_on_every_store(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    assert str(issuer.trust_domain) == "example.org"


def test_only_sqlite_with_key_files_counts_as_local(ctx: Context) -> None:
    """``local_only`` lets the API run an issuance on the event loop: it must be False as soon
    as an issuance can wait on the network (PostgreSQL here; Vault in tests/vault)."""
    assert ctx.local_only == (ctx.engine.dialect.name == "sqlite")
