"""API-gateway client certificates: partners ("consumers") authenticate to nginx, AWS API Gateway
or Kong with a certificate from Trellis's ``gateway`` authority.

    consumer rules (exists, enabled, fewer than two live certificates, TTL within policy)
      → key: the public key of the partner's verified CSR, or a fresh key returned once as PKCS#12
      → ``ca.tlsleaf.issue_tls_leaf`` (clientAuth only, CN = consumer, URN SAN; sign, self-check,
        record)
      → overlap re-check after the record is committed (see ``_settle``)

The gateway authority is its own hierarchy (no SAN, no trust domain): nothing it issues chains to
the mesh bundle and no SVID chains to it, so a mesh workload cannot call a partner API and a
partner cannot pass as a workload. Truststores for each gateway are rendered here; nginx's carries
a CRL for every CA in the path because ``ssl_crl`` turns on OpenSSL's CRL_CHECK_ALL.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlmodel import Session, col, select

from ca import audit
from ca.authority import (
    GATEWAY,
    AuthorityExists,
    AuthorityParams,
    active_issuer,
    check_purpose,
    init_authority,
)
from ca.bundle import trust_anchors
from ca.certs import (
    CertificateInfo,
    certificate_info,
    revoke_certificate,
    withdrawn_unless_delivered,
)
from ca.config import Context
from ca.crl import current_crl
from ca.csr import load_verified_csr
from ca.durations import Ttl
from ca.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    NotInitialised,
    PermissionDenied,
    PolicyViolation,
    Unavailable,
)
from ca.files import stored_path, write_atomic
from ca.issue import counted
from ca.keepers import check_free, truststore_footprint, truststore_keeper
from ca.keys import KeyType, PrivateKey, PublicKey
from ca.paging import Page, check_limit, page
from ca.pem import certs_pem
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store import locks
from ca.store.models import AuthorityRow, CaRow, CertificateRow, UtcDateTime
from ca.store.models_gateway import (
    GatewayCertificateRow,
    GatewayConfigRow,
    GatewayConsumerRow,
    GatewayTruststoreRow,
)
from ca.text import free_text
from ca.tlsleaf import TlsLeafRequest, Usage, issue_tls_leaf

__all__ = [
    "GATEWAY",
    "MAX_P12_PASSWORD",
    "MIN_P12_PASSWORD",
    "WITHDRAWN_BY",
    "CertRequest",
    "Consumer",
    "ConsumerName",
    "Delivery",
    "GatewayCertificate",
    "GatewayParams",
    "GatewayPolicy",
    "GatewayStatus",
    "IssuedGatewayCertificate",
    "NginxSnippet",
    "RecordedTruststore",
    "Truststore",
    "TruststoreFormat",
    "add_consumer",
    "build_truststore",
    "check_pkcs12_password",
    "csr_public_key",
    "disable_consumer",
    "gateway_certificate_page",
    "gateway_policy",
    "gateway_status",
    "get_consumer",
    "init_gateway",
    "issue_certificate",
    "list_consumers",
    "list_gateway_certificates",
    "nginx_snippet",
    "password_file",
    "refresh_job",
    "refresh_truststores",
    "remove_truststore",
    "revoke_gateway_certificate",
    "show_certificate",
    "write_truststore",
    "x5t_s256",
]

log = logging.getLogger("trellis.gateway")

PROFILE = "gateway-client"
URN_PREFIX = "urn:trellis:gateway:consumer:"
MAX_LIVE = 2  # the current certificate and its successor, during a renewal overlap
WITHDRAWN_BY = "gateway:withdrawn"  # who revoked a certificate never handed over
DEFAULT_TTL = Ttl(90 * 86400)
DEFAULT_MAX_TTL = Ttl(398 * 86400)  # the CA/Browser Forum limit for public TLS certificates
DEFAULT_CA_TTL = Ttl(3 * 365 * 86400)
MIN_P12_PASSWORD, MAX_P12_PASSWORD = 8, 1024  # characters, not bytes: 'éééé' is four
# 600 000: OWASP's figure for PBKDF2-HMAC-SHA256; 2048: OpenSSL's own PKCS#12 default.
P12_ROUNDS, LEGACY_P12_ROUNDS = 600_000, 2048
VERIFY_DEPTH = 2  # leaf → intermediate → root


# ----------------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True, order=True)
class ConsumerName:
    """A partner's name: the certificate CN and Kong consumer username, so DNS-label-like."""

    value: str
    _PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

    def __post_init__(self) -> None:
        if not self._PATTERN.fullmatch(self.value):  # not match(): '$' accepts a final \n
            raise InvalidInput(
                f"invalid consumer name {self.value[:70]!r}: lower-case letters, digits, '.', '_' "
                "and '-', starting with a letter or digit, at most 64 characters"
            )

    @property
    def identity(self) -> str:
        """What the ``certificate`` table records (``ca.tlsleaf.TlsLeafRequest.identity``)."""
        return f"CN={self.value}"

    @property
    def urn(self) -> str:
        return URN_PREFIX + self.value

    def __str__(self) -> str:
        return self.value


class Delivery(enum.Enum):
    CSR = "csr"  # preferred: the private key never leaves the partner
    PKCS12 = "pkcs12"  # AES-256-CBC, PBKDF2-HMAC-SHA256, HMAC-SHA256 MAC
    PKCS12_LEGACY = "pkcs12-legacy"  # pbeWithSHA1And3-KeyTripleDES-CBC, SHA-1 MAC


