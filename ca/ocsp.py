"""An RFC 6960 OCSP responder for every CA Trellis holds.

Responses are signed by a delegated responder certificate per CA (id-kp-OCSPSigning,
id-pkix-ocsp-nocheck), issued and renewed here on demand, so CA keys sign only certificates and
CRLs. Status comes straight from the database, so it is current the moment a revocation commits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from sqlmodel import Session, col, select

from ca import der
from ca.authority import destroy_quietly
from ca.cas import ca_certificate, ca_handle, ca_signer
from ca.config import Context
from ca.errors import NotFound, TrellisError, Unavailable
from ca.keys import KeyType, Signer
from ca.profiles import BACKDATE, ResponderSpec, fitted_name, ocsp_responder_builder, sign
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CaRow, CertificateRow, OcspResponderRow

__all__ = ["MAX_REQUEST", "RESPONSE_VALIDITY", "respond"]

log = logging.getLogger("trellis.ocsp")
RESPONDER_TTL = dt.timedelta(days=7)
RESPONSE_VALIDITY = dt.timedelta(hours=1)
# A single-certificate request with a nonce is ~100 bytes; anything near this is not OCSP.
MAX_REQUEST = 8192
# RFC 9654 §2.1: a nonce of 0 octets or of more than 128 is refused with malformedRequest.
NONCE_OCTETS = range(1, 129)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def public_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, which OCSP's issuerKeyHash covers (RFC 6960
    §4.1.1)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.public_key_bits(spki)


def _match(ctx: Context, session: Session, request: ocsp.OCSPRequest) -> CaRow | None:
    algorithm = request.hash_algorithm.name
    for row in session.exec(select(CaRow)).all():
        cert = ca_certificate(ctx, row)
        name_hash = hashlib.new(algorithm, cert.subject.public_bytes()).digest()
        key_hash = hashlib.new(algorithm, public_key_bits(cert)).digest()
        if name_hash == request.issuer_name_hash and key_hash == request.issuer_key_hash:
            return row
    return None


def _responder(ctx: Context, session: Session, ca: CaRow) -> tuple[x509.Certificate, Signer] | None:
    """The CA's current responder, made (or renewed) when it has none with a third of its life
    left; None for a retired or revoked CA whose key is gone (``_ended``). Raises
    ``Unavailable`` or ``NotFound`` when its key cannot be had here."""
    now = ctx.clock.now()
    row = session.exec(
        select(OcspResponderRow)
        .where(OcspResponderRow.ca_id == ca.id, col(OcspResponderRow.not_after) > now)
        .order_by(col(OcspResponderRow.generation).desc())
    ).first()
    if row is not None:
        cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if cert.not_valid_after_utc - now > life / 3:
            return cert, _signer(ctx, row, cert)
    if _ended(ctx, ca):
        return None
    latest = session.exec(
        select(sa.func.max(OcspResponderRow.generation)).where(OcspResponderRow.ca_id == ca.id)
    ).one()
    return _new_responder(ctx, ca, now, (latest or 0) + 1)


def _ended(ctx: Context, ca: CaRow) -> bool:
    """A retired or revoked CA whose key is gone: a retired root's key is destroyed on purpose
    (``ca.root_rotation``), so no responder can be certified for it again, now or later. Not a
    fault to log per request (tryLater would have clients ask forever): this responder is no
    longer authoritative for it (RFC 6960 §2.3 ``unauthorized``); its final CRL still answers.
    A retired intermediate whose key is kept goes on answering while its certificates live.
    The verdict is cached: a destroyed key does not come back."""
    if ca.state not in ("retired", "revoked"):
        return False
    cache_key = ("ocsp-ca-ended", ca.id)
    if ctx.cache.get(cache_key):
        return True
    handle = ca_handle(ca)
    try:
        # From the backend: KeyStore.load makes "not there" and "store down" one Unavailable,
        # and only the first means the CA has ended.
        ctx.keys.backend(handle.backend).load(handle)
    except NotFound:
        log.info(
            "OCSP for CA %s answers unauthorized: it is %s and its key is gone", ca.serial, ca.state
        )
        ctx.cache[cache_key] = True
        return True
    return False


def _signer(ctx: Context, row: OcspResponderRow, cert: x509.Certificate) -> Signer:
    cache_key = ("ocsp-signer", row.id)
    signer = ctx.cache.get(cache_key)
    if not isinstance(signer, Signer):
        signer = ctx.keys.load(ca_handle(row), certified=cert.public_key())
        ctx.cache[cache_key] = signer
    return signer


_RESPONDER_SUFFIX = " OCSP responder"


def responder_common_name(issuer: x509.Certificate) -> str:
    """The issuer's common name (the attribute's value, not an RFC 4514 string of the whole
    name, whose cut could fall inside an attribute) followed by "OCSP responder", within the
    64 characters X.520 allows a common name (ub-common-name, RFC 5280 Appendix A)."""
    names = issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    label = value if isinstance(value, str) and value else f"CA {issuer.serial_number:x}"
    return fitted_name(label, _RESPONDER_SUFFIX)


def _new_responder(
    ctx: Context, ca: CaRow, now: dt.datetime, generation: int
) -> tuple[x509.Certificate, Signer]:
    """Make responder ``generation`` of ``ca``: once across processes. Replicas that find the
    CA without a current responder at the same moment each make one, but only the first insert
    of (CA, generation) commits (a unique constraint); the others destroy the key they made and
    use the winner's, so a CA has one responder at a time and its answers one signer."""
    issuer = ca_certificate(ctx, ca)
    handle = ctx.keys.create(KeyType.EC_P256, f"{ca.authority}-ocsp", ca.key_backend)
    try:
        signer = ctx.keys.load(handle)
        spec = ResponderSpec(
            public_key=signer.public_key(),
            common_name=responder_common_name(issuer),
            serial=Serial.generate(),
            not_before=max(now - BACKDATE, issuer.not_valid_before_utc),
            not_after=min(now + RESPONDER_TTL, issuer.not_valid_after_utc),
            issuer=issuer,
        )
        cert = sign(ocsp_responder_builder(spec), ca_signer(ctx, ca))
        cert.verify_directly_issued_by(issuer)
        assert ca.id is not None
        # Its own transaction: the responder outlives this request.
        with Session(ctx.engine) as session:
            session.add(
                OcspResponderRow(
                    ca_id=ca.id,
                    generation=generation,
                    key_backend=handle.backend,
                    key_ref=handle.ref,
                    key_type=handle.key_type.value,
                    cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                    not_after=cert.not_valid_after_utc,
                )
            )
            session.commit()
    except sa.exc.IntegrityError:
        destroy_quietly(ctx, [handle])
        winner = _winner(ctx, ca, generation)
        if winner is None:  # not the race this constraint settles
            raise
        return winner
    except BaseException:
        destroy_quietly(ctx, [handle])  # the failure to report is the one that got us here
        raise
    return cert, signer


