"""Workload-side helpers for the ``ca`` tests: keys, CSRs built with cryptography, enrolment
through the real pipeline (entry → join token → grant → ``issue_svid``) and row counting."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ca.agent import Agent
from ca.bundle import write_bundle_file
from ca.config import Context
from ca.durations import Ttl
from ca.entries import Entry, EntryParams, create_entry
from ca.grants import join_grant
from ca.identity import SpiffeId
from ca.issue import IssuedSvid, issue_svid
from ca.keys import KeyType, PrivateKey
from ca.tokens import create_join_token
from ca.workload import Received, SvidFiles, write_svid

# The database decides only how rows are stored, never what is signed: tests about certificate
# bytes and key types run on SQLite alone (the store-sensitive tests run on both databases).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# The workload key types the issuance tests run over (ids are the KeyType values).
SUBJECT_KEY_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.ED25519]


def new_key(key_type: KeyType) -> PrivateKey:
    return key_type.generate()


def make_csr(
    key: PrivateKey,
    *,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    subject: x509.Name | None = None,
) -> bytes:
    """A PEM CSR signed by ``key``; SANs only when asked for (a plain CSR names no identity)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def csr_sha256(csr_pem: bytes) -> bytes:
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def tamper_signature(csr_pem: bytes) -> bytes:
    """Flip the CSR's last byte: it belongs to the signature for every algorithm we use (the
    last INTEGER octet of an ECDSA signature, or raw RSA/Ed25519 signature bytes), so the DER
    stays well-formed and only the signature check can catch it."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_der(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Workload:
    entry: Entry
    key: PrivateKey
    svid: IssuedSvid

    @property
    def cert(self) -> x509.Certificate:
        return self.svid.certificate

    @property
    def full_chain_pem(self) -> bytes:
        """Leaf first, then the intermediates: what a TLS endpoint presents."""
        return self.svid.certificate_pem + self.svid.chain_pem

    @property
    def full_chain_der(self) -> bytes:
        certs = [self.cert, *self.svid.issuer.chain]
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)

    def on_disk(self, directory: Path) -> SvidFiles:
        """Its SVID, key and bundle in ``directory``, as the agent and ``svid renew`` keep
        them."""
        files = SvidFiles(directory)
        write_svid(files, self.full_chain_pem, self.key, self.svid.bundle_pem)
        return files


def add_entry(
    ctx: Context,
    spiffe_id: str,
    *,
    dns_names: Sequence[str] = (),
    ttl: Ttl | None = None,
    max_ttl: Ttl | None = None,
) -> Entry:
    params = EntryParams(SpiffeId.parse(spiffe_id), dns_names, ttl=ttl, max_ttl=max_ttl)
    return create_entry(ctx, params)


def join_secret(ctx: Context, entry: Entry, *, uses: int = 1) -> tuple[str, str]:
    """(token id, secret) for a fresh join token of ``entry``."""
    info, secret = create_join_token(ctx, entry.id, uses=uses)
    return info.id, secret


def enrol(
    ctx: Context,
    spiffe_id: str,
    key_type: KeyType = KeyType.EC_P256,
    *,
    dns_names: Sequence[str] = (),
    ttl: Ttl | None = None,
) -> Workload:
    """Register ``spiffe_id`` and bootstrap it with a join token, exactly as a workload would."""
    entry = add_entry(ctx, spiffe_id, dns_names=dns_names)
    _, secret = join_secret(ctx, entry)
    key = new_key(key_type)
    svid = issue_svid(ctx, join_grant(ctx, secret), make_csr(key, uris=[spiffe_id]), ttl)
    return Workload(entry, key, svid)


def count_rows(ctx: Context, table: str) -> int:
    with ctx.engine.connect() as connection:
        return int(connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def uses_remaining(ctx: Context, token_id: str) -> int | None:
    with ctx.engine.connect() as connection:
        value = connection.execute(
            sa.text("SELECT uses_remaining FROM token WHERE id = :id"), {"id": token_id}
        ).scalar_one()
    return None if value is None else int(value)


def openssl_rsa_pss_csr(directory: Path) -> bytes:
    """A CSR for an RSA-PSS-only key (SPKI id-RSASSA-PSS, RFC 4055), which cryptography cannot
    generate: made by openssl, as a workload would."""
    key = directory / "pss.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA-PSS", "-out", str(key)],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=web"],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout


def openssl_csr(directory: Path, *extensions: str, subject: str = "/CN=web") -> bytes:
    """A P-256 CSR made and signed by openssl, its requested extensions given as openssl
    config lines (``subjectAltName=URI:...``, ``2.5.29.17=DER:...``): openssl writes what
    cryptography's builder refuses to (a second subjectAltName, names it cannot represent)."""
    key, config = directory / "openssl-csr.key", directory / "openssl-csr.cnf"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        capture_output=True,
        timeout=30,
        check=True,
    )
    config.write_text(
        "[req]\ndistinguished_name = dn\nreq_extensions = ext\n[dn]\n[ext]\n"
        + "".join(f"{line}\n" for line in extensions)
    )
    return subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-config", str(config), "-subj", subject],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout


def with_version(csr_pem: bytes, version: int) -> bytes:
    """The CSR with its version field set to ``version``: RFC 2986 knows only v1 (0). The
    signature no longer verifies, which no reader gets as far as checking."""
    der = bytearray(base64.b64decode(b"".join(csr_pem.strip().splitlines()[1:-1])))
    at = der.index(b"\x02\x01\x00")  # the first INTEGER of the CertificationRequestInfo
    der[at + 2] = version
    body = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        ["-----BEGIN CERTIFICATE REQUEST-----", *lines, "-----END CERTIFICATE REQUEST-----", ""]
    ).encode()


# CSRs whose structure is DER but that cryptography refuses with exceptions of its own, not
# ValueError: by id, the openssl extension lines and the version to write (the builders of
# ``unreadable_csr``). Each asks for spiffe://example.org/web and nothing else readable.
_WEB_URI = "URI:spiffe://example.org/web"
_WEB_URI_DER = "86187370696666653A2F2F6578616D706C652E6F72672F776562"
UNREADABLE_CSRS: dict[str, tuple[tuple[str, ...], int]] = {
    "csr/version-5": ((f"subjectAltName = {_WEB_URI}",), 5),
    "san/two-extensions": (
        (f"subjectAltName = {_WEB_URI}", "2.5.29.17 = DER:300D860B7370696666653A2F2F61"),
        0,
    ),
    # SEQUENCE { uniformResourceIdentifier, x400Address [3] { empty ORAddress } }
    "san/x400-address": ((f"2.5.29.17 = DER:301E{_WEB_URI_DER}A3023000",), 0),
    # SEQUENCE { uniformResourceIdentifier, ediPartyName [5] { partyName [1] UTF8String "x" } }
    "san/edi-party-name": ((f"2.5.29.17 = DER:3021{_WEB_URI_DER}A505A1030C0178",), 0),
}


def unreadable_csr(directory: Path, case: str) -> bytes:
    """The ``UNREADABLE_CSRS`` case ``case``, made by openssl in ``directory``."""
    extensions, version = UNREADABLE_CSRS[case]
    pem = openssl_csr(directory, *extensions)
    return with_version(pem, version) if version else pem


def svid_dir_listing(directory: Path) -> dict[str, bytes | str]:
    """Every entry under an SVID directory (``ca.workload.write_svid``'s ``..data`` link, the
    name links, the staged directories and the files in them): a link's target, a file's
    bytes. Equal before and after: the directory was left exactly as it was."""
    found: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            found[name] = os.readlink(path)
        elif path.is_file():
            found[name] = path.read_bytes()
        else:
            found[name] = "directory"
    return found


class LocalClient:
    """What the agent's ``WorkloadClient`` does, with the server's part done in-process: a
    renewal is a fresh SVID (of ``ttl``) written with the real ``write_svid``, so a write fails
    as it would after a real server signed. ``before_write(renewal, directory)`` runs first."""

    def __init__(
        self,
        ctx: Context,
        *,
        ttl: Ttl | None = None,
        before_write: Callable[[int, Path], None] = lambda _n, _d: None,
    ) -> None:
        self.ctx, self.ttl, self.before_write = ctx, ttl, before_write
        self.renewals = 0

    def fetch_bundle(self) -> bytes:
        return write_bundle_file(self.ctx).read_bytes()

    def renew(self, directory: Path, ttl: str | None = None) -> Received:
        self.renewals += 1
        self.before_write(self.renewals, directory)
        fresh = enrol(self.ctx, f"spiffe://example.org/w{self.renewals}", ttl=self.ttl)
        files = SvidFiles(directory)
        write_svid(files, fresh.full_chain_pem, fresh.key, fresh.svid.bundle_pem)
        return Received(str(fresh.entry.spiffe_id), "01", "", files)


class Local(Agent):
    """The agent, its server ``LocalClient``."""

    client: LocalClient

    def _client(self) -> LocalClient:  # type: ignore[override]
        return self.client