class TruststoreFormat(enum.Enum):
    PEM = "pem"  # one file: intermediates, then roots
    AWS = "aws"  # one file: every chain up to its root (API Gateway checks no revocation)
    NGINX = "nginx"  # a directory: client-ca.pem and crl.pem (a CRL for every CA)
    KONG = "kong"  # a directory: one PEM per CA certificate entity, and README.txt

    @classmethod
    def parse(cls, text: str) -> TruststoreFormat:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidInput("truststore format is one of pem, nginx, aws, kong") from None

    @property
    def is_directory(self) -> bool:
        return self in (TruststoreFormat.NGINX, TruststoreFormat.KONG)


def x5t_s256(cert: x509.Certificate) -> str:
    """RFC 8705 §3.1: base64url of the SHA-256 of the DER certificate, without padding."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# ----------------------------------------------------------------------------- the authority


@dataclass(frozen=True, slots=True)
class GatewayParams:
    key_type: KeyType = KeyType.EC_P256
    root_key_type: KeyType = KeyType.EC_P384
    key_backend: str | None = None
    ca_ttl: Ttl = DEFAULT_CA_TTL
    default_ttl: Ttl = DEFAULT_TTL
    max_ttl: Ttl = DEFAULT_MAX_TTL

    def __post_init__(self) -> None:
        # AWS API Gateway truststores take RSA >= 2048 or ECDSA >= 256 only; many partner TLS
        # stacks cannot verify an Ed25519 CA signature either.
        if KeyType.ED25519 in (self.key_type, self.root_key_type):
            raise InvalidInput(
                "gateway CAs use EC or RSA keys: Ed25519 is not accepted by gateways"
            )
        if self.default_ttl > self.max_ttl:
            raise InvalidInput(f"default TTL {self.default_ttl} exceeds the max {self.max_ttl}")
        if self.max_ttl >= self.ca_ttl:
            raise InvalidInput(f"max TTL {self.max_ttl} must be shorter than the CA TTL")


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    default_ttl: Ttl
    max_ttl: Ttl


def init_gateway(ctx: Context, params: GatewayParams, *, actor: str = "cli") -> GatewayStatus:
    """Create the gateway root and intermediate, then record the issuance policy. Re-running after
    a crash between the two steps completes the second one. ``actor`` (``cli`` or
    ``admin-token:<id>``) is recorded on the CAs and on ``gateway.initialised``."""
    with Session(ctx.engine) as session:
        found = session.get(AuthorityRow, GATEWAY)
        # Only the gateway's own half-made init is completed: an OpenVPN authority an older
        # Trellis let be called 'gateway' was taken for one, and its CA signed partners' certs.
        check_purpose(found, "gateway")
        if session.get(GatewayConfigRow, GATEWAY) is not None:
            raise Conflict("the gateway authority exists already")
    exists = found is not None
    if not exists:
        try:
            init_authority(
                ctx,
                AuthorityParams(
                    None,
                    name=GATEWAY,
                    purpose="gateway",
                    key_type=params.key_type,
                    root_key_type=params.root_key_type,
                    key_backend=params.key_backend,
                    ca_ttl=params.ca_ttl,
                    actor=actor,
                ),
            )
        except AuthorityExists:  # a concurrent init made it (it records the policy next)
            raise Conflict("the gateway authority exists already") from None
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        session.add(
            GatewayConfigRow(
                authority=GATEWAY,
                default_ttl_seconds=params.default_ttl.seconds,
                max_ttl_seconds=params.max_ttl.seconds,
                created_at=now,
            )
        )
        detail = {"default_ttl": str(params.default_ttl), "max_ttl": str(params.max_ttl)}
        audit.record(session, "gateway.initialised", GATEWAY, actor=actor, at=now, detail=detail)
        try:
            session.commit()
        except sa.exc.IntegrityError:  # a concurrent init won
            raise Conflict("the gateway authority exists already") from None
    return gateway_status(ctx)


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    policy: GatewayPolicy
    root: x509.Certificate
    intermediate: x509.Certificate  # the one issuing now


def gateway_status(ctx: Context) -> GatewayStatus:
    policy = gateway_policy(ctx)
    issuer = active_issuer(ctx, GATEWAY)
    return GatewayStatus(policy, _parent(issuer.certificate, issuer.roots), issuer.certificate)


def _parent(cert: x509.Certificate, roots: Sequence[x509.Certificate]) -> x509.Certificate:
    """The root that signed ``cert`` (during a root rotation two roots share one name)."""
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root
    raise NotInitialised("the gateway intermediate chains to no trusted root")


def gateway_policy(ctx: Context) -> GatewayPolicy:
    with Session(ctx.engine) as session:
        row = session.get(GatewayConfigRow, GATEWAY)
        authority = session.get(AuthorityRow, GATEWAY)
    if row is None:
        raise NotInitialised("no gateway authority: run 'trellis gateway init' first")
    check_purpose(authority, "gateway")  # a database where that init took a VPN's CA
    return GatewayPolicy(Ttl(row.default_ttl_seconds), Ttl(row.max_ttl_seconds))


# ----------------------------------------------------------------------------- consumers


@dataclass(frozen=True, slots=True)
class Consumer:
    name: ConsumerName
    contact: str
    created_at: dt.datetime
    disabled_at: dt.datetime | None
    live_certificates: int

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None


def _live_count(session: Session, name: ConsumerName, now: dt.datetime) -> int:
    """Settled (see ``_settle``), active and unexpired certificates of the consumer."""
    query = (
        sa.select(sa.func.count())
        .select_from(GatewayCertificateRow)
        .join(CertificateRow, col(CertificateRow.serial) == col(GatewayCertificateRow.serial))
        .where(
            col(GatewayCertificateRow.consumer) == name.value,
            col(CertificateRow.status) == "active",
            col(CertificateRow.not_after) > now,
        )
    )
    return int(session.execute(query).scalar_one())


def _consumer(session: Session, row: GatewayConsumerRow, now: dt.datetime) -> Consumer:
    name = ConsumerName(row.name)
    return Consumer(
        name, row.contact, row.created_at, row.disabled_at, _live_count(session, name, now)
    )


def _consumer_row(session: Session, name: ConsumerName) -> GatewayConsumerRow:
    row = session.get(GatewayConsumerRow, name.value)
    if row is None:
        raise NotFound(f"no gateway consumer {name}")
    return row


def add_consumer(
    ctx: Context, name: ConsumerName, contact: str = "", *, actor: str = "local"
) -> Consumer:
    contact = free_text(contact, "a contact")
    gateway_policy(ctx)  # NotInitialised before 'gateway init', as issuing and truststores are
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        session.add(GatewayConsumerRow(name=name.value, contact=contact, created_at=now))
        audit.record(session, "gateway.consumer-added", name.value, actor=actor, at=now)
        try:
            session.commit()
        except sa.exc.IntegrityError:
            raise Conflict(f"gateway consumer {name} exists already") from None
        return _consumer(session, _consumer_row(session, name), now)


def list_consumers(ctx: Context) -> list[Consumer]:
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        rows = session.exec(select(GatewayConsumerRow).order_by(GatewayConsumerRow.name)).all()
        return [_consumer(session, row, now) for row in rows]


def get_consumer(ctx: Context, name: ConsumerName) -> Consumer:
    with Session(ctx.engine) as session:
        return _consumer(session, _consumer_row(session, name), ctx.clock.now())


def disable_consumer(ctx: Context, name: ConsumerName, *, actor: str = "local") -> Consumer:
    """No new certificates from now on (idempotent). Live ones stay valid until revoked: offboard
    with ``revoke_gateway_certificate`` for each (``Consumer.live_certificates`` says how many)."""
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        row = _consumer_row(session, name)
        if row.disabled_at is None:
            row.disabled_at = now
            session.add(row)
            audit.record(session, "gateway.consumer-disabled", name.value, actor=actor, at=now)
            session.commit()
        return _consumer(session, row, now)


# ----------------------------------------------------------------------------- issuance


@dataclass(frozen=True, slots=True)
class GatewayCertificate:
    info: CertificateInfo
    consumer: ConsumerName
    delivery: Delivery | None  # None: recorded before its delivery was (a crash in between)
    x5t_s256: str


def check_pkcs12_password(password: bytes) -> bytes:
    """A PKCS#12 password as REST and the CLI both take it: UTF-8 text of 8 to 1024 characters
    (counted as REST's JSON string is, not in bytes), without NUL, which OpenSSL's ``-passin``
    and cryptography's loader (a panic) cannot take: a file they cannot open is a key lost."""
    try:
        text = password.decode()
    except UnicodeDecodeError:
        raise InvalidInput("a PKCS#12 password is UTF-8 text") from None
    if "\x00" in text:
        raise InvalidInput("a PKCS#12 password must not contain NUL (U+0000)")
    if not MIN_P12_PASSWORD <= len(text) <= MAX_P12_PASSWORD:
        raise InvalidInput(
            f"a PKCS#12 password has {MIN_P12_PASSWORD} to {MAX_P12_PASSWORD} characters"
        )
    return password


def password_file(data: bytes) -> bytes:
    """The password a password file holds, read as ``openssl pkcs12 -passin file:`` reads it
    (docs/gateway.md checks the file with that): one line, its ``\\n`` not part of it. A file
    of more lines is refused, not cut to its first: whoever wrote a second line meant it to
    count. So is a carriage return, which OpenSSL would keep in the password (a file saved with
    CRLF line ends), and whatever ``check_pkcs12_password`` refuses."""
    password = data.removesuffix(b"\n")
    if b"\n" in password or b"\r" in password:
        raise InvalidInput(
            "the password file holds more than one line, or a carriage return (CRLF line ends):"
            " OpenSSL's '-passin file:' reads the first line, up to its LF, as the password"
        )
    return check_pkcs12_password(password)


@dataclass(frozen=True, slots=True)
class CertRequest:
    """Exactly one of ``csr_pem`` (the partner keeps its key) or ``pkcs12_password`` (Trellis makes
    a key and returns it once, encrypted, never storing it)."""

    consumer: ConsumerName
    requested_by: str
    csr_pem: bytes | None = None
    pkcs12_password: bytes | None = field(default=None, repr=False)
    legacy_pkcs12: bool = False
    key_type: KeyType | None = None  # of a generated key: EC P-256, or RSA-2048 for legacy stores
    ttl: Ttl | None = None

    def __post_init__(self) -> None:
        if self.csr_pem is None and self.pkcs12_password is None:
            raise InvalidInput("give a CSR or a PKCS#12 password")
        if self.csr_pem is not None and self.pkcs12_password is not None:
            raise InvalidInput("give either a CSR or a PKCS#12 password, not both")
        if self.csr_pem is not None and (self.legacy_pkcs12 or self.key_type is not None):
            raise InvalidInput(
                "a CSR brings its own key: key type and PKCS#12 options do not apply"
            )
        if self.pkcs12_password is not None:
            check_pkcs12_password(self.pkcs12_password)
        if self.key_type is KeyType.ED25519:  # Java and Windows key stores cannot hold one
            raise InvalidInput("a generated key is EC or RSA (Ed25519 keys: send a CSR)")

    @property
    def delivery(self) -> Delivery:
        if self.csr_pem is not None:
            return Delivery.CSR
        return Delivery.PKCS12_LEGACY if self.legacy_pkcs12 else Delivery.PKCS12


@dataclass(frozen=True, slots=True)
class IssuedGatewayCertificate:
    record: GatewayCertificate  # as ``show_certificate`` reports it
    certificate: x509.Certificate
    chain_pem: bytes  # the issuing intermediate(s): what a client sends after its leaf
    requested_ttl: Ttl
    pkcs12: bytes | None = field(default=None, repr=False)  # returned once, never stored

    @property
    def serial(self) -> Serial:
        return Serial(self.certificate.serial_number)

    @property
    def certificate_pem(self) -> bytes:
        return certs_pem([self.certificate])

    @property
    def clamped(self) -> bool:
        """True when the issuing CA expires before the requested lifetime ends."""
        life = self.certificate.not_valid_after_utc - self.certificate.not_valid_before_utc
        return life < self.requested_ttl.delta


def csr_public_key(pem: bytes) -> PublicKey:
    """The key of a partner's CSR, after its signature proves possession. Unlike
    ``ca.csr.parse_csr`` (built for SVIDs: it refuses non-SPIFFE URI SANs and e-mail SANs, which
    partner CSRs often carry), every name and extension requested is ignored, not judged."""
    return load_verified_csr(pem)[1]


def _pkcs12(
    name: ConsumerName,
    key: PrivateKey,
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    password: bytes,
    legacy: bool,
) -> bytes:
    builder = serialization.PrivateFormat.PKCS12.encryption_builder()
    if legacy:  # what older Java and Windows certificate stores can read
        builder = (
            builder.kdf_rounds(LEGACY_P12_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())  # noqa: S303 (the legacy MAC; the point of --legacy-p12)
        )
    else:
        builder = (
            builder.kdf_rounds(P12_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
        )
    return pkcs12.serialize_key_and_certificates(
        name.value.encode(), key, cert, list(chain), builder.build(password)
    )


def _check_policy(ctx: Context, request: CertRequest) -> Ttl:
    """Cheap refusals before anything is signed."""
    policy = gateway_policy(ctx)
    ttl = request.ttl or policy.default_ttl
    if ttl > policy.max_ttl:
        raise PolicyViolation(f"TTL {ttl} exceeds the gateway maximum {policy.max_ttl}")
    with Session(ctx.engine) as session:
        consumer = _consumer(session, _consumer_row(session, request.consumer), ctx.clock.now())
    if not consumer.enabled:
        raise PermissionDenied(f"gateway consumer {consumer.name} is disabled")
    if consumer.live_certificates >= MAX_LIVE:
        raise Conflict(
            f"gateway consumer {consumer.name} already holds {MAX_LIVE} valid certificates: "
            "revoke one ('trellis gateway cert revoke SERIAL') before issuing another"
        )
    return ttl


def _settle(ctx: Context, request: CertRequest, cert: x509.Certificate) -> None:
    """Re-check the consumer rules for a just-recorded certificate and, if they hold, settle it
    (its ``gateway_certificate`` row is what makes it count and be handed out). Settlements of one
    consumer run one at a time under the consumer's lock, so two concurrent issuances that both
    passed ``_check_policy`` cannot make three live certificates: the one that loses answers 409
    and is revoked by ``issue_certificate`` (it was never handed out). Signing itself holds no
    lock."""
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        # A write first: a row lock on PostgreSQL, the database write lock on SQLite.
        session.execute(
            sa.update(GatewayConsumerRow)
            .where(col(GatewayConsumerRow.name) == request.consumer.value)
            .values(contact=GatewayConsumerRow.contact)
        )
        row = session.get(GatewayConsumerRow, request.consumer.value, populate_existing=True)
        problem: Exception | None = None
        if row is None or row.disabled_at is not None:
            problem = PermissionDenied(f"gateway consumer {request.consumer} is disabled")
        elif _live_count(session, request.consumer, now) >= MAX_LIVE:
            problem = Conflict(
                f"gateway consumer {request.consumer} already holds {MAX_LIVE} valid certificates"
            )
        else:
            session.add(
                GatewayCertificateRow(
                    serial=format(cert.serial_number, "x"),
                    consumer=request.consumer.value,
                    delivery=request.delivery.value,
                    x5t_s256=x5t_s256(cert),
                    created_at=now,
                )
            )
            session.commit()
            return
    raise problem  # the certificate is withdrawn by the caller (issue_certificate)


def issue_certificate(ctx: Context, request: CertRequest) -> IssuedGatewayCertificate:
    """The request is judged before the policy (a bad CSR is 400 whatever the consumer holds),
    and a key is generated only once the policy allows a certificate."""
    with counted(GATEWAY, PROFILE):
        return _certificate(ctx, request)


def _certificate(ctx: Context, request: CertRequest) -> IssuedGatewayCertificate:
    key: PrivateKey | None = None
    if request.csr_pem is not None:
        public_key = csr_public_key(request.csr_pem)
    ttl = _check_policy(ctx, request)
    if request.csr_pem is None:
        default = KeyType.RSA_2048 if request.legacy_pkcs12 else KeyType.EC_P256
        key = (request.key_type or default).generate()
        public_key = key.public_key()
    issued = issue_tls_leaf(
        ctx,
        TlsLeafRequest(
            authority=GATEWAY,
            profile=PROFILE,
            common_name=request.consumer.value,
            usage=Usage.CLIENT,
            public_key=public_key,
            ttl=ttl,
            requested_by=request.requested_by,
            uri_sans=(request.consumer.urn,),
        ),
    )
    serial = Serial(issued.certificate.serial_number)
    with withdrawn_unless_delivered(ctx, serial, WITHDRAWN_BY):
        _settle(ctx, request, issued.certificate)
        bundle: bytes | None = None
        if key is not None and request.pkcs12_password is not None:
            bundle = _pkcs12(
                request.consumer,
                key,
                issued.certificate,
                issued.issuer.chain,
                request.pkcs12_password,
                request.legacy_pkcs12,
            )
        record = show_certificate(ctx, serial)
    return IssuedGatewayCertificate(
        record, issued.certificate, issued.issuer.chain_pem, ttl, bundle
    )


# ----------------------------------------------------------------------------- inspection


def show_certificate(ctx: Context, serial: Serial) -> GatewayCertificate:
    with Session(ctx.engine) as session:
        row = session.get(CertificateRow, serial.hex)
        if row is None or row.authority != GATEWAY:
            raise NotFound(f"no gateway certificate with serial {serial}")
        extra = session.get(GatewayCertificateRow, serial.hex)
    return _gateway_certificate(certificate_info(row, ctx.clock.now()), extra)


def _gateway_certificate(
    info: CertificateInfo, extra: GatewayCertificateRow | None
) -> GatewayCertificate:
    if extra is not None:  # recorded at issuance
        thumbprint = extra.x5t_s256
    else:
        thumbprint = x5t_s256(x509.load_pem_x509_certificate(info.certificate_pem.encode()))
    return GatewayCertificate(
        info,
        ConsumerName(info.identity.removeprefix("CN=")),
        Delivery(extra.delivery) if extra else None,
        thumbprint,
    )


def list_gateway_certificates(
    ctx: Context,
    consumer: ConsumerName | None = None,
    *,
    live_only: bool = False,
    limit: int = 100,
    after: Serial | None = None,
) -> list[GatewayCertificate]:
    """Newest first; ``live_only``: active and unexpired, i.e. what counts towards the overlap.
    Paging continues after the serial of a page's last item, which must be a stored gateway
    certificate's (``InvalidInput`` otherwise)."""
    check_limit(limit)
    return _listed(ctx, consumer, live_only, limit, after)


def gateway_certificate_page(
    ctx: Context,
    consumer: ConsumerName | None = None,
    *,
    live_only: bool = False,
    limit: int = 100,
    after: Serial | None = None,
) -> Page[GatewayCertificate]:
    """``list_gateway_certificates`` for a reader who pages (REST, ``trellis gateway cert
    list``), as ``ca.certs.certificate_page``: a listing no longer ends at a fixed row count
    with nothing to say there is more."""

    def read(n: int) -> list[GatewayCertificate]:
        return _listed(ctx, consumer, live_only, n, after)

    return page(limit, read, lambda cert: cert.info.serial)


def _listed(
    ctx: Context,
    consumer: ConsumerName | None,
    live_only: bool,
    limit: int,
    after: Serial | None,
) -> list[GatewayCertificate]:
    now = ctx.clock.now()
    query = (
        select(CertificateRow, GatewayCertificateRow)
        .join(
            GatewayCertificateRow,
            col(GatewayCertificateRow.serial) == col(CertificateRow.serial),
            isouter=True,
        )
        .where(CertificateRow.authority == GATEWAY)
    )
    if consumer is not None:
        query = query.where(CertificateRow.spiffe_id == consumer.identity)
    if live_only:
        query = query.where(CertificateRow.status == "active", col(CertificateRow.not_after) > now)
    # Newest first, and the serial among those created in the same second (the clock's
    # resolution), so that the order is total and a page boundary inside such a tie neither
    # repeats nor skips a certificate.
    position = sa.tuple_(col(CertificateRow.created_at), col(CertificateRow.serial))
    with Session(ctx.engine) as session:  # the cursor row and the page: one checkout
        if after is not None:
            # The cursor names a stored certificate, not a position: its row gives the
            # position, whatever the filters say of it now (revoked or expired since).
            last = session.get(CertificateRow, after.hex)
            if last is None or last.authority != GATEWAY:
                raise InvalidInput(f"gateway certificate {after} is not there to page after")
            query = query.where(
                position
                < sa.tuple_(sa.literal(last.created_at, UtcDateTime()), sa.literal(last.serial))
            )
        order = (col(CertificateRow.created_at).desc(), col(CertificateRow.serial).desc())
        # one query, not one more per listed certificate
        found = session.exec(query.order_by(*order).limit(limit)).all()
    return [_gateway_certificate(certificate_info(row, now), extra) for row, extra in found]


def revoke_gateway_certificate(
    ctx: Context,
    serial: Serial,
    reason: RevocationReason,
    actor: str,
    invalidity_date: dt.datetime | None = None,
) -> tuple[GatewayCertificate, list[Path]]:
    """Revoke (the issuer's CRL is re-signed in the same transaction), then rewrite the nginx
    truststores recorded on this node so their ``crl.pem`` lists it. nginx reads ``ssl_crl`` only
    at start and reload: the returned paths are what to reload for. The certificate's
    ``info.crl_skipped`` says why its issuer's CRL was not re-signed, if it was not (a revoked
    intermediate whose key is gone: ``ca.certs.revoke_certificate``)."""
    shown = show_certificate(ctx, serial)  # 404 for certificates of other authorities
    revoked = revoke_certificate(
        ctx,
        serial,
        reason,
        actor,
        invalidity_date=invalidity_date,
        publish=False,  # rewritten here, so the caller learns which files changed
    )
    written = refresh_truststores(ctx, formats=(TruststoreFormat.NGINX,))
    return replace(shown, info=revoked), written


# ----------------------------------------------------------------------------- truststores


@dataclass(frozen=True, slots=True)
class Truststore:
    format: TruststoreFormat
    files: dict[str, bytes]  # name → content; a single-file format has one entry, "truststore.pem"
    # Kong: every CA file a truststore of this authority ever held, by name (see ``_write``).
    earlier: dict[str, bytes] = field(default_factory=dict, repr=False)


def _trusted_cas(session: Session, now: dt.datetime) -> tuple[list[CaRow], list[CaRow]]:
    """Every intermediate a live gateway certificate can chain through (prepared ones too, so
    gateways trust a new intermediate before it issues), and the roots they chain to. Revoked
    intermediates are left out: for gateways that check no CRL (AWS) that is their revocation.
    Nothing from a 'gateway' of another purpose (``init_gateway``): that one's clients are
    not the gateway's partners."""
    check_purpose(session.get(AuthorityRow, GATEWAY), "gateway")
    roots = trust_anchors(session, GATEWAY, now)
    if not roots:
        raise NotInitialised("no gateway authority: run 'trellis gateway init' first")
    intermediates = session.exec(
        select(CaRow)
        .where(
            CaRow.authority == GATEWAY,
            CaRow.role == "intermediate",
            CaRow.state != "revoked",
            col(CaRow.revoked_at).is_(None),
            col(CaRow.not_after) > now,
            col(CaRow.parent_id).in_([r.id for r in roots]),
        )
        .order_by(col(CaRow.not_before).desc())
    ).all()
    return list(intermediates), roots


def _pem(rows: Sequence[CaRow]) -> bytes:
    return "".join(row.cert_pem for row in rows).encode()


def _check_aws(rows: Sequence[CaRow]) -> None:
    """API Gateway refuses truststores with other keys or SHA-1 signatures (its documentation:
    RSA >= 2048 or ECDSA >= 256 bits, SHA-256 or stronger)."""
    for row in rows:
        cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
        key = cert.public_key()
        strong_key = (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048) or (
            isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256
        )
        digest = cert.signature_hash_algorithm
        if not strong_key or not isinstance(digest, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            raise InvalidInput(f"CA {row.serial[:16]} does not meet AWS truststore requirements")


_KONG_README = """\
Kong mtls-auth trust for the Trellis gateway authority.

Kong stores one certificate per CA Certificate entity: create one per PEM file here
({files}), e.g. with the Admin API:

{commands}

then list every id in the plugin (mtls-auth needs the full chain unless allow_partial_chain):

  curl -sS -X POST http://localhost:8001/plugins -d name=mtls-auth \\
       -d config.ca_certificates=<root id> -d config.ca_certificates=<intermediate id>

mtls-auth maps a certificate to a Kong consumer by its CN: create each Kong consumer with
username = the Trellis gateway consumer name (trellis gateway consumer list).
Revocation: Kong checks none by default (revocation_check_mode); revoke in Trellis, then
remove the consumer in Kong or rely on short certificate lifetimes.
"""


def build_truststore(ctx: Context, format: TruststoreFormat) -> Truststore:
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        intermediates, roots = _trusted_cas(session, now)
    if format is TruststoreFormat.PEM:
        return Truststore(format, {"truststore.pem": _pem([*intermediates, *roots])})
    if format is TruststoreFormat.AWS:
        # A private CA's truststore holds the whole chain, issuing CA up to the root.
        _check_aws([*intermediates, *roots])
        return Truststore(format, {"truststore.pem": _pem([*intermediates, *roots])})
    if format is TruststoreFormat.NGINX:
        crls = [current_crl(ctx, GATEWAY, row.serial).pem for row in [*intermediates, *roots]]
        # crl.pem first: a CA in client-ca.pem without its CRL would fail every client of it
        return Truststore(
            format, {"crl.pem": b"".join(crls), "client-ca.pem": _pem([*intermediates, *roots])}
        )
    files = {_kong_name(row): row.cert_pem.encode() for row in roots}
    files |= {_kong_name(row): row.cert_pem.encode() for row in intermediates}
    commands = "\n".join(
        f"  curl -sS -X POST http://localhost:8001/ca_certificates -F cert=@{name}"
        for name in files
    )
    files["README.txt"] = _KONG_README.format(files=", ".join(files), commands=commands).encode()
    with Session(ctx.engine) as session:
        every = session.exec(
            select(CaRow).where(CaRow.authority == GATEWAY, col(CaRow.role).in_(_KONG_ROLES))
        ).all()
    return Truststore(format, files, {_kong_name(row): row.cert_pem.encode() for row in every})


_KONG_ROLES = ("root", "intermediate")


def _kong_name(row: CaRow) -> str:
    return f"{row.role}-{row.serial[:16]}.pem"


def _targets(format: TruststoreFormat, path: Path) -> Path:
    if format.is_directory:
        if path.exists() and not path.is_dir():
            raise InvalidInput(f"{path} is not a directory: the {format.value} truststore is one")
        return path
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory: the {format.value} truststore is one file")
    return path


def _write(store: Truststore, path: Path) -> list[Path]:
    """Write what changed, each file atomically; returns the files rewritten. A Kong directory
    loses the CA files Trellis wrote there before and no longer writes (an expired or revoked
    CA's): a file is taken for Trellis's only if it has the name Trellis gives a CA of this
    authority and holds exactly that CA's certificate. The directory is the operator's, and a
    ``root-*.pem`` of their own in it (another CA for Kong, a backup) is theirs to keep."""
    written: list[Path] = []
    for name, data in store.files.items():
        target = path / name if store.format.is_directory else path
        if not target.exists() or target.read_bytes() != data:
            write_atomic(target, data)
            written.append(target)
    for name, data in store.earlier.items():
        stale = path / name
        if name not in store.files and _holds(stale, data):
            stale.unlink()
    return written


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.is_file() and path.read_bytes() == data
    except OSError:
        return False


def write_truststore(ctx: Context, format: TruststoreFormat, path: Path) -> list[Path]:
    """Write the truststore and record where, so revocations and refreshes rewrite it. A path
    whose files another truststore or an OpenVPN authority keeps current is refused
    (``ca.keepers``): the two would overwrite each other for ever."""
    path = stored_path(_targets(format, path.absolute()), "the truststore path")
    node = ctx.settings.node_name
    with Session(ctx.engine) as session:
        check_free(
            session,
            truststore_keeper(node, path),
            truststore_footprint(format.value, path),
            f"the truststore path {path}",
        )
    written = _write(build_truststore(ctx, format), path)
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        row = session.exec(
            select(GatewayTruststoreRow).where(
                GatewayTruststoreRow.node == node, GatewayTruststoreRow.path == str(path)
            )
        ).first() or GatewayTruststoreRow(node=node, path=str(path), format=format.value)
        row.format, row.written_at = format.value, now
        session.add(row)
        session.commit()
    return written


def refresh_truststores(
    ctx: Context, formats: Sequence[TruststoreFormat] = tuple(TruststoreFormat)
) -> list[Path]:
    """Rewrite the truststores recorded on this node (``Settings.node_name``) whose content
    changed (new CRLs, a rotated intermediate). Run it at least every few hours on every node
    that has some: a CRL nginx holds expires after 24 hours, and an expired CRL makes nginx
    refuse every client. The ``gateway-truststores`` job is node-scoped for that reason
    (``ca.jobs.Scope.NODE``). A missing path is skipped, and so, with a warning, is one whose
    files another keeper keeps (``_refresh``)."""
    return _refresh(ctx, formats)[0]


def _refresh(ctx: Context, formats: Sequence[TruststoreFormat]) -> tuple[list[Path], list[str]]:
    """The files rewritten, and why each truststore left alone was. One whose files another
    keeper keeps (``ca.keepers``), recorded before that was checked (a truststore written over
    an OpenVPN server directory's ``ca.pem``), is not written: never fought over."""
    node = ctx.settings.node_name
    refused: list[str] = []
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(GatewayTruststoreRow).where(
                GatewayTruststoreRow.node == node,
                col(GatewayTruststoreRow.format).in_([f.value for f in formats]),
            )
        ).all()
        free = []
        for row in rows:
            try:
                check_free(
                    session,
                    truststore_keeper(row.node, row.path),
                    truststore_footprint(row.format, Path(row.path)),
                    f"the truststore path {row.path}",
                )
            except InvalidInput as error:
                why = error.detail.removesuffix("; choose another path")
                refused.append(
                    f"{why}: not rewritten (forget this truststore with"
                    f" 'trellis gateway truststore remove --out {row.path}')"
                )
                log.warning("%s", refused[-1])
                continue
            free.append(row)
    stores = {f: build_truststore(ctx, f) for f in {TruststoreFormat(r.format) for r in free}}
    written: list[Path] = []
    for row in free:
        path, format = Path(row.path), TruststoreFormat(row.format)
        if path.is_dir() if format.is_directory else path.parent.is_dir():
            written += _write(stores[format], path)
    return written, refused


def refresh_job(ctx: Context) -> str:
    """``refresh_truststores`` in the shape of a ``ca.jobs.Job`` (ready to be scheduled). The
    result is read over HTTP (``GET /v1/jobs``): the files it wrote are named in the log only.
    A truststore whose files another keeper keeps fails the run once the others are written,
    as a CRL file does the ``openvpn-crl`` job, so that it shows."""
    written, refused = _refresh(ctx, tuple(TruststoreFormat))
    if written:
        log.info("rewrote the gateway truststore files %s", ", ".join(map(str, written)))
    if refused:
        raise Unavailable(
            "; ".join(refused),
            public=f"{len(refused)} gateway truststore(s) overlap files another keeper keeps:"
            " not rewritten",
        )
    if not written:
        return "nothing changed"
    return f"rewrote {len(written)} gateway truststore file(s)"


@dataclass(frozen=True, slots=True)
class RecordedTruststore:
    node: str
    path: Path
    format: TruststoreFormat


def remove_truststore(ctx: Context, path: Path, *, actor: str = "cli") -> RecordedTruststore:
    """Forget the truststore recorded at ``path`` (any spelling of it: a symlink, ``..``) on
    this node: revocations and refreshes stop rewriting it, and its files are free for another
    keeper again. Its files are left where they are: a gateway may still be reading them. For a
    stale destination, or one that should never have been a truststore (written over an OpenVPN
    server's file before ``ca.keepers`` refused that).

    Once: the node's records are read with the write lock taken (SQLite) or locked
    (PostgreSQL), so a second removal made at the same moment finds nothing (``NotFound``)
    instead of being recorded too."""
    node = ctx.settings.node_name
    wanted = path.absolute()
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        locks.begin_write(session.connection())
        rows = session.exec(
            select(GatewayTruststoreRow)
            .where(GatewayTruststoreRow.node == node)
            .order_by(col(GatewayTruststoreRow.id))
            .with_for_update()
        ).all()
        exact = [row for row in rows if Path(row.path) == wanted]
        found = exact or [row for row in rows if Path(row.path).resolve() == wanted.resolve()]
        if not found:
            raise NotFound(f"no gateway truststore is recorded at {path} on node {node}")
        row = found[0]
        removed = RecordedTruststore(row.node, Path(row.path), TruststoreFormat(row.format))
        session.delete(row)
        detail = {"node": row.node, "path": row.path, "format": row.format}
        audit.record(
            session, "gateway.truststore-removed", row.path, actor=actor, at=now, detail=detail
        )
        session.commit()
    return removed


# ----------------------------------------------------------------------------- nginx


_UNSAFE = re.compile(r"[\s;{}\"'$\\#]")


def _safe(value: str, what: str) -> str:
    """nginx configuration is text: a value with whitespace, quotes or ';' would end a directive
    and start another, so such values are refused rather than escaped."""
    if not value or _UNSAFE.search(value):
        raise InvalidInput(f"{what} {value[:64]!r} contains characters nginx would misread")
    return value


_LISTEN = re.compile(r"(?:(\[[0-9a-fA-F:.]+\]|[0-9.]+|[a-z0-9.-]+):)?([0-9]{1,5})")


def _listen(value: str) -> None:
    """``[address:]port`` as nginx's ``listen`` takes it, with a port of 1 to 65535 (nginx
    refuses others when it loads the configuration, long after the snippet was made)."""
    match = _LISTEN.fullmatch(value)
    port = int(match[2]) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise InvalidInput(f"listen is [address:]port, the port 1 to 65535, not {value[:64]!r}")
    address = match[1]
    if address is not None and (address[0] == "[" or address.replace(".", "").isdigit()):
        try:
            ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            raise InvalidInput(f"listen: {address[:64]!r} is not an IP address") from None
        if address[0] == "[" and ":" not in address:
            raise InvalidInput(f"listen: {address[:64]!r} in brackets is not an IPv6 address")


_UPSTREAM = re.compile(r"https?://([^/?#\s]+)(/\S*)?")
_UPSTREAM_UNIX = re.compile(r"https?://unix:/[^\s:]+(:/\S*)?")  # nginx's socket form
_UPSTREAM_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def _upstream(value: str) -> None:
    """``proxy_pass``'s URL as nginx loads it (``ngx_parse_url``): http or https, then a host
    name (or an upstream block's name), an IPv4 address or a bracketed IPv6 one, an optional
    port of 1 to 65535, and no ``user:password@``; or ``unix:/socket``. nginx refuses the rest
    when it loads the configuration, long after the snippet was made."""
    if _UPSTREAM_UNIX.fullmatch(value):
        return
    match = _UPSTREAM.fullmatch(value)
    if match is None:
        raise InvalidInput(f"the upstream {value[:64]!r} is not an http:// or https:// URL")
    authority = match[1]
    if "@" in authority:
        raise InvalidInput("the upstream may not hold user:password@ (nginx refuses it)")
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        try:
            valid = bool(bracket) and ipaddress.ip_address(host).version == 6
        except ValueError:
            valid = False
        if not valid or (port and not port.startswith(":")):
            raise InvalidInput(f"the upstream's host {authority[:64]!r} is not an IPv6 address")
        port = port[1:] if port else None
    else:
        host, colon, port_text = authority.partition(":")
        port = port_text if colon else None
        if not host.isascii() or not _UPSTREAM_HOST.fullmatch(host):
            raise InvalidInput(
                f"the upstream's host {host[:64]!r} is not an ASCII host name or IPv4 address"
                " (write an internationalised name in its xn-- form)"
            )
        if host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                message = f"the upstream's host {host[:64]!r} is not an IPv4 address"
                raise InvalidInput(message) from None
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise InvalidInput(f"the upstream's port {port[:16]!r} is not 1 to 65535")


@dataclass(frozen=True, slots=True)
class NginxSnippet:
    upstream: str = "http://127.0.0.1:8080"
    truststore: Path = Path("/etc/nginx/trellis-gateway")
    server_name: str = "_"
    listen: str = "443"
    ssl_certificate: Path = Path("/etc/nginx/tls/server.crt")
    ssl_certificate_key: Path = Path("/etc/nginx/tls/server.key")

    def __post_init__(self) -> None:
        _upstream(self.upstream)
        _listen(self.listen)
        for path, what in (
            (self.truststore, "truststore path"),
            (self.ssl_certificate, "certificate path"),
            (self.ssl_certificate_key, "key path"),
        ):
            # An empty path arrives as Path("."); nginx reads a relative one from its own
            # prefix, not from where 'trellis gateway truststore --out' wrote it.
            if not path.is_absolute():
                raise InvalidInput(
                    f"the {what} {str(path)[:64]!r} is empty or relative: give an absolute path"
                    " (nginx reads a relative one from its own prefix directory)"
                )
        for value, what in (
            (self.upstream, "upstream"),
            (self.server_name, "server name"),
            (str(self.truststore), "truststore path"),
            (str(self.ssl_certificate), "certificate path"),
            (str(self.ssl_certificate_key), "key path"),
        ):
            _safe(value, what)


def nginx_snippet(params: NginxSnippet) -> str:
    """A complete ``server`` block (inside ``http {}``) requiring a gateway client certificate."""
    store = params.truststore
    return f"""\
# Trellis gateway mTLS: generated by 'trellis gateway nginx-snippet'.
# Truststore: trellis gateway truststore --format nginx --out {store}
# Reload nginx whenever it is rewritten (revocations, CRL refresh): nginx -s reload
server {{
    listen {params.listen} ssl;
    server_name {params.server_name};

    # the gateway's own server certificate (from your web PKI, not from Trellis)
    ssl_certificate     {params.ssl_certificate};
    ssl_certificate_key {params.ssl_certificate_key};
    ssl_protocols       TLSv1.2 TLSv1.3;

    # partners must present a certificate from the Trellis gateway authority
    ssl_verify_client      on;
    ssl_client_certificate {store / "client-ca.pem"};
    ssl_crl                {store / "crl.pem"};
    ssl_verify_depth       {VERIFY_DEPTH};

    location / {{
        proxy_pass {params.upstream};
        # set here, so a client cannot smuggle its own values in
        proxy_set_header X-SSL-Client-Cert   $ssl_client_escaped_cert;
        proxy_set_header X-SSL-Client-Verify $ssl_client_verify;
        proxy_set_header X-SSL-Client-S-DN   $ssl_client_s_dn;
        proxy_set_header X-SSL-Client-Serial $ssl_client_serial;
        proxy_set_header Host                $host;
    }}
}}
"""
