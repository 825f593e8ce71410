"""Wire models: strings at the edge, turned into ``ca`` value types by the routes.

The CLI renders the same models for ``--json``, so this package imports only pydantic and ``ca``,
never FastAPI (``tests/cli/test_startup.py``); the federation, gateway and OpenVPN models are in
modules of their own here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from api.schemas.wire import DurationOrEmpty, ReasonName
from ca.identity import MAX_ID_BYTES
from ca.text import MAX_FREE_TEXT

if TYPE_CHECKING:  # only the ``of`` constructors name them: a command imports what it uses
    from ca.certs import CertificateInfo
    from ca.emergency import IntermediateRevoked
    from ca.entries import Entry
    from ca.root_rotation import RootRotation
    from ca.rotation import AuthorityStatus
    from ca.scheduler import JobStatus
    from ca.tokens import TokenInfo


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(_holds_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return False  # numbers, booleans, times; a nested RequestBody has checked its own fields


def decided_by_ca(**bounds: int) -> dict[str, int]:
    """JSON Schema bounds (``maxLength``, ``maxItems``, ``maximum``) for ``/openapi.json`` that
    pydantic does not enforce: ``ca`` checks the same bound where it parses the value, so a
    caller over it gets ``ca``'s reason, the one the CLI gives for the same input, instead of
    pydantic's "String should have at most 2048 characters". The body limit (``api.limits``,
    64 KiB) bounds what reaches ``ca``. Pass as ``Field(json_schema_extra=...)``."""
    return bounds


class RequestBody(BaseModel):
    """What every request body is: unknown fields are refused (a misspelt field is a mistake,
    not a wish to ignore), and so is U+0000 in any string, here once for every body rather
    than field by field. PostgreSQL's text cannot hold NUL (the write failed with a 500) while
    SQLite stored it; no Trellis value has a use for it, and the C programs that read values
    back (openssl, nginx, OpenVPN) would stop at it. ``api.deps.well_formed_url`` is the same
    rule for paths and query strings."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        if _holds_nul(value):
            raise PydanticCustomError("nul_character", "must not contain NUL (U+0000)")
        return value


class SvidRequest(RequestBody):
    csr: str = Field(
        max_length=60_000, description="PEM PKCS#10 request signed by the workload key"
    )
    ttl: DurationOrEmpty | None = Field(
        default=None, examples=["1h"], description="At most the entry's max TTL"
    )


class SvidResponse(BaseModel):
    spiffe_id: str
    serial: str = Field(description="Lower-case hex")
    expires_at: dt.datetime
    certificate: str = Field(description="The leaf, PEM")
    chain: str = Field(description="Intermediates, issuing CA first, PEM")
    bundle: str = Field(description="Trust bundle (roots), PEM")


class EntryCreate(RequestBody):
    spiffe_id: str = Field(
        json_schema_extra=decided_by_ca(maxLength=MAX_ID_BYTES),
        examples=["spiffe://example.org/ns/default/sa/web"],
    )
    dns_names: list[str] = Field(
        default_factory=list,
        json_schema_extra=decided_by_ca(maxItems=32),  # ca.entries
    )
    ttl: DurationOrEmpty | None = Field(default=None, examples=["1h"])
    max_ttl: DurationOrEmpty | None = Field(default=None, examples=["24h"])


class EntryOut(BaseModel):
    id: str
    spiffe_id: str
    dns_names: list[str]
    ttl: str
    max_ttl: str
    created_at: dt.datetime
    enabled: bool = True
    disabled_at: dt.datetime | None = None

    @classmethod
    def of(cls, entry: Entry) -> EntryOut:
        return cls(
            id=entry.id,
            spiffe_id=str(entry.spiffe_id),
            dns_names=list(entry.dns_names),
            ttl=str(entry.ttl),
            max_ttl=str(entry.max_ttl),
            created_at=entry.created_at,
            enabled=entry.enabled,
            disabled_at=entry.disabled_at,
        )


