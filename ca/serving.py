"""Trellis's own HTTPS identity: a certificate it issues to itself from the mesh authority.

Clients pin the trust bundle, so no web PKI is involved: ``spiffe://<td>/trellis/server`` with
``localhost``, ``127.0.0.1`` and any configured names, renewed at start-up when a third of its
life is left, when its names are not the configured ones (one added or taken away), when the
active issuer changed, when it was revoked (a revoked serving certificate's key is suspect: the
new one has a new key), or when its key file is missing, unreadable or not its key (with a
warning naming the file). The certificate a new pair replaces is revoked (``superseded``): left
valid, the one replaced at a root rotation's switch held the old root's retirement up until the
old intermediate expired. A good certificate whose
chain is no longer its issuer's (a root rotation adds a cross certificate at publish and the
switch, and takes it away at retire) gets the current chain written after it, leaf and key kept.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from ca.authority import Issuer, active_issuer
from ca.bundle import write_bundle_file
from ca.certs import revoke_certificate, withdrawn_unless_delivered
from ca.config import Context
from ca.durations import Ttl
from ca.errors import Conflict, InvalidInput, Unavailable
from ca.files import check_writable, replacing_together, write_atomic
from ca.grants import server_grant
from ca.identity import SERVER_PATH
from ca.issue import issue_for_key
from ca.keys import KeyType
from ca.pem import certs_pem, private_key_pem
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CertificateRow

__all__ = ["REPLACED_BY", "WITHDRAWN_BY", "ServerTls", "ensure_server_certificate"]

log = logging.getLogger("trellis.serving")
SERVER_TTL = Ttl(30 * 86400)
WITHDRAWN_BY = "serving:withdrawn"  # who revoked a serving certificate never written
REPLACED_BY = "serving:replaced"  # who revoked the serving certificate a new pair replaced


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert_path: Path  # leaf then chain
    key_path: Path
    bundle_path: Path
    issued: Serial | None = None  # the certificate this call put in place; None: it was good
    rechained: bool = False  # the good certificate got its issuer's current chain written


def _split_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name.lower())
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


def _served(tls: ServerTls) -> list[x509.Certificate]:
    """The certificates in ``tls.crt``, leaf first; none where it is missing or unreadable."""
    try:
        return x509.load_pem_x509_certificates(tls.cert_path.read_bytes())
    except (OSError, ValueError):
        return []


def _still_good(
    tls: ServerTls,
    ctx: Context,
    served: Sequence[x509.Certificate],
    issuer_cert: x509.Certificate,
    names: set[str],
) -> bool:
    if not served:
        return False
    cert = served[0]
    now = ctx.clock.now()
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    if cert.not_valid_after_utc - now < life / 3 or cert.issuer != issuer_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    present = set(san.get_values_for_type(x509.DNSName))
    present |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    # Equal, not merely covered: a name taken out of TRELLIS_SERVER_NAMES (a wildcard that
    # should no longer be served) stayed in the certificate until it aged out, ~20 days.
    if names != present or _revoked(ctx, cert):
        return False
    problem = _key_problem(tls, cert)
    if problem is not None:
        log.warning("issuing a new serving certificate: %s", problem)
        return False
    return True


def _key_problem(tls: ServerTls, cert: x509.Certificate) -> str | None:
    """What keeps the key file from serving ``cert``, if anything. Left alone, a key removed,
    damaged or replaced (a kill between ``replacing_together``'s two renames, an operator's
    slip) beside a good certificate stopped every start at the listener, naming no file,
    until someone removed the certificate too."""
    try:
        key = serialization.load_pem_private_key(tls.key_path.read_bytes(), password=None)
    except FileNotFoundError:
        return f"its key {tls.key_path} is missing"
    except OSError as exc:
        return f"its key {tls.key_path} cannot be read: {exc.strerror or exc}"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return f"its key {tls.key_path} is not a private key in PEM"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return f"its key {tls.key_path} does not match the certificate {tls.cert_path}"
    return None


def _replaceable(ctx: Context, served: Sequence[x509.Certificate]) -> Serial | None:
    """The serving certificate in this replica's own ``tls.crt``, if it is one Trellis issued
    and still live: what a new pair there makes obsolete. Only the file's own leaf is ever
    named, never another serving certificate of the trust domain: every replica has its own
    pair (its data directory), and the others' are live in their listeners."""
    if not served:
        return None
    with Session(ctx.engine) as session:
        row = session.get(CertificateRow, format(served[0].serial_number, "x"))
    if row is None or row.profile != "server" or not row.spiffe_id.endswith(SERVER_PATH):
        return None
    live = row.status == "active" and row.not_after > ctx.clock.now()
    return Serial.parse(row.serial) if live else None


