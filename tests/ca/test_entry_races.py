"""Issuances racing the deletion or disabling of their registration entry (docs/api.md: a
disabled entry gets no SVID and no renewal; renewal needs its entry to still exist), made to
happen on purpose: the entry's change is held inside its transaction while an issuance that
authenticated before it is recorded (``tests.ca.racekit``). Both databases."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from ca import entries
from ca.config import Context
from ca.entries import Entry, delete_entry, set_entry_enabled
from ca.errors import AuthenticationFailed, NotFound, PermissionDenied
from ca.grants import join_grant, renewal_grant
from ca.issue import Grant, issue_svid
from ca.keys import KeyType
from ca.renewal import make_proof
from ca.tokens import TokenInfo, create_join_token
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


def tokens_of(ctx: Context, entry_id: str) -> int:
    with ctx.engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT count(*) FROM token WHERE entry_id = :id"), {"id": entry_id}
        )
        return int(found.scalar_one())


def test_a_join_token_created_while_its_entry_is_deleted_is_a_404(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion is recording its audit record; the token's creation waits for it and finds
    no entry. It had found the entry, and its INSERT then failed the foreign key (a 500)."""
    old = enrol(ctx, WEB)

    deleted, created = first_held(
        monkeypatch,
        entries.audit,
        "record",
        lambda: delete_entry(ctx, old.entry.id),
        lambda: create_join_token(ctx, old.entry.id),
    )

    assert isinstance(deleted, Entry), deleted
    assert isinstance(created, NotFound), created
    assert "does not exist" in created.detail
    assert tokens_of(ctx, old.entry.id) == 0


def test_an_entry_deleted_while_a_join_token_is_created_for_it_is_deleted_with_it(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token's creation is recording its audit record; the deletion waits for it and
    deletes the new token with the entry. It had deleted the tokens it saw, and then the entry
    under the new one's foreign key (a 500 on PostgreSQL, the entry kept) or let the token's
    INSERT fail it (SQLite)."""
    old = enrol(ctx, WEB)

    created, deleted = first_held(
        monkeypatch,
        entries.audit,
        "record",
        lambda: create_join_token(ctx, old.entry.id),
        lambda: delete_entry(ctx, old.entry.id),
    )

    assert isinstance(created, tuple) and isinstance(created[0], TokenInfo), created
    assert isinstance(deleted, Entry), deleted
    assert tokens_of(ctx, old.entry.id) == 0
    with pytest.raises(NotFound):
        entries.get_entry(ctx, old.entry.id)