# ``api.routes.tokens.create_token``: a join token names its entry, an admin token says admin
# and takes no ``uses``. Only the schema says so; the route refuses the rest with its message.
_ONE_KIND_OF_TOKEN = {
    "oneOf": [
        {
            "title": "Join token",
            "required": ["entry_id"],
            "properties": {"entry_id": {"type": "string"}, "admin": {"const": False}},
        },
        {
            "title": "Admin token",
            "required": ["admin"],
            "properties": {"admin": {"const": True}, "entry_id": {"type": "null"}, "uses": False},
        },
    ]
}


class TokenCreate(RequestBody):
    model_config = ConfigDict(json_schema_extra=_ONE_KIND_OF_TOKEN)

    entry_id: str | None = Field(default=None, description="Join token for this entry")
    # Strict: "admin": "yes" or 1 is a mistake to refuse, not a wish to grant.
    admin: StrictBool = Field(default=False, description="Create an admin token instead")
    uses: StrictInt = Field(
        default=1,
        json_schema_extra=decided_by_ca(minimum=1, maximum=1000),  # ca.tokens
    )
    ttl: DurationOrEmpty | None = Field(default=None, examples=["1h"])
    description: str = Field(
        default="",
        json_schema_extra=decided_by_ca(maxLength=MAX_FREE_TEXT),
        description="Printable: no control or format characters",
    )


class TokenOut(BaseModel):
    id: str
    kind: str
    entry_id: str | None
    uses_remaining: int | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    created_at: dt.datetime
    description: str

    @classmethod
    def of(cls, info: TokenInfo) -> TokenOut:
        return cls(
            id=info.id,
            kind=info.kind.value,
            entry_id=info.entry_id,
            uses_remaining=info.uses_remaining,
            expires_at=info.expires_at,
            revoked_at=info.revoked_at,
            created_at=info.created_at,
            description=info.description,
        )


class TokenCreated(TokenOut):
    token: str = Field(description="The secret: shown once, stored only as a hash")


class CertificateOut(BaseModel):
    serial: str
    spiffe_id: str
    status: str
    profile: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    requested_by: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    revoked_by: str | None
    revocation_request_id: str | None = None
    invalidity_date: dt.datetime | None = None
    certificate: str | None = Field(
        default=None, description="PEM; only on single-certificate reads"
    )

    @classmethod
    def of(cls, info: CertificateInfo, *, with_pem: bool = False) -> CertificateOut:
        return cls(
            serial=info.serial.hex,
            spiffe_id=info.identity,
            status=info.status.value,
            profile=info.profile,
            not_before=info.not_before,
            not_after=info.not_after,
            fingerprint_sha256=info.fingerprint_sha256,
            requested_by=info.requested_by,
            created_at=info.created_at,
            revoked_at=info.revoked_at,
            revocation_reason=info.revocation_reason.value if info.revocation_reason else None,
            revoked_by=info.revoked_by,
            revocation_request_id=info.revocation_request_id,
            invalidity_date=info.invalidity_date,
            certificate=info.certificate_pem if with_pem else None,
        )


# Every revocation answer's ``crl_skipped`` (certificates, OpenVPN clients, gateway consumers).
CRL_SKIPPED = (
    "Why the issuer's CRL was not re-signed to list this certificate (the issuer is a revoked "
    "CA whose key is gone: the root's CRL lists the issuer); null when it was"
)


class RevokedCertificateOut(CertificateOut):
    """The answer to a revocation: the certificate, and whether its issuer's CRL lists it."""

    crl_skipped: str | None = Field(default=None, description=CRL_SKIPPED)

    @classmethod
    def of(cls, info: CertificateInfo, *, with_pem: bool = False) -> RevokedCertificateOut:
        base = CertificateOut.of(info, with_pem=with_pem).model_dump()
        return cls(**base, crl_skipped=info.crl_skipped)


class CertificatePage(BaseModel):
    items: list[CertificateOut]
    next_after: str | None = Field(description="Pass as ?after= for the next page; null at the end")


class RevokeRequest(RequestBody):
    reason: ReasonName = Field(default="unspecified", examples=["keyCompromise"])
    invalidity_date: dt.datetime | None = Field(
        default=None,
        description="When the key is known or suspected to have been compromised (with a zone)",
    )

    @field_validator("invalidity_date")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give a time zone, e.g. 2026-01-01T12:00:00Z")
        return value


