"""Wire models of the API gateway, shared by ``api/routes/gateway.py`` and ``cli/gateway.py``
(pydantic and ``ca`` only, so the CLI need not import FastAPI)."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from api.schemas import CRL_SKIPPED, RequestBody, decided_by_ca
from api.schemas.wire import (
    CONSUMER_NAME,
    DurationOrEmpty,
    KeyBackendOrEmpty,
    one_of,
    string_schema,
)
from ca import gateway
from ca.durations import Ttl
from ca.keys import KeyType
from ca.pem import fingerprint
from ca.text import MAX_FREE_TEXT

__all__ = [
    "CertIssueRequest",
    "ConsumerCreate",
    "ConsumerOut",
    "GatewayCertOut",
    "GatewayInit",
    "GatewayOut",
    "GatewayRevokedOut",
    "Pkcs12Options",
    "TruststoreOut",
    "init_params",
]

# ``GatewayParams`` and ``CertRequest`` refuse Ed25519 (gateways, Java and Windows key stores
# cannot use it); "" is the default, as in ``init_params``.
KeyTypeOrEmpty = Annotated[
    str, one_of((k.value for k in KeyType if k is not KeyType.ED25519), empty=True)
]
ConsumerNameText = Annotated[str, string_schema(pattern=CONSUMER_NAME)]


class GatewayInit(RequestBody):
    key_type: KeyTypeOrEmpty | None = Field(
        default=None, examples=["ec-p256"], description="Intermediate"
    )
    root_key_type: KeyTypeOrEmpty | None = Field(default=None, examples=["ec-p384"])
    key_backend: KeyBackendOrEmpty | None = Field(
        default=None, examples=["file"], description="file or vault"
    )
    ca_ttl: DurationOrEmpty | None = Field(
        default=None, examples=["3y"], description="Intermediate lifetime"
    )
    default_ttl: DurationOrEmpty | None = Field(default=None, examples=["90d"])
    max_ttl: DurationOrEmpty | None = Field(default=None, examples=["398d"])


class GatewayOut(BaseModel):
    authority: str
    default_ttl: str
    max_ttl: str
    root_serial: str
    root_fingerprint_sha256: str
    root_not_after: dt.datetime
    intermediate_serial: str
    intermediate_not_after: dt.datetime

    @classmethod
    def of(cls, state: gateway.GatewayStatus) -> GatewayOut:
        return cls(
            authority=gateway.GATEWAY,
            default_ttl=str(state.policy.default_ttl),
            max_ttl=str(state.policy.max_ttl),
            root_serial=format(state.root.serial_number, "x"),
            root_fingerprint_sha256=fingerprint(state.root),
            root_not_after=state.root.not_valid_after_utc,
            intermediate_serial=format(state.intermediate.serial_number, "x"),
            intermediate_not_after=state.intermediate.not_valid_after_utc,
        )


class ConsumerCreate(RequestBody):
    name: ConsumerNameText = Field(
        json_schema_extra=decided_by_ca(maxLength=64), examples=["acme-payments"]
    )
    contact: str = Field(
        default="",
        json_schema_extra=decided_by_ca(maxLength=MAX_FREE_TEXT),
        examples=["api-team@acme.example"],
        description="Printable: no control or format characters",
    )


class ConsumerOut(BaseModel):
    name: str
    contact: str
    enabled: bool
    created_at: dt.datetime
    disabled_at: dt.datetime | None
    live_certificates: int = Field(description="Active, unexpired certificates (at most 2)")

    @classmethod
    def of(cls, consumer: gateway.Consumer) -> ConsumerOut:
        return cls(
            name=consumer.name.value,
            contact=consumer.contact,
            enabled=consumer.enabled,
            created_at=consumer.created_at,
            disabled_at=consumer.disabled_at,
            live_certificates=consumer.live_certificates,
        )


class Pkcs12Options(RequestBody):
    password: str = Field(
        json_schema_extra=decided_by_ca(
            minLength=gateway.MIN_P12_PASSWORD, maxLength=gateway.MAX_P12_PASSWORD
        )
    )
    legacy: StrictBool = Field(
        default=False,
        description="pbeWithSHA1And3-KeyTripleDES-CBC for old Java/Windows stores, instead of "
        "AES-256-CBC with PBKDF2-HMAC-SHA256",
    )
    key_type: KeyTypeOrEmpty | None = Field(
        default=None, examples=["ec-p256"], description="Default ec-p256; rsa-2048 when legacy"
    )


class CertIssueRequest(RequestBody):
    """Exactly one of ``csr`` (preferred: the key never leaves the partner) or ``pkcs12``."""

    csr: str | None = Field(default=None, max_length=60_000, description="PEM PKCS#10")
    pkcs12: Pkcs12Options | None = Field(
        default=None, description="Generate the key here and return it once, encrypted"
    )
    ttl: DurationOrEmpty | None = Field(
        default=None, examples=["90d"], description="At most the max TTL"
    )


class GatewayCertOut(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    serial: str = Field(description="Lower-case hex")
    consumer: str
    status: str
    delivery: str | None = Field(description="csr, pkcs12 or pkcs12-legacy")
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    x5t_s256: str = Field(
        serialization_alias="x5t#S256",
        description="RFC 8705 thumbprint: put it in access tokens as cnf.x5t#S256",
    )
    requested_by: str
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    certificate: str = Field(description="The leaf, PEM")
    chain: str | None = Field(default=None, description="Issuing intermediate, PEM (on issue)")
    pkcs12: str | None = Field(
        default=None, description="Base64 PKCS#12 (key, leaf, chain): returned once, never stored"
    )
    clamped: bool = Field(
        default=False, description="Shorter than requested: the issuing CA expires first"
    )

    @classmethod
    def of(cls, cert: gateway.GatewayCertificate) -> GatewayCertOut:
        info = cert.info
        return cls(
            serial=info.serial.hex,
            consumer=cert.consumer.value,
            status=info.status.value,
            delivery=cert.delivery.value if cert.delivery else None,
            not_before=info.not_before,
            not_after=info.not_after,
            fingerprint_sha256=info.fingerprint_sha256,
            x5t_s256=cert.x5t_s256,
            requested_by=info.requested_by,
            revoked_at=info.revoked_at,
            revocation_reason=info.revocation_reason.value if info.revocation_reason else None,
            certificate=info.certificate_pem,
        )

    @classmethod
    def issued(
        cls, issued: gateway.IssuedGatewayCertificate, *, with_pkcs12: bool
    ) -> GatewayCertOut:
        out = cls.of(issued.record)
        out.chain = issued.chain_pem.decode()
        out.clamped = issued.clamped
        if with_pkcs12 and issued.pkcs12 is not None:
            out.pkcs12 = base64.b64encode(issued.pkcs12).decode()
        return out


class GatewayRevokedOut(GatewayCertOut):
    rewritten: list[str] = Field(
        default_factory=list,
        description="Truststore files rewritten on the server's node: reload those gateways",
    )
    crl_skipped: str | None = Field(default=None, description=CRL_SKIPPED)

    @classmethod
    def revoked(cls, cert: gateway.GatewayCertificate, written: list[Path]) -> GatewayRevokedOut:
        return cls(
            **GatewayCertOut.of(cert).model_dump(by_alias=False),
            rewritten=[str(path) for path in written],
            crl_skipped=cert.info.crl_skipped,
        )


class TruststoreOut(BaseModel):
    format: str
    files: dict[str, str] = Field(description="File name → content (PEM, or README text)")


def init_params(body: GatewayInit) -> gateway.GatewayParams:
    """Shared with the CLI: unset fields keep ``GatewayParams``' defaults."""
    key_type = KeyType.parse(body.key_type) if body.key_type else KeyType.EC_P256
    # like `trellis init`: an RSA intermediate gets an RSA root unless told otherwise
    root_default = KeyType.EC_P384 if key_type is KeyType.EC_P256 else key_type
    return gateway.GatewayParams(
        key_type=key_type,
        root_key_type=KeyType.parse(body.root_key_type) if body.root_key_type else root_default,
        key_backend=body.key_backend,
        ca_ttl=Ttl.parse(body.ca_ttl) if body.ca_ttl else gateway.DEFAULT_CA_TTL,
        default_ttl=Ttl.parse(body.default_ttl) if body.default_ttl else gateway.DEFAULT_TTL,
        max_ttl=Ttl.parse(body.max_ttl) if body.max_ttl else gateway.DEFAULT_MAX_TTL,
    )
