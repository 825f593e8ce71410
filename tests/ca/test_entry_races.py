"""Issuances racing the deletion or disabling of their registration entry (docs/api.md: a
disabled entry gets no SVID and no renewal; renewal needs its entry to still exist), made to
happen on purpose: the entry's change is held inside its transaction while an issuance that
authenticated before it is recorded (``tests.ca.racekit``). Both databases."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ca import entries
from ca.config import Context
from ca.entries import delete_entry, set_entry_enabled
from ca.errors import AuthenticationFailed, PermissionDenied
from ca.grants import join_grant, renewal_grant
from ca.issue import Grant, issue_svid
from ca.keys import KeyType
from ca.renewal import make_proof
from tests.ca.racekit import first_held
from tests.ca.svidkit import Workload, count_rows, csr_sha256, enrol, join_secret, make_csr, new_key

WEB = "spiffe://example.org/web"


def renewal(ctx: Context, old: Workload) -> tuple[Grant, bytes]:
    csr = make_csr(new_key(KeyType.EC_P256), uris=[WEB])
    proof = make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now())
    return renewal_grant(ctx, proof, csr), csr


def joining(ctx: Context, old: Workload) -> tuple[Grant, bytes]:
    _, secret = join_secret(ctx, old.entry)
    return join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256), uris=[WEB])


ISSUANCES: dict[str, Callable[[Context, Workload], tuple[Grant, bytes]]] = {
    "renewal": renewal,
    "join": joining,
}
CHANGES: dict[str, Callable[[Context, str], object]] = {
    "delete": lambda ctx, entry_id: delete_entry(ctx, entry_id),
    "disable": lambda ctx, entry_id: set_entry_enabled(ctx, entry_id, False),
}


@pytest.mark.parametrize("authenticated", ISSUANCES.values(), ids=ISSUANCES.keys())
@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_an_issuance_recorded_while_its_entry_is_withdrawn_is_refused(
    ctx: Context,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Context, str], object],
    authenticated: Callable[[Context, Workload], tuple[Grant, bytes]],
) -> None:
    """The deletion or disabling is recording its audit record, not committed yet; the
    issuance's batch waits for it and then finds the entry gone or disabled. It had checked the
    entry only when it authenticated, and committed a certificate after the entry.deleted or
    entry.disabled record."""
    old = enrol(ctx, WEB)
    grant, csr = authenticated(ctx, old)
    certificates = count_rows(ctx, "certificate")

    changed, issued = first_held(
        monkeypatch,
        entries.audit,
        "record",
        lambda: change(ctx, old.entry.id),
        lambda: issue_svid(ctx, grant, csr),
    )

    assert not isinstance(changed, Exception), changed
    # Refused by the entry check, or, a join token deleted with its entry, by the token's spend
    assert isinstance(issued, PermissionDenied | AuthenticationFailed), issued
    assert count_rows(ctx, "certificate") == certificates
