"""Renewals racing revocations (docs/revocation.md: a revoked SVID cannot be renewed, and a
revocation cannot be half-done), made to happen on purpose: one side is held inside its
transaction while the other runs (``tests.ca.racekit``). Both databases.

A renewal authenticated before the revocation commits either first, and the revocation of
its identity takes its new certificate too, or after, and is refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ca import certs
from ca.certs import CertStatus, list_certificates, revoke_certificate, revoke_identity
from ca.config import Context
from ca.errors import AuthenticationFailed
from ca.grants import renewal_grant
from ca.identity import SpiffeId
from ca.issue import Grant, IssuedSvid, issue_svid
from ca.keys import KeyType
from ca.renewal import make_proof
from ca.revocation import RevocationReason
from ca.store import batch
from tests.ca.racekit import first_held
from tests.ca.svidkit import Workload, csr_sha256, enrol, make_csr, new_key

WEB = "spiffe://example.org/web"
COMPROMISE = RevocationReason.KEY_COMPROMISE


def authenticated_renewal(ctx: Context, old: Workload) -> tuple[Grant, bytes]:
    """A renewal of ``old`` past its authentication: what is left is to sign and record it."""
    csr = make_csr(new_key(KeyType.EC_P256), uris=[WEB])
    proof = make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now())
    return renewal_grant(ctx, proof, csr), csr


def live(ctx: Context) -> list[str]:
    found = list_certificates(ctx, spiffe_id=SpiffeId.parse(WEB), status=CertStatus.ACTIVE)
    return [info.serial.hex for info in found]


REVOCATIONS: dict[str, Callable[[Context, Workload], object]] = {
    "identity": lambda ctx, old: revoke_identity(ctx, SpiffeId.parse(WEB), COMPROMISE, "admin"),
    "serial": lambda ctx, old: revoke_certificate(ctx, old.svid.serial, COMPROMISE, "admin"),
}


@pytest.mark.parametrize("revoke", REVOCATIONS.values(), ids=REVOCATIONS.keys())
def test_a_renewal_recorded_while_a_revocation_commits_is_refused(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, revoke: Callable[[Context, Workload], object]
) -> None:
    """The revocation has marked the certificate and is re-signing the CRL, not committed yet;
    the renewal's batch waits for it and then sees the certificate revoked. It had read it
    active (outside its transaction on SQLite, without waiting on PostgreSQL) and committed a
    live certificate renewed from a revoked one."""
    old = enrol(ctx, WEB)
    grant, csr = authenticated_renewal(ctx, old)

    revoked, renewed = first_held(
        monkeypatch,
        certs,
        "refresh_crl_if_signable",
        lambda: revoke(ctx, old),
        lambda: issue_svid(ctx, grant, csr),
    )

    assert not isinstance(revoked, Exception), revoked
    assert isinstance(renewed, AuthenticationFailed), renewed
    assert live(ctx) == []


def test_a_revocation_of_an_identity_takes_the_renewal_committing_meanwhile(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal's batch has checked the old certificate and is about to insert the new one;
    the revocation of the identity waits for it to commit and revokes both, all or nothing.
    It had read the identity's certificates before the new one was there, and left it live."""
    old = enrol(ctx, WEB)
    grant, csr = authenticated_renewal(ctx, old)

    renewed, revoked = first_held(
        monkeypatch,
        batch.Rows,
        "insert",
        lambda: issue_svid(ctx, grant, csr),
        lambda: revoke_identity(ctx, SpiffeId.parse(WEB), COMPROMISE, "admin"),
    )

    assert isinstance(renewed, IssuedSvid), renewed
    assert isinstance(revoked, list), revoked
    assert {info.serial.hex for info in revoked} == {old.svid.serial.hex, renewed.serial.hex}
    assert live(ctx) == []
