"""POST /v1/svid: bootstrap an X509-SVID with a join token (the happy paths)."""

from __future__ import annotations

import datetime as dt
import functools

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from ca.clock import FixedClock
from ca.config import Context
from tests.api.restkit import Rest, concurrently, make_csr, post_csr
from tests.certassert import assert_is_svid_leaf, uri_sans

BACKDATE = dt.timedelta(seconds=30)  # ca.profiles.BACKDATE, restated: the test pins the contract


def _certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def test_join_token_bootstrap_returns_a_verifiable_svid(rest: Rest, clock: FixedClock) -> None:
    entry_id = rest.create_entry("spiffe://example.org/ns/default/sa/web")
    token = rest.join_token(entry_id)
    key, csr_pem = make_csr()

    response = rest.request_svid(token, csr_pem)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body.keys() == {"certificate", "chain", "bundle", "serial", "expires_at", "spiffe_id"}
    assert body["spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
    (leaf,) = _certs(body["certificate"])
    chain = _certs(body["chain"])
    roots = _certs(body["bundle"])
    assert_is_svid_leaf(leaf, spiffe_id=body["spiffe_id"], issuer=chain[0])
    assert uri_sans(leaf) == ["spiffe://example.org/ns/default/sa/web"]
    assert format(leaf.serial_number, "x") == body["serial"]
    assert dt.datetime.fromisoformat(body["expires_at"]) == leaf.not_valid_after_utc
    assert leaf.public_key() == key.public_key()
    # The default TTL of an entry is the authority's SVID TTL (1h); notBefore is backdated.
    assert leaf.not_valid_before_utc == clock.now() - BACKDATE
    assert leaf.not_valid_after_utc == clock.now() + dt.timedelta(hours=1)

    verified = (
        PolicyBuilder()
        .store(Store(roots))
        .time(clock.now())
        .build_client_verifier()
        .verify(leaf, chain)
    )
    assert [c.subject for c in verified.chain] == [leaf.subject, chain[0].subject, roots[0].subject]
    assert rest.client.get("/v1/bundle").text == body["bundle"]


def test_requested_ttl_is_honoured_up_to_the_entry_max(rest: Rest, clock: FixedClock) -> None:
    cases = [("90s", 90), ("15m", 900), ("24h", 86400)]
    token = rest.join_token(rest.create_entry(max_ttl="24h"), uses=len(cases))
    for ttl, seconds in cases:
        response = rest.request_svid(token, make_csr()[1], ttl=ttl)

        assert response.status_code == 200, (ttl, response.text)
        (leaf,) = _certs(response.json()["certificate"])
        assert leaf.not_valid_after_utc == clock.now() + dt.timedelta(seconds=seconds), ttl


def test_entry_ttl_is_the_default_and_dns_names_come_from_the_entry(
    rest: Rest, clock: FixedClock
) -> None:
    entry_id = rest.create_entry(ttl="10m", dns_names=["web.example.org", "web"])
    # The CSR may ask for a subset of the entry's names; the SVID carries all of them.
    _key, csr_pem = make_csr(uris=["spiffe://example.org/web"], dns_names=["web.example.org"])

    response = rest.request_svid(rest.join_token(entry_id), csr_pem)

    assert response.status_code == 200, response.text
    body = response.json()
    (leaf,) = _certs(body["certificate"])
    assert leaf.not_valid_after_utc == clock.now() + dt.timedelta(minutes=10)
    assert_is_svid_leaf(
        leaf,
        spiffe_id="spiffe://example.org/web",
        issuer=_certs(body["chain"])[0],
        dns_names=["web.example.org", "web"],
    )


def test_csr_asking_for_ca_powers_gets_a_plain_leaf(rest: Rest) -> None:
    token = rest.join_token(rest.create_entry())
    _key, csr_pem = make_csr(basic_ca=True, key_cert_sign=True)

    response = rest.request_svid(token, csr_pem)

    # X509-SVID §4.3: the profile decides the extensions; the CSR contributes only its key.
    assert response.status_code == 200, response.text
    body = response.json()
    (leaf,) = _certs(body["certificate"])
    assert_is_svid_leaf(leaf, spiffe_id=body["spiffe_id"], issuer=_certs(body["chain"])[0])
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign and not usage.crl_sign


def test_multi_use_join_token_counts_down(rest: Rest) -> None:
    entry_id = rest.create_entry()
    token = rest.join_token(entry_id, uses=2)

    serials = {rest.request_svid(token, make_csr()[1]).json()["serial"] for _ in range(2)}
    third = rest.request_svid(token, make_csr()[1])

    assert len(serials) == 2
    assert third.status_code == 401
    assert rest.certificate_count() == 2


def test_concurrent_redemptions_of_a_single_use_token_issue_once(rest: Rest, ctx: Context) -> None:
    token = rest.join_token(rest.create_entry())
    csrs = [make_csr()[1] for _ in range(4)]

    responses = concurrently(
        ctx,
        [
            functools.partial(post_csr, path="/v1/svid", credential=token, csr_pem=csr)
            for csr in csrs
        ],
    )

    assert sorted(r.status_code for r in responses) == [200, 401, 401, 401]
    assert rest.certificate_count() == 1
