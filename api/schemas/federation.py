"""Wire models of SPIFFE federation, shared by ``api/routes/federation.py`` and
``cli/federation.py`` (pydantic and ``ca`` only, so the CLI need not import FastAPI)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, Field

from api.schemas import RequestBody, decided_by_ca
from api.schemas.wire import one_of
from ca import federation
from ca.identity import MAX_ID_BYTES, MAX_TRUST_DOMAIN_BYTES
from ca.pem import fingerprint

# ``federation.Profile.parse``: exactly these spellings.
ProfileName = Annotated[str, one_of(p.value for p in federation.Profile)]

__all__ = ["FederationCreate", "FederationOut"]


class FederationCreate(RequestBody):
    trust_domain: str = Field(
        json_schema_extra=decided_by_ca(maxLength=MAX_TRUST_DOMAIN_BYTES),
        examples=["partner.org"],
    )
    url: str = Field(
        json_schema_extra=decided_by_ca(maxLength=federation.MAX_URL),
        examples=["https://bundle.partner.org/v1/bundle.jwks"],
    )
    profile: ProfileName = Field(examples=["https_spiffe"], description="https_web or https_spiffe")
    endpoint_spiffe_id: str | None = Field(
        default=None,
        json_schema_extra=decided_by_ca(maxLength=MAX_ID_BYTES),
        examples=["spiffe://partner.org/trellis/server"],
        description="https_spiffe: the SPIFFE ID the endpoint's X509-SVID must carry",
    )
    bootstrap_bundle: str | None = Field(
        default=None,
        max_length=60_000,
        description="https_spiffe: the partner's bundle (PEM or JWK Set) for the first fetch",
    )
    ca_pem: str | None = Field(
        default=None,
        max_length=60_000,
        description="https_web: PEM CA(s) to trust instead of the system store (private networks)",
    )


class FederationOut(BaseModel):
    trust_domain: str
    url: str
    profile: str
    endpoint_spiffe_id: str | None
    has_bundle: bool = Field(description="A good bundle has been fetched and is published")
    sequence: int | None = Field(description="spiffe_sequence of the last good bundle")
    refresh_hint: int | None
    authorities_sha256: list[str] = Field(description="Root certificates of the last good bundle")
    bundle_updated_at: dt.datetime | None
    last_success: dt.datetime | None
    last_attempt: dt.datetime | None
    last_error: str | None = Field(description="Why the last attempt failed (bundle kept)")
    next_refresh: dt.datetime
    created_at: dt.datetime

    @classmethod
    def of(cls, value: federation.Federation) -> FederationOut:
        return cls(
            trust_domain=str(value.trust_domain),
            url=value.url,
            profile=value.profile.value,
            endpoint_spiffe_id=str(value.endpoint_spiffe_id) if value.endpoint_spiffe_id else None,
            has_bundle=value.has_bundle,
            sequence=value.sequence,
            refresh_hint=value.refresh_hint,
            authorities_sha256=[fingerprint(cert) for cert in value.authorities],
            bundle_updated_at=value.bundle_updated_at,
            last_success=value.last_success,
            last_attempt=value.last_attempt,
            last_error=value.last_error,
            next_refresh=value.next_refresh,
            created_at=value.created_at,
        )
