from ca.authority import active_issuer
from ca.config import Context


def test_authority_initialises_on_every_store(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    assert str(issuer.trust_domain) == "example.org"


def test_only_key_files_count_as_signing_locally(ctx: Context) -> None:
    """``signs_locally`` lets the API run an issuance on the event loop, whatever the database:
    it must be False as soon as a signature can wait on the network (Vault: tests/vault)."""
    assert ctx.signs_locally
