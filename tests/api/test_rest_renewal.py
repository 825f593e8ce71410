"""POST /v1/svid/renew: a renewal proof (JWT signed by the current SVID key) as the bearer."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.clock import FixedClock
from ca.config import Context
from ca.renewal import make_proof
from tests.api.restkit import (
    Rest,
    Svid,
    assert_problem,
    bearer,
    concurrently,
    make_csr,
    new_key,
    post_csr,
    tamper_signature,
)
from tests.certassert import assert_is_svid_leaf


def test_renewal_keeps_the_identity_with_a_new_serial(rest: Rest, clock: FixedClock) -> None:
    svid = rest.enrol("spiffe://example.org/ns/default/sa/web")
    clock.advance(dt.timedelta(minutes=40))
    key, csr_pem = make_csr()

    response = rest.renew(svid, csr_pem, ttl="20m")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["spiffe_id"] == svid.body["spiffe_id"]
    assert body["serial"] != svid.serial
    leaf = x509.load_pem_x509_certificate(body["certificate"].encode())
    issuer = x509.load_pem_x509_certificates(body["chain"].encode())[0]
    assert_is_svid_leaf(leaf, spiffe_id=body["spiffe_id"], issuer=issuer)
    assert leaf.public_key() == key.public_key()
    assert leaf.not_valid_after_utc == clock.now() + dt.timedelta(minutes=20)
    listed = {item["serial"]: item for item in rest.certificates()}
    assert set(listed) == {svid.serial, body["serial"]}
    assert listed[body["serial"]]["requested_by"] == f"renewal:{svid.serial}"
    # The renewed SVID can itself be renewed.
    _key2, csr2 = make_csr()
    renewed = Svid(key, body)
    assert rest.renew(renewed, csr2).status_code == 200
    assert rest.certificate_count() == 3


def test_replayed_proof_is_refused(rest: Rest) -> None:
    svid = rest.enrol()
    _key, csr_pem = make_csr()
    proof = rest.proof(svid, csr_pem)
    assert rest.renew(svid, csr_pem, proof).status_code == 200

    body = assert_problem(rest.renew(svid, csr_pem, proof), 401)

    assert "already been used" in body["detail"]
    assert rest.certificate_count() == 2


def test_concurrent_replays_of_one_proof_issue_once(rest: Rest, ctx: Context) -> None:
    svid = rest.enrol()
    _key, csr_pem = make_csr()
    proof = rest.proof(svid, csr_pem)

    renew = functools.partial(post_csr, path="/v1/svid/renew", credential=proof, csr_pem=csr_pem)

    responses = concurrently(ctx, [renew] * 4)

    assert sorted(r.status_code for r in responses) == [200, 401, 401, 401]
    assert rest.certificate_count() == 2


def test_revoked_svid_cannot_renew(rest: Rest) -> None:
    svid = rest.enrol()
    revoked = rest.client.post(
        f"/v1/certificates/{svid.serial}/revoke",
        json={"reason": "keyCompromise"},
        headers=rest.admin,
    )
    assert revoked.status_code == 200

    assert_problem(rest.renew(svid, make_csr()[1]), 401)
    assert rest.certificate_count() == 1


def test_expired_svid_cannot_renew(rest: Rest, clock: FixedClock) -> None:
    svid = rest.enrol()
    clock.advance(dt.timedelta(hours=1))  # exactly notAfter: no longer valid

    body = assert_problem(rest.renew(svid, make_csr()[1]), 401)

    assert "expired" in body["detail"]
    assert rest.certificate_count() == 1


def test_proof_signed_by_another_key_is_refused(rest: Rest) -> None:
    """A stranger's key, or the key of some other live SVID: neither renews this one."""
    victim = rest.enrol("spiffe://example.org/victim")
    thief = rest.enrol("spiffe://example.org/thief")
    _key, csr_pem = make_csr()

    for key in (new_key(), thief.key):
        forged = rest.proof(victim, csr_pem, key=key)
        body = assert_problem(rest.renew(victim, csr_pem, forged), 401)
        assert "does not verify" in body["detail"]
    assert rest.certificate_count() == 2


def test_proof_bound_to_another_csr_is_refused(rest: Rest) -> None:
    svid = rest.enrol()
    _key, bound_csr = make_csr()
    _other_key, other_csr = make_csr()
    proof = rest.proof(svid, bound_csr)

    body = assert_problem(rest.renew(svid, other_csr, proof), 401)

    assert "different CSR" in body["detail"]
    # The proof was not spent by the refusal: it still works for the CSR it was made for.
    assert rest.renew(svid, bound_csr, proof).status_code == 200
    assert rest.certificate_count() == 2


