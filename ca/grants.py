"""Authentication for issuance: turning a presented credential into a ``Grant``.

Three ways in, each yielding exactly the identity the credential is bound to:
join token → its registration entry; renewal proof → the SPIFFE ID of the live SVID it proves;
local admin (``trellis svid mint``) → whatever ID the admin names, inside the trust domain.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from cryptography import x509

from ca.authority import MESH, active_issuer
from ca.config import Context
from ca.csr import DecodedCsr, decode_csr, svid_csr
from ca.durations import Ttl
from ca.entries import DEFAULT_MAX_TTL, check_not_reserved
from ca.errors import (
    AuthenticationFailed,
    InvalidCsr,
    PermissionDenied,
    PolicyViolation,
)
from ca.identity import SERVER_PATH, SpiffeId
from ca.issue import Grant, refused
from ca.renewal import read_proof, unverified_serial
from ca.serial import Serial
from ca.store.batch import Lookup
from ca.store.core import table
from ca.store.models import CertificateRow, EntryRow, TokenRow
from ca.tokens import TokenKind, check_live, valid_secret

__all__ = [
    "admin_grant",
    "join_grant",
    "join_grant_async",
    "renewal_grant",
    "renewal_grant_async",
    "server_grant",
]

# One query per credential, built once (see ca.store.core): these run on every issuance, for one
# request (``join_grant``) or for all those an event loop has ready (``join_grant_async``,
# ``ca.store.batch.GroupRead``).
_TOKEN, _ENTRY, _CERT = table(TokenRow), table(EntryRow), table(CertificateRow)
_ENTRY_COLUMNS = (
    _ENTRY.c.id.label("entry_id"),
    _ENTRY.c.spiffe_id,
    _ENTRY.c.dns_names,
    _ENTRY.c.ttl_seconds,
    _ENTRY.c.max_ttl_seconds,
    _ENTRY.c.disabled_at,
)
_JOINS = Lookup.by(
    sa.select(
        _TOKEN.c.id,
        _TOKEN.c.kind,
        _TOKEN.c.entry_id.label("token_entry_id"),
        _TOKEN.c.uses_remaining,
        _TOKEN.c.expires_at,
        _TOKEN.c.revoked_at,
        *_ENTRY_COLUMNS,
    ).select_from(_TOKEN.outerjoin(_ENTRY, _ENTRY.c.id == _TOKEN.c.entry_id)),
    _TOKEN.c.secret_hash,
)
_RENEWINGS = Lookup.by(
    sa.select(
        _CERT.c.profile,
        _CERT.c.status,
        _CERT.c.not_after,
        _CERT.c.cert_pem,
        _CERT.c.entry_id.label("cert_entry_id"),
        *_ENTRY_COLUMNS,
    ).select_from(_CERT.outerjoin(_ENTRY, _ENTRY.c.id == _CERT.c.entry_id)),
    _CERT.c.serial,
)


def _entry_grant(row: Mapping[str, Any], *, requested_by: str) -> Grant:
    if row["disabled_at"] is not None:
        raise PermissionDenied(f"the registration entry for {row['spiffe_id']} is disabled")
    return Grant(
        spiffe_id=SpiffeId.parse(row["spiffe_id"]),
        default_ttl=Ttl(row["ttl_seconds"]),
        max_ttl=Ttl(row["max_ttl_seconds"]),
        requested_by=requested_by,
        dns_names=tuple(name for name in row["dns_names"].split(",") if name),
        entry_id=row["entry_id"],
    )


# Each way in counts its refusals in the issuance metric (``ca.issue.refused``), and a lookup the
# database failed (``unavailable``): they happen before there is a grant, so ``issue_svid``
# never sees them. A try costs nothing until it raises.


def join_grant(ctx: Context, secret: str) -> Grant:
    try:
        digest = valid_secret(secret)
        with ctx.reads.connect() as connection:
            found = _JOINS.one(connection, digest)
        return _join_grant(found, ctx.clock.now())
    except Exception as error:
        refused(error)
        raise


async def join_grant_async(ctx: Context, secret: str) -> Grant:
    """``join_grant`` on an event loop: the lookup is shared with the other requests the loop
    has ready (``ca.store.batch.GroupRead``)."""
    try:
        digest = valid_secret(secret)
        return _join_grant(await ctx.lookups.get(_JOINS, digest), ctx.clock.now())
    except Exception as error:
        refused(error)
        raise


def _join_grant(found: Mapping[str, Any] | None, now: dt.datetime) -> Grant:
    token = check_live(found, now)
    if token["kind"] != TokenKind.JOIN.value or token["token_entry_id"] is None:
        raise PermissionDenied(
            "SVIDs are requested with a join token (admins use 'trellis svid mint')"
        )
    if token["entry_id"] is None:
        raise AuthenticationFailed("the join token's registration entry no longer exists")
    grant = _entry_grant(token, requested_by=f"join-token:{token['id']}")
    return dataclasses.replace(grant, join_token_id=token["id"])


def renewal_grant(ctx: Context, proof: str, csr_pem: bytes | None) -> Grant:
    """Only the holder of a live (unexpired, unrevoked) SVID's key may renew it, and only into
    the same SPIFFE ID, with the lifetimes its registration entry allows today.

    The proof is judged before the CSR it is bound to: the CSR is only decoded for its hash
    until then, so a caller whose proof does not verify is 401 (and counted as
    ``unauthenticated``) whatever its CSR, and learns nothing about it."""
    try:
        serial = unverified_serial(proof)
        csr = _decoded(csr_pem)
        with ctx.reads.connect() as connection:
            row = _RENEWINGS.one(connection, serial.hex)
        return _renewal_grant(row, proof, serial, csr_pem, csr, ctx.clock.now())
    except Exception as error:
        refused(error)
        raise


async def renewal_grant_async(ctx: Context, proof: str, csr_pem: bytes | None) -> Grant:
    """``renewal_grant`` on an event loop: the certificate lookup is shared with the other
    requests the loop has ready, and on PostgreSQL made off the loop (``GroupRead``)."""
    try:
        serial = unverified_serial(proof)
        csr = _decoded(csr_pem)
        row = await ctx.lookups.get(_RENEWINGS, serial.hex)
        return _renewal_grant(row, proof, serial, csr_pem, csr, ctx.clock.now())
    except Exception as error:
        refused(error)
        raise


def _decoded(csr_pem: bytes | None) -> DecodedCsr | InvalidCsr | None:
    """The CSR for its hash, or why it has none: raised only once the proof is judged. None: the
    request carries no CSR at all (its body is no request: the caller refuses that, 400, once
    the proof is judged; the grant it gets issues nothing, see ``ca.issue._parsed``)."""
    if csr_pem is None:
        return None
    try:
        return decode_csr(csr_pem)
    except InvalidCsr as error:
        return error


def _renewal_grant(
    row: Mapping[str, Any] | None,
    proof: str,
    serial: Serial,
    csr_pem: bytes | None,
    csr: DecodedCsr | InvalidCsr | None,
    now: dt.datetime,
) -> Grant:
    if row is None or row["profile"] != "x509-svid":
        raise AuthenticationFailed("the renewal proof names an unknown certificate")
    claims = read_proof(
        proof,
        x509.load_pem_x509_certificate(row["cert_pem"].encode()),
        csr.sha256 if isinstance(csr, DecodedCsr) else None,
        now,
    )
    if row["status"] != "active":
        raise AuthenticationFailed(f"certificate {serial} is {row['status']}: it cannot be renewed")
    if row["not_after"] <= now:
        raise AuthenticationFailed(
            f"certificate {serial} has expired: bootstrap again with a join token"
        )
    if row["cert_entry_id"] is None:  # minted by an admin: no entry says what it may renew to
        raise PermissionDenied(
            f"certificate {serial} has no registration entry (it was minted, not requested with"
            " a join token): minted SVIDs are not renewable, mint a new one"
        )
    if row["entry_id"] is None:
        raise PermissionDenied(
            "the certificate's registration entry was deleted: renewal is refused"
        )
    grant = _entry_grant(row, requested_by=f"renewal:{serial}")
    # Authenticated and allowed: now the CSR is judged (400), and kept for issuing.
    if isinstance(csr, InvalidCsr):
        raise csr
    return dataclasses.replace(
        grant,
        renewal_nonce=(claims.jti, claims.expires_at),
        renews_serial=serial.hex,
        checked_csr=None if csr is None or csr_pem is None else (csr_pem, svid_csr(csr)),
    )


def admin_grant(
    ctx: Context, spiffe_id: SpiffeId, actor: str, max_ttl: Ttl = DEFAULT_MAX_TTL
) -> Grant:
    issuer = active_issuer(ctx, MESH)
    if not spiffe_id.member_of(issuer.spiffe_trust_domain()) or spiffe_id.is_trust_domain_id:
        raise PolicyViolation(
            f"{spiffe_id} is not a workload ID in trust domain {issuer.spiffe_trust_domain()}"
        )
    check_not_reserved(spiffe_id)
    return Grant(
        spiffe_id=spiffe_id,
        default_ttl=issuer.default_svid_ttl,
        max_ttl=max_ttl,
        requested_by=actor,
    )


def server_grant(ctx: Context, dns_names: Sequence[str], ips: Sequence[str], ttl: Ttl) -> Grant:
    """Trellis's own serving certificate: ``spiffe://<td>/trellis/server``."""
    issuer = active_issuer(ctx, MESH)
    return Grant(
        spiffe_id=SpiffeId.from_path(issuer.spiffe_trust_domain(), SERVER_PATH),
        default_ttl=ttl,
        max_ttl=ttl,
        requested_by="trellis:serve",
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ipaddress.ip_address(ip) for ip in ips),
        profile="server",
    )