def _winner(ctx: Context, ca: CaRow, generation: int) -> tuple[x509.Certificate, Signer] | None:
    """The responder another process made first, if there is one."""
    with Session(ctx.engine) as session:
        row = session.exec(
            select(OcspResponderRow).where(
                OcspResponderRow.ca_id == ca.id, OcspResponderRow.generation == generation
            )
        ).first()
    if row is None:
        return None
    cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
    return cert, _signer(ctx, row, cert)


def _status(
    session: Session, ca: CaRow, serial: int
) -> tuple[ocsp.OCSPCertStatus, dt.datetime | None, x509.ReasonFlags | None]:
    hex_serial = format(serial, "x")
    revoked_at: dt.datetime | None
    reason: str | None
    child = None
    if ca.role == "root":
        child = session.exec(
            select(CaRow).where(CaRow.parent_id == ca.id, CaRow.serial == hex_serial)
        ).first()
    if child is not None:
        revoked_at, reason = child.revoked_at, child.revocation_reason
    else:
        leaf = session.exec(
            select(CertificateRow).where(
                CertificateRow.serial == hex_serial, CertificateRow.issuer_ca_id == ca.id
            )
        ).first()
        if leaf is None:
            return ocsp.OCSPCertStatus.UNKNOWN, None, None
        revoked_at = leaf.revoked_at if leaf.status == "revoked" else None
        reason = leaf.revocation_reason
    if revoked_at is None:
        return ocsp.OCSPCertStatus.GOOD, None, None
    flag = RevocationReason(reason).flag if reason else None
    return ocsp.OCSPCertStatus.REVOKED, revoked_at, flag


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    response = ocsp.OCSPResponseBuilder.build_unsuccessful(status)
    return response.public_bytes(serialization.Encoding.DER)