def _revoke_replaced(ctx: Context, serial: Serial) -> None:
    """The new pair is in place (the listener loads it within seconds; clients of Trellis
    check its chain and identity, not its revocation): the old certificate serves nothing
    more, yet stayed valid until its notAfter, which a root rotation's switch makes the old
    intermediate's, so it held the retirement of the old root up for the CA's lifetime
    (docs/rotation.md). RFC 5280 §5.3.1: superseded. The revocation failing must not undo the
    replacement: it is logged, with the serial, for an operator to revoke it."""
    try:
        revoke_certificate(ctx, serial, RevocationReason.SUPERSEDED, REPLACED_BY)
    except Conflict:
        pass  # revoked meanwhile (another process replacing the same file)
    except Exception as exc:  # the new pair stands whatever this is
        log.warning(
            "the replaced serving certificate %s stays valid: it could not be revoked (%s: %s):"
            " revoke it by hand",
            serial,
            type(exc).__name__,
            exc,
        )


def _revoked(ctx: Context, cert: x509.Certificate) -> bool:
    """Whether an admin revoked it (``trellis revoke``): clients that check revocation refuse
    it, and its key may be in other hands, so it is replaced, not kept until it ages out."""
    with Session(ctx.engine) as session:
        row = session.get(CertificateRow, format(cert.serial_number, "x"))
    return row is not None and row.status == "revoked"


def _checked_writable(path: Path) -> None:
    try:
        check_writable(path, directory=False)
    except InvalidInput as exc:  # Trellis's own data directory: the server's fault
        raise Unavailable(f"cannot write the serving certificate: {exc.detail}") from None


def _rechain(tls: ServerTls, served: Sequence[x509.Certificate], issuer: Issuer) -> bool:
    """Write the issuer's current chain after a good leaf, if the file holds another one;
    whether it did. The chain was written once, with the leaf, and the leaf is renewed only at
    a third of its life left (days): after a root rotation's retire the listener went on
    presenting "B signed by A", the cross certificate the retire had just revoked
    (docs/rotation.md: retiring "ends every trust path through it"), and after the publish it
    lacked "A signed by B", which a client trusting only the new root needs. The key is not
    touched, so the certificate file alone is replaced, in one rename."""
    if tuple(served[1:]) == issuer.chain:
        return False
    _checked_writable(tls.cert_path)
    write_atomic(tls.cert_path, certs_pem(served[:1]) + issuer.chain_pem)
    log.info("wrote the issuer's current chain after the serving certificate %s", tls.cert_path)
    return True


def ensure_server_certificate(ctx: Context, extra_names: Sequence[str] = ()) -> ServerTls:
    """The serving certificate and key in the data directory, issued anew (``_still_good``)
    only where both files can be written: its key is kept nowhere else. The two replace the
    old ones together or not at all (``replacing_together``), key first, as the listener
    reloads on the certificate's change (``cli.tlsreload``); a certificate they do not reach,
    whatever stops them, is withdrawn (revoked ``superseded``, actor ``serving:withdrawn``)
    and the previous pair stays in place. Once the new pair is in place, the live certificate
    it replaced is revoked (``_revoke_replaced``). A good certificate is followed by the issuer's
    current chain (``_rechain``), which the listener reloads the same way."""
    directory = ctx.settings.server_tls_dir
    issuer = active_issuer(ctx)
    wanted = ["localhost", "127.0.0.1", *ctx.settings.server_names, *extra_names]
    if ctx.settings.host not in ("0.0.0.0", "::", ""):  # noqa: S104 (comparing, not binding)
        wanted.append(ctx.settings.host)
    dns, ips = _split_names(wanted)
    tls = ServerTls(directory / "tls.crt", ctx.settings.server_key_path, write_bundle_file(ctx))
    served = _served(tls)
    if not _still_good(tls, ctx, served, issuer.certificate, set(dns) | set(ips)):
        for path in (tls.key_path, tls.cert_path):
            _checked_writable(path)
        key = KeyType.EC_P256.generate()
        # Asked for no longer than the issuer lives: it would be cut there anyway, and issuance
        # warns about a cut lifetime (meant for a workload's, not this expected one).
        left = issuer.certificate.not_valid_after_utc - ctx.clock.now()
        ttl = Ttl(min(SERVER_TTL.seconds, max(int(left.total_seconds()), 60)))
        svid = issue_for_key(ctx, server_grant(ctx, dns, ips, ttl), key.public_key())
        files = {
            tls.key_path: (private_key_pem(key), 0o600),
            tls.cert_path: (svid.certificate_pem + svid.chain_pem, 0o644),
        }
        replaced = _replaceable(ctx, served)
        with withdrawn_unless_delivered(ctx, svid.serial, WITHDRAWN_BY), replacing_together(files):
            pass
        if replaced is not None:
            _revoke_replaced(ctx, replaced)
        return replace(tls, issued=svid.serial)
    return replace(tls, rechained=_rechain(tls, served, issuer))
