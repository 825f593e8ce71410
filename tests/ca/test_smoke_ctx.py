from ca.authority import active_issuer
from ca.config import Context


def test_authority_initialises_on_every_store(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    assert str(issuer.trust_domain) == "example.org"
