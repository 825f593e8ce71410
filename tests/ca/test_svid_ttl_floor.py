"""The shortest SVID life. ``entry create --ttl 1s`` was accepted, and with notAfter cut to a whole
second its certificates had as little as 0.07 s of life: an agent on that entry never renewed,
and bootstrapped again with its join token every second (21 certificates, ~20 token uses in
20 s). An entry's TTL and a requested one are now at least ``MIN_SVID_TTL``."""

from __future__ import annotations

import pytest

from ca.config import Context
from ca.durations import MIN_SVID_TTL, Ttl
from ca.entries import EntryParams, create_entry
from ca.errors import InvalidInput
from ca.grants import join_grant
from ca.identity import SpiffeId
from ca.issue import issue_svid
from ca.keys import KeyType
from tests.ca.svidkit import (
    SQLITE_ONLY,
    add_entry,
    join_secret,
    make_csr,
    new_key,
    uses_remaining,
)

WEB = "spiffe://example.org/web"


def test_the_floor_is_what_the_drills_use_at_least() -> None:
    assert Ttl(5) == MIN_SVID_TTL


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("ttl", "max_ttl", "message"),
    [
        (Ttl(1), None, "the entry's TTL 1s is shorter than the minimum SVID lifetime, 5s"),
        (Ttl(4), Ttl(60), "the entry's TTL 4s is shorter than the minimum SVID lifetime, 5s"),
        (None, Ttl(2), "the entry's max TTL 2s is shorter than the minimum SVID lifetime, 5s"),
    ],
    ids=["fail/ttl-1s", "fail/ttl-4s", "fail/max-ttl-2s"],
)
def test_an_entry_below_the_floor_is_refused(
    ctx: Context, ttl: Ttl | None, max_ttl: Ttl | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=rf"^{message}$"):
        create_entry(ctx, EntryParams(SpiffeId.parse(WEB), (), ttl=ttl, max_ttl=max_ttl))


@SQLITE_ONLY
def test_an_entry_at_the_floor_is_issued_its_life(ctx: Context) -> None:
    entry = add_entry(ctx, WEB, ttl=MIN_SVID_TTL, max_ttl=Ttl(60))
    csr = make_csr(new_key(KeyType.EC_P256), uris=[WEB])
    svid = issue_svid(ctx, join_grant(ctx, join_secret(ctx, entry)[1]), csr)
    assert svid.certificate.not_valid_after_utc - ctx.clock.now() == MIN_SVID_TTL.delta


@SQLITE_ONLY
def test_a_request_below_the_floor_is_refused(ctx: Context) -> None:
    entry = add_entry(ctx, WEB, ttl=Ttl(60))
    token, secret = join_secret(ctx, entry)
    csr = make_csr(new_key(KeyType.EC_P256), uris=[WEB])
    with pytest.raises(InvalidInput, match=r"^the requested TTL 4s is shorter than the minimum"):
        issue_svid(ctx, join_grant(ctx, secret), csr, Ttl(4))
    assert uses_remaining(ctx, token) == 1  # nothing issued, the token's use not spent