class Health(BaseModel):
    status: str
    detail: dict[str, str] = Field(default_factory=dict)


class IntermediateRevokeRequest(RequestBody):
    reason: ReasonName = Field(default="cACompromise", examples=["keyCompromise"])


class RotateRequest(RequestBody):
    force: StrictBool = Field(default=False, description="Perform the next transition now")


class IdentityRevokeRequest(RequestBody):
    spiffe_id: str = Field(json_schema_extra=decided_by_ca(maxLength=MAX_ID_BYTES))
    reason: ReasonName = Field(default="unspecified", examples=["keyCompromise"])


class IntermediateRevokedOut(BaseModel):
    revoked_serial: str
    new_serial: str
    to_reissue: list[CertificateOut] = Field(
        description="Live certificates issued by the revoked intermediate: re-issue them"
    )
    final_crl_skipped: str | None = Field(
        default=None,
        description="Why the revoked intermediate's own final CRL was not signed (its key is "
        "missing or unusable); null when it was",
    )
    publish_error: str | None = Field(
        default=None,
        description="Why a CRL file or truststore Trellis keeps (OpenVPN's crl-verify, a "
        "gateway's nginx files) was not rewritten at once: the revocation stands and the "
        "scheduled jobs retry; null when every one was",
    )
    also_revoked: list[str] = Field(
        default_factory=list,
        description="Intermediates keyed before the emergency and revoked with it: a successor "
        "prepared for the next rotation (its key destroyed), or one a rotation activated while "
        "the request waited",
    )

    @classmethod
    def of(cls, result: IntermediateRevoked) -> IntermediateRevokedOut:
        return cls(
            revoked_serial=result.revoked_serial.hex,
            new_serial=result.new_serial.hex,
            to_reissue=[CertificateOut.of(info) for info in result.to_reissue],
            final_crl_skipped=result.final_crl_skipped,
            publish_error=result.publish_error,
            also_revoked=[serial.hex for serial in result.also_revoked],
        )


class CaStatusOut(BaseModel):
    serial: str
    role: str = Field(description="root, intermediate or cross (a cross-signed root)")
    state: str = Field(description="prepared, active, retiring, retired or revoked")
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    key_backend: str
    next_transition: str | None
    next_at: dt.datetime | None


class AuthorityStatusOut(BaseModel):
    name: str
    trust_domain: str
    bundle_sequence: int
    root_rotation: str | None
    root_switch_after: dt.datetime | None
    cas: list[CaStatusOut]

    @classmethod
    def of(cls, status: AuthorityStatus) -> AuthorityStatusOut:
        return cls(
            name=status.name,
            trust_domain=status.trust_domain,
            bundle_sequence=status.bundle_sequence,
            root_rotation=status.root_rotation,
            root_switch_after=status.root_switch_after,
            cas=[CaStatusOut(**dataclasses.asdict(ca)) for ca in status.cas],
        )


class TransitionOut(BaseModel):
    event: str
    serial: str
    at: dt.datetime


class RootRotationOut(BaseModel):
    step: str
    old_root: str
    new_root: str
    switch_after: dt.datetime
    done: list[TransitionOut]

    @classmethod
    def of(cls, result: RootRotation) -> RootRotationOut:
        return cls(
            step=result.step,
            old_root=result.old_root,
            new_root=result.new_root,
            switch_after=result.switch_after,
            done=[TransitionOut(event=t.event, serial=t.serial, at=t.at) for t in result.done],
        )


class JobOut(BaseModel):
    name: str
    description: str
    every_seconds: int
    scope: str = Field(
        description="cluster: one record, the last run on any node; node or replica: one"
        " record per node (the node it ran on is 'node')"
    )
    last_started: dt.datetime | None
    last_finished: dt.datetime | None
    last_ok: bool | None
    last_result: str
    consecutive_failures: int
    runs: int
    next_run: dt.datetime | None
    node: str

    @classmethod
    def of(cls, status: JobStatus) -> JobOut:
        fields = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
        return cls(**fields | {"scope": status.scope.value})