def test_stale_or_future_proof_is_refused(rest: Rest, clock: FixedClock) -> None:
    svid = rest.enrol()
    _key, csr_pem = make_csr()
    stale = rest.proof(svid, csr_pem, now=clock.now() - dt.timedelta(minutes=5))
    future = rest.proof(svid, csr_pem, now=clock.now() + dt.timedelta(minutes=2))

    for proof in (stale, future):
        body = assert_problem(rest.renew(svid, csr_pem, proof), 401)
        assert "expired or not yet valid" in body["detail"]
    assert rest.certificate_count() == 1


def test_proof_from_a_client_clock_slightly_ahead_is_accepted(
    rest: Rest, clock: FixedClock
) -> None:
    """CLOCK_SKEW allows 60 s; PyJWT must not re-check ``iat`` against the wall clock with none
    (it did: the proof was refused as "does not verify with the certificate's key")."""
    clock.current = dt.datetime.now(dt.UTC)  # the server's clock is the wall clock, as deployed
    svid = rest.enrol()
    _key, csr_pem = make_csr()
    proof = rest.proof(svid, csr_pem, now=clock.now() + dt.timedelta(seconds=30))

    response = rest.renew(svid, csr_pem, proof)

    assert response.status_code == 200, response.text


def test_join_token_and_admin_token_are_not_renewal_proofs(rest: Rest, admin_token: str) -> None:
    entry_id = rest.create_entry()
    token = rest.join_token(entry_id)
    csr_pem = make_csr()[1]

    for credential in (token, admin_token, "e30.e30.", "not-a-jwt"):
        response = rest.client.post(
            "/v1/svid/renew", json={"csr": csr_pem}, headers=bearer(credential)
        )
        assert response.status_code == 401, credential
        assert_problem(response, 401)

    assert rest.certificate_count() == 0
    assert rest.request_svid(token, csr_pem).status_code == 200  # the join token was not spent


def test_renewal_respects_the_entry_today(rest: Rest) -> None:
    """Lifetimes come from the entry as it is now; a deleted entry ends renewal (403)."""
    svid = rest.enrol()

    too_long = rest.renew(svid, make_csr()[1], ttl="25h")
    assert assert_problem(too_long, 400)["code"] == "policy-violation"

    (entry,) = rest.client.get("/v1/entries", headers=rest.admin).json()
    assert rest.client.delete(f"/v1/entries/{entry['id']}", headers=rest.admin).status_code == 200
    assert_problem(rest.renew(svid, make_csr()[1]), 403)
    assert rest.certificate_count() == 1


def test_renewal_csr_must_not_ask_for_another_identity(rest: Rest) -> None:
    svid = rest.enrol("spiffe://example.org/web")
    _key, csr_pem = make_csr(uris=["spiffe://example.org/admin"])

    assert assert_problem(rest.renew(svid, csr_pem), 400)["code"] == "policy-violation"
    assert rest.certificate_count() == 1


def _bound_digest(csr_pem: str) -> bytes:
    """What a proof for ``csr_pem`` names: the SHA-256 of its DER, or, for a body no DER can be
    decoded from, of the bytes sent (any digest: nothing can match it)."""
    try:
        der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    except ValueError:
        der = csr_pem.encode()
    return hashlib.sha256(der).digest()


BAD_CSRS = [
    ("not-pem", "not a CSR", "invalid-csr"),
    (
        "pem-of-garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "invalid-csr",
    ),
    ("bad-signature", tamper_signature(make_csr()[1]), "invalid-csr"),
    ("another-identity", make_csr(uris=["spiffe://example.org/admin"])[1], "policy-violation"),
]


def test_the_proof_is_judged_before_the_csr(rest: Rest) -> None:
    """Regression: the CSR was parsed and judged before the proof's signature was checked, so a
    forged proof with a bad CSR was 400 (telling a caller who proved nothing about its body) and
    counted as ``invalid-csr``, not ``unauthenticated``. A proof that does not verify is 401
    whatever the CSR; one that verifies, for a live SVID, lets the CSR be judged: 400."""
    svid = rest.enrol("spiffe://example.org/web")
    revoked = rest.enrol("spiffe://example.org/revoked")
    revocation = rest.client.post(
        f"/v1/certificates/{revoked.serial}/revoke", json={}, headers=rest.admin
    )
    assert revocation.status_code == 200, revocation.text
    for case, csr_pem, code in BAD_CSRS:
        digest = _bound_digest(csr_pem)
        forged = make_proof(svid.certificate, new_key(), digest, rest.clock.now())
        body = assert_problem(rest.renew(svid, csr_pem, forged), 401)
        assert "does not verify" in body["detail"], case
        of_revoked = make_proof(revoked.certificate, revoked.key, digest, rest.clock.now())
        assert "revoked" in assert_problem(rest.renew(revoked, csr_pem, of_revoked), 401)["detail"]
        genuine = make_proof(svid.certificate, svid.key, digest, rest.clock.now())
        assert assert_problem(rest.renew(svid, csr_pem, genuine), 400)["code"] == code, case
    assert rest.certificate_count() == 2
    # The refusals spent nothing: a good CSR renews.
    assert rest.renew(svid, make_csr()[1]).status_code == 200