def respond(ctx: Context, request_der: bytes) -> bytes:
    """Answer one DER OCSPRequest with a DER OCSPResponse; never raises for bad input.

    thisUpdate is backdated by ``BACKDATE``, as certificates' notBefore and CRLs' thisUpdate
    are: a relying party whose clock lags must not find the answer "not yet valid". OpenSSL
    (``openssl ocsp``, nginx's stapling) allows 5 minutes of skew there, other clients may allow
    none, and one rule for every signed time is easier to reason about. A revoked status is
    never dated before its revocation: RFC 6960 §4.2.2.1 makes thisUpdate the latest time the
    status is known to have been correct, and before the revocation it was ``good``. nextUpdate
    counts from now, as a CRL's does."""
    try:
        if not request_der or len(request_der) > MAX_REQUEST:
            raise ValueError("empty or oversized OCSP request")
        request = ocsp.load_der_ocsp_request(request_der)
        algorithm = _HASHES[request.hash_algorithm.name]
        if request.serial_number < 0:
            # RFC 5280 §4.1.2.2: serials are positive. A CertID with a negative one names no
            # certificate, and cryptography cannot echo it in a response's CertID.
            raise ValueError("negative serial number")
        nonce = None
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                nonce = extension.value
                if len(nonce.nonce) not in NONCE_OCTETS:
                    raise ValueError("nonce length outside 1..128 octets")
    except (
        ValueError,
        KeyError,
        NotImplementedError,  # several CertIDs in one request: cryptography parses only one
        UnsupportedAlgorithm,  # a CertID hash algorithm cryptography does not know
        x509.UnsupportedGeneralNameType,
        x509.DuplicateExtension,
    ):
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        ca = _match(ctx, session, request)
        if ca is None:  # RFC 6960 §2.3: not a CA this responder is authoritative for
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        status, revoked_at, reason = _status(session, ca, request.serial_number)
        try:
            responder = _responder(ctx, session, ca)
        except (NotFound, Unavailable, OSError) as exc:
            return _cannot_sign(ca, exc)
        if responder is None:  # RFC 6960 §2.3: no longer authoritative for this CA
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        responder_cert, signer = responder
    this_update = now - BACKDATE if revoked_at is None else max(now - BACKDATE, revoked_at)
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number,
            algorithm=algorithm(),
            cert_status=status,
            this_update=this_update,
            next_update=now + RESPONSE_VALIDITY,
            revocation_time=revoked_at,
            revocation_reason=reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
        .certificates([responder_cert])
    )
    if nonce is not None:
        builder = builder.add_extension(nonce, critical=False)
    try:
        response = builder.sign(signer.private_key, signer.hash_algorithm)
    except Unavailable as exc:  # a remote key (Vault) that does not answer
        return _cannot_sign(ca, exc)
    return response.public_bytes(serialization.Encoding.DER)


def _cannot_sign(ca: CaRow, exc: Exception) -> bytes:
    """RFC 6960 §2.3 ``tryLater``: the responder's key cannot be used here now (missing from
    this replica's key store, or the store unavailable). A relying party reads an OCSP error
    response, not an HTTP problem body, and may ask again or another replica."""
    detail = exc.detail if isinstance(exc, TrellisError) else type(exc).__name__
    log.warning(
        "OCSP for CA %s answered tryLater: the responder cannot sign: %s", ca.serial, detail
    )
    return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
