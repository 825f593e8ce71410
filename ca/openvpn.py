"""OpenVPN: an own CA hierarchy, server and client certificates, complete inline client
profiles with per-client tls-crypt-v2 keys, and a CRL file that is always current.

    init_openvpn      root + intermediate (no SAN, purpose ``openvpn``) and the control-channel
                      keys: the tls-crypt-v2 server key and a shared tls-crypt key
    configure         where clients connect (remote, port, proto) and where the CRL file lives
    issue_server_cert a serverAuth-only certificate and a fresh key
    server_config     server.conf and every file it names
    add_client        claim a name, issue a clientAuth-only certificate, render the .ovpn
    renew_client      a fresh profile; the previous certificate is revoked as ``superseded``
    revoke_client     revoke a name's live certificates and rewrite the CRL file at once
    write_crl_files   the scheduled job: keep every CRL file current long before nextUpdate
    crl_health        what ``/readyz`` should warn about

OpenVPN's ``crl-verify`` checks every certificate of the chain (``X509_V_FLAG_CRL_CHECK_ALL``)
and refuses everybody once a CRL expires, but a CA with no CRL in the file only gets a VERIFY
WARNING and its clients, revoked or not, are accepted. So the file holds a CRL for every
unexpired CA of the authority (intermediates, including prepared and retired ones but not
revoked ones, which the root's CRL refuses, then roots), is checked before it is written, and is
kept by one authority only (``ca.keepers``). OpenVPN
re-reads it when its mtime or size changes, at the start of each handshake: no restart, and the
file is replaced in one rename so it never reads half a file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from sqlmodel import Session, col, select

from ca import audit, certs
from ca.authority import (
    AuthorityExists,
    AuthorityParams,
    Issuer,
    active_issuer,
    check_name,
    check_purpose,
    init_authority,
    initialising,
    load_authority,
    roots_of,
)
from ca.config import Context
from ca.crl import current_crl
from ca.durations import Ttl
from ca.errors import Conflict, InvalidInput, NotFound, NotInitialised, Unavailable
from ca.files import (
    OwnData,
    check_writable,
    private_directory,
    replacing_together,
    stored_path,
    write_atomic,
)
from ca.issue import counted
from ca.keepers import SERVER_DIR_FILES, SERVER_FILES, Footprint, check_free, openvpn_keeper
from ca.keys import KeyType
from ca.pem import certs_pem, private_key_pem
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow, CertificateRow, CrlRow
from ca.store.models_openvpn import OpenVpnClientRow, OpenVpnRow
from ca.tlscryptv2 import (
    SERVER_KEY_LEN,
    STATIC_KEY_LEN,
    Metadata,
    SecretVault,
    ServerKey,
    StaticKey,
    new_client_key,
)
from ca.tlsleaf import TlsLeafRequest, Usage, issue_tls_leaf

__all__ = [
    "CLIENT_PROFILE",
    "OPENVPN",
    "PRIVATE_FILES",
    "REPLACED_BY",
    "SERVER_DIR_FILES",
    "SERVER_PROFILE",
    "WITHDRAWN_BY",
    "ClientInfo",
    "ClientProfile",
    "ClientRequest",
    "ClientRevoked",
    "ConfigureParams",
    "InitParams",
    "OpenVpnConfig",
    "Proto",
    "ServerCredentials",
    "ServerRequest",
    "TlsCrypt",
    "VpnName",
    "add_client",
    "check_crl_destination",
    "check_crl_directory",
    "check_out_dir",
    "check_pool",
    "client_pool",
    "configure",
    "crl_health",
    "crl_pem",
    "deliver_server_cert",
    "get_config",
    "init_openvpn",
    "issue_server_cert",
    "list_clients",
    "remote_host",
    "renew_client",
    "revoke_client",
    "server_config",
    "write_crl_file",
    "write_crl_files",
    "write_crl_to",
    "write_files",
]

OPENVPN = "vpn"
WITHDRAWN_BY = "openvpn:withdrawn"  # who revoked a certificate never handed over
REPLACED_BY = "openvpn:replaced"  # who revoked the server certificate a renewal replaced
CLIENT_PROFILE = "openvpn-client"
log = logging.getLogger("trellis.openvpn")
SERVER_PROFILE = "openvpn-server"
DEFAULT_CA_TTL = Ttl(365 * 86400)
DEFAULT_CLIENT_TTL = Ttl(30 * 86400)
DEFAULT_SERVER_TTL = Ttl(365 * 86400)
# A crashed ``client add`` leaves its name claimed with no certificate; after this it is free.
PENDING_TIMEOUT = dt.timedelta(minutes=5)
# crl-resign re-signs at 16 h before nextUpdate and the file job runs every minute: a file with
# less than this left means both have been failing for hours.
CRL_WARN_BEFORE = dt.timedelta(hours=12)
CRL_STALE_AFTER = dt.timedelta(minutes=5)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


class Proto(enum.Enum):
    UDP = "udp"
    TCP = "tcp"

    @classmethod
    def parse(cls, text: str) -> Proto:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidInput("proto must be udp or tcp") from None


class TlsCrypt(enum.Enum):
    V2 = "v2"  # a tls-crypt-v2 key per client (OpenVPN 2.5+)
    SHARED = "shared"  # the deployment's one tls-crypt key (older clients)

    @classmethod
    def parse(cls, text: str) -> TlsCrypt:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidInput("tls-crypt must be v2 or shared") from None


@dataclass(frozen=True, slots=True)
class VpnName:
    """A client name or server CN. OpenVPN replaces characters outside ``[A-Za-z0-9._-]`` in
    common names with '_' (``--compat-names`` aside) before scripts, ccd files and status lines
    see them, and a leading '.' or '-' makes a hostile ccd file name or option: refuse them."""

    value: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.value):
            raise InvalidInput(
                f"invalid name {self.value[:70]!r}: 1 to 64 of A-Z a-z 0-9 . _ -, "
                "not starting with '.' or '-'"
            )

    def __str__(self) -> str:
        return self.value


def remote_host(host: str) -> str:
    """Where clients connect: an IP address or a DNS name (written into every profile)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST.fullmatch(host):
        raise InvalidInput(f"invalid remote host {host[:70]!r}: a DNS name or an IP address")
    return host.lower()


# -- the deployment ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenVpnConfig:
    authority: str
    remote: str | None
    port: int
    proto: Proto
    crl_path: Path | None
    server_cn: str | None
    secret_store: str  # "file" or the key backend holding the tls-crypt keys


def _config_of(row: OpenVpnRow) -> OpenVpnConfig:
    return OpenVpnConfig(
        authority=row.authority,
        remote=row.remote,
        port=row.port,
        proto=Proto(row.proto),
        crl_path=Path(row.crl_path) if row.crl_path else None,
        server_cn=row.server_cn,
        secret_store=row.secret_store,
    )


def _row(session: Session, authority: str) -> OpenVpnRow:
    row = session.get(OpenVpnRow, authority)
    if row is None:
        raise NotFound(f"no OpenVPN authority {authority!r}: run 'trellis openvpn init' first")
    return row


def get_config(ctx: Context, authority: str = OPENVPN) -> OpenVpnConfig:
    with Session(ctx.engine) as session:
        return _config_of(_row(session, authority))


@dataclass(frozen=True, slots=True)
class InitParams:
    name: str = OPENVPN
    key_type: KeyType = KeyType.EC_P256
    root_key_type: KeyType = KeyType.EC_P384
    key_backend: str | None = None
    ca_ttl: Ttl = DEFAULT_CA_TTL
    force: bool = False
    actor: str = "cli"
    given_at: dt.datetime | None = None  # AuthorityParams.given_at

    def __post_init__(self) -> None:
        # Before the command sets anything up: 'mesh' and 'gateway' are never a VPN's.
        check_name(self.name, "openvpn")


def init_openvpn(ctx: Context, params: InitParams) -> OpenVpnConfig:
    """The CA hierarchy, then the control-channel keys in the same key store as the CA keys.
    With ``force`` the previous deployment's rows and sealed keys go once the new one exists."""
    exists = f"OpenVPN authority {params.name!r} exists: only a forced init replaces it"
    with Session(ctx.engine) as session:
        if session.get(OpenVpnRow, params.name) is not None and not params.force:
            raise Conflict(exists)
        # force must never wipe the mesh (or a gateway) because of a name typed here
        check_purpose(session.get(AuthorityRow, params.name), "openvpn")
    try:
        issuer = init_authority(
            ctx,
            AuthorityParams(
                None,
                name=params.name,
                purpose="openvpn",
                key_type=params.key_type,
                root_key_type=params.root_key_type,
                key_backend=params.key_backend,
                ca_ttl=params.ca_ttl,
                svid_ttl=Ttl(max(params.ca_ttl.seconds // 12, 1)),  # unused: no SVIDs here
                force=params.force,
                actor=params.actor,
                given_at=params.given_at,
            ),
        )
    except AuthorityExists:
        if params.force:
            raise
        raise AuthorityExists(exists) from None  # a concurrent init made it: not the mesh's words
    made = frozenset(format(root.serial_number, "x") for root in issuer.roots)
    vault = SecretVault.for_backend(ctx, load_authority(ctx, params.name).key_backend)
    created: list[str] = []
    try:
        created.append(
            vault.put(f"openvpn-{params.name}-tls-crypt-v2-server", ServerKey.generate().raw)
        )
        created.append(vault.put(f"openvpn-{params.name}-tls-crypt", StaticKey.generate().raw))
        config, stale = _record_deployment(ctx, params, made, vault.store, created)
    except BaseException:
        for ref in created:
            vault.destroy(ref)
        raise
    for store, *refs in stale:
        for ref in refs:
            SecretVault(ctx, store).destroy(ref)
    return config


def _record_deployment(
    ctx: Context, params: InitParams, made: frozenset[str], store: str, refs: list[str]
) -> tuple[OpenVpnConfig, list[tuple[str, str, str]]]:
    """Record the control-channel keys of the CA ``init_openvpn`` made (its roots: ``made``);
    returns the deployment and the keys of the one it replaced, to destroy once committed.
    In the inits' turn (``initialising``): a concurrent ``--force`` that replaced the CA after
    this one made it is refused here, so the keys recorded always go with the CA recorded."""
    v2_ref, shared_ref = refs
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        initialising(session, params.name)
        if roots_of(session, params.name) != made:
            raise AuthorityExists(
                f"another init replaced OpenVPN authority {params.name!r} while this one ran:"
                " it was not replaced again (run it again to replace the new one)"
            )
        old = session.get(OpenVpnRow, params.name)
        stale = [(old.secret_store, old.tls_crypt_v2_ref, old.tls_crypt_ref)] if old else []
        session.execute(
            sa.delete(OpenVpnClientRow).where(col(OpenVpnClientRow.authority) == params.name)
        )
        if old is not None:
            session.delete(old)
            session.flush()
        row = OpenVpnRow(
            authority=params.name,
            secret_store=store,
            tls_crypt_v2_ref=v2_ref,
            tls_crypt_ref=shared_ref,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        detail = {"key_store": store, "replaced": old is not None}
        audit.record(
            session, "openvpn.initialised", params.name, actor=params.actor, at=now, detail=detail
        )
        session.commit()
        return _config_of(row), stale


@dataclass(frozen=True, slots=True)
class ConfigureParams:
    remote: str | None = None
    port: int | None = None
    proto: Proto | None = None
    crl_path: Path | None = None
    server_cn: VpnName | None = None
    actor: str = "cli"


def configure(ctx: Context, params: ConfigureParams, authority: str = OPENVPN) -> OpenVpnConfig:
    """Change what is given, keep the rest; a new CRL path gets the current CRLs at once."""
    if params.port is not None and not 1 <= params.port <= 65535:
        raise InvalidInput("port must be between 1 and 65535")
    with Session(ctx.engine) as session:
        row = _row(session, authority)
        if params.remote is not None:
            row.remote = remote_host(params.remote)
        if params.port is not None:
            row.port = params.port
        if params.proto is not None:
            row.proto = params.proto.value
        if params.crl_path is not None:
            target = conf_path(params.crl_path, "the CRL path")
            own = ctx.settings.own_data()
            row.crl_path = str(
                check_crl_destination(session, authority, target, "the CRL path", own)
            )
            check_crl_directory(target, "the CRL path")
        if params.server_cn is not None:
            _check_not_a_client(session, authority, params.server_cn)
            row.server_cn = params.server_cn.value
        remote = row.remote or ""
        if params.remote is not None and row.server_cn is None and not _NAME.fullmatch(remote):
            fix = "give the server CN with it"
            raise InvalidInput(_remote_not_a_cn(remote, fix))
        row.updated_at = ctx.clock.now()
        session.add(row)
        config = _config_of(row)
        _record_configured(session, row, params.actor)
        session.commit()
    if params.crl_path is not None:
        write_crl_file(ctx, authority)
    return config


def _record_configured(session: Session, row: OpenVpnRow, actor: str) -> None:
    """``openvpn.configured`` with the whole configuration as it now stands, whichever command
    changed it (configure, or server-config recording its CN, directory and CRL file)."""
    detail = {
        "remote": row.remote,
        "port": row.port,
        "proto": row.proto,
        "crl_path": row.crl_path,
        "server_cn": row.server_cn,
        "server_dir": row.server_dir,
    }
    audit.record(
        session, "openvpn.configured", row.authority, actor=actor, at=row.updated_at, detail=detail
    )


# What a path written into server.conf may hold: OpenVPN splits a directive's arguments at
# whitespace, reads quotes and backslashes, and a line break would start a directive of the
# caller's choosing ("crl-verify /x\nscript-security 2").
_CONF_PATH_UNSAFE = re.compile(r"[\x00-\x20\x7f\"'\\#;]")


def conf_path(path: Path, what: str) -> Path:
    """``path`` (absolute, resolved) if it can be written into server.conf as it is."""
    text = str(path)
    if not path.is_absolute():
        raise InvalidInput(f"{what} must be an absolute path, not {text[:80]!r}")
    if _CONF_PATH_UNSAFE.search(text):
        raise InvalidInput(
            f"{what} {text[:80]!r} is written into OpenVPN's server.conf: it may not hold"
            " spaces, control characters, quotes, backslashes, '#' or ';'"
        )
    resolved = path.resolve()
    if _CONF_PATH_UNSAFE.search(str(resolved)):  # a symlink on the way leads somewhere odd
        raise InvalidInput(f"{what} {text[:80]!r} resolves to a path server.conf cannot hold")
    return stored_path(resolved, what)


def check_crl_destination(
    session: Session, authority: str, path: Path, what: str, own: OwnData
) -> Path:
    """``path``, resolved, if the authority's CRLs may be written there: by ``configure
    --crl-path`` (for ever after) or ``trellis openvpn crl --out`` (once). An existing file that
    is not a CRL file (an empty one aside) is never overwritten: the REST API lets an admin
    token set the path, and neither it nor a mistyped ``--out`` may turn a key, a database or a
    gateway's ``client-ca.pem`` into a file of CRLs. Nor may a file another authority or a
    gateway truststore keeps current (``ca.keepers``): their readers would get these CRLs.
    Nor, empty or missing, a name of Trellis's own data (``own``)."""
    path = path.resolve()  # a symlink or '..' names the file it leads to
    if own.holds(path):
        raise InvalidInput(f"{what}: {path} is Trellis's own data: choose another path")
    if path.exists():
        try:
            data = path.read_bytes() if path.is_file() else None
        except OSError as error:
            raise InvalidInput(f"cannot read {path}: {error.strerror}") from None
        if data is None or (data.strip() and _CRL_BLOCK.sub(b"", data).strip()):
            raise InvalidInput(f"{path} exists and is not a CRL file: refusing to overwrite it")
    check_free(session, openvpn_keeper(authority), Footprint.of([path]), what)
    return path


def check_crl_directory(path: Path, what: str) -> None:
    """Refuse a CRL path whose directory does not exist, when it is set and on every write: the
    directory is the operator's (OpenVPN's, on its server). Making it would turn a mistyped
    ``--crl-path`` into a file no server reads, and a directory gone since (OpenVPN removed, a
    volume not mounted yet) into a tree of Trellis's own, the job reporting "ok" all along."""
    if not path.parent.is_dir():
        raise InvalidInput(
            f"{what} {path}: {path.parent} is not an existing directory (Trellis does not"
            " create it: create it, or set another path with configure)"
        )


def write_crl_to(ctx: Context, path: Path, authority: str = OPENVPN) -> Path:
    """Write the authority's CRLs to ``path`` once (``trellis openvpn crl --out``), where
    ``check_crl_destination`` allows it; nothing is recorded."""
    with Session(ctx.engine) as session:
        _row(session, authority)
        check_crl_destination(
            session, authority, path, f"the output {path}", ctx.settings.own_data()
        )
    write_atomic(path, crl_pem(ctx, authority))
    return path


def _check_not_a_client(session: Session, authority: str, name: VpnName) -> None:
    if session.get(OpenVpnClientRow, (authority, name.value)) is not None:
        raise Conflict(f"{name} is a client name: the server CN must differ from every client")


def _openvpn_issuer(ctx: Context, authority: str) -> Issuer:
    if load_authority(ctx, authority).purpose != "openvpn":
        raise InvalidInput(f"authority {authority!r} is not an OpenVPN authority")
    return active_issuer(ctx, authority)


# -- the server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerRequest:
    authority: str = OPENVPN
    common_name: VpnName | None = None  # default: the configured server CN, else the remote
    key_type: KeyType = KeyType.EC_P256
    ttl: Ttl = DEFAULT_SERVER_TTL
    requested_by: str = "cli"


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    common_name: str
    serial: Serial
    not_after: dt.datetime
    certificate_pem: bytes  # the leaf, then the chain: what OpenVPN's ``cert`` file holds
    key_pem: bytes


def check_out_dir(ctx: Context, authority: str, out_dir: Path, names: Iterable[str]) -> None:
    """Refuse, before anything is issued, to write ``names`` into ``out_dir`` when one of them
    cannot be written there (``check_writable``: a directory in its place, a path through a
    regular file, a read-only file system), or when another authority or a truststore keeps one
    of them current (``ca.keepers``): the two would overwrite each other, and the other's
    server would present this one's certificate. A certificate issued for a directory it
    cannot reach would be withdrawn again (``deliver_server_cert``), its key lost."""
    check_writable(out_dir, directory=True, what=f"the server directory {out_dir}")
    for name in names:
        check_writable(out_dir / name, directory=False)
    with Session(ctx.engine) as session:
        check_free(
            session,
            openvpn_keeper(authority),
            Footprint.of(out_dir.absolute() / name for name in names),
            f"the server directory {out_dir}",
        )


def issue_server_cert(ctx: Context, request: ServerRequest) -> ServerCredentials:
    """A serverAuth-only leaf (``remote-cert-tls server``), by default for the CN profiles pin
    with ``verify-x509-name``. Another CN (a second server's) leaves the pinned one alone: only
    ``configure --server-cn`` and ``server-config --cn`` change what every profile trusts."""
    with counted(request.authority, SERVER_PROFILE):
        return _server_cert(ctx, request)


def _server_cert(ctx: Context, request: ServerRequest) -> ServerCredentials:
    issuer = _openvpn_issuer(ctx, request.authority)
    with Session(ctx.engine) as session:
        row = _row(session, request.authority)
        name = request.common_name or _default_server_cn(row)
        _check_not_a_client(session, request.authority, name)
    key = request.key_type.generate()
    dns = [name.value] if _is_dns_name(name.value) else []
    issued = issue_tls_leaf(
        ctx,
        TlsLeafRequest(
            request.authority,
            SERVER_PROFILE,
            name.value,
            Usage.SERVER,
            key.public_key(),
            request.ttl,
            request.requested_by,
            dns_names=dns,
        ),
    )
    return ServerCredentials(
        common_name=name.value,
        serial=issued.serial,
        not_after=issued.certificate.not_valid_after_utc,
        certificate_pem=issued.certificate_pem + issuer.chain_pem,
        key_pem=private_key_pem(key),
    )


def _default_server_cn(row: OpenVpnRow) -> VpnName:
    """The CN profiles pin (``verify-x509-name``): the configured server CN, else the remote
    host. A remote that cannot be a CN (an IPv6 address, a host name over 64 characters) pins a
    name no server certificate can carry: every client of such a profile would fail."""
    if row.server_cn is not None:
        return VpnName(row.server_cn)
    if row.remote is None:
        raise Conflict("no server CN yet: give one, or configure a server CN or the remote first")
    if not _NAME.fullmatch(row.remote):
        fix = "configure a server CN"
        raise Conflict(_remote_not_a_cn(row.remote, fix))
    return VpnName(row.remote)


def _remote_not_a_cn(remote: str, fix: str) -> str:
    return (
        f"the remote {remote[:70]!r} cannot be the server's CN (1 to 64 of A-Z a-z 0-9 . _ -),"
        f" which profiles pin with verify-x509-name when no server CN is set: {fix}"
    )


def _is_dns_name(value: str) -> bool:
    return bool(_HOST.fullmatch(value)) and not value.replace(".", "").isdigit()


SERVER_CONF = """\
# OpenVPN server configuration for the Trellis authority "{authority}".
# File names are relative to the directory openvpn runs in (openvpn --cd DIR, as the
# openvpn-server@.service unit does). Trellis rewrites the CRL file on every revocation.
port {port}
proto {proto}
dev tun
topology subnet
server {network} {netmask}
keepalive 10 60
persist-key
persist-tun
ca ca.pem
cert server.crt
key server.key
dh none
tls-version-min 1.2
remote-cert-tls client
tls-crypt-v2 tls-crypt-v2.key
# Only clients created with --tls-crypt shared use this key; delete the line if there are none.
tls-crypt tls-crypt.key
crl-verify {crl_verify}
verb 3
"""

PRIVATE_FILES = frozenset({"server.key", "tls-crypt-v2.key", "tls-crypt.key"})
DEFAULT_POOL = ipaddress.IPv4Network("10.8.0.0/24")


def client_pool(text: str) -> ipaddress.IPv4Network:
    """The ``server NETWORK NETMASK`` pool from ``10.8.0.0/24``, as OpenVPN accepts it."""
    try:
        network = ipaddress.IPv4Network(text.strip())
    except ValueError:
        raise InvalidInput(
            f"network {text[:40]!r} is not an IPv4 network such as 10.8.0.0/24"
            " (host bits zero; OpenVPN's server directive takes no IPv6)"
        ) from None
    check_pool(network)
    return network


def check_pool(network: ipaddress.IPv4Network) -> None:
    """What OpenVPN 2.6's ``server`` directive refuses at start-up (helper.c, checked against the
    binary): with ``dev tun`` a pool smaller than /29 or larger than /16, and a network address
    of 0.0.0.0, which it fails to parse."""
    if not 16 <= network.prefixlen <= 29:
        raise InvalidInput(f"network {network}: OpenVPN's server directive takes a /16 to /29 pool")
    if int(network.network_address) == 0:
        raise InvalidInput(f"network {network}: OpenVPN cannot parse a 0.0.0.0 server network")


def server_config(
    ctx: Context,
    request: ServerRequest,
    network: ipaddress.IPv4Network | None = None,
    out_dir: Path | None = None,
) -> dict[str, bytes]:
    """Every file of a server directory, by name (``PRIVATE_FILES`` are secrets), with a freshly
    issued server certificate. Given ``out_dir``, the files are written there, all or none
    (``write_files``), and it becomes the directory the ``openvpn-server-certificate`` job
    renews into and, with no CRL path configured yet, its ``crl.pem`` the CRL file Trellis
    keeps current. A ``--cn`` becomes the CN profiles pin. Each change of the configuration is
    in the audit trail (``openvpn.configured``). If the files are not delivered, whatever stops
    them, the certificate is withdrawn and nothing is recorded: its key existed only here."""
    network = network or DEFAULT_POOL
    check_pool(network)
    # Every path is judged before anything is issued (``conf_path``): the one stored before
    # paths were checked, or the directory's crl.pem that is about to become the CRL file.
    stored = get_config(ctx, request.authority).crl_path
    own_crl = None if out_dir is None else (out_dir / "crl.pem").absolute()
    if stored is None and own_crl is not None:
        own_crl = conf_path(own_crl, "the server directory's crl.pem (the CRL file from now on)")
    elif stored is not None and (own_crl is None or stored != own_crl.resolve()):
        conf_path(stored, "the configured CRL path (set another with configure)")
    if out_dir is not None:
        # this directory's certificate is renewed here from now on, and maybe its crl.pem
        stored_path(out_dir.resolve(), "the server directory")
        check_out_dir(ctx, request.authority, out_dir, SERVER_DIR_FILES)
    issuer = active_issuer(ctx, request.authority)
    crl = crl_pem(ctx, request.authority)
    credentials = issue_server_cert(ctx, request)
    with (
        certs.withdrawn_unless_delivered(ctx, credentials.serial, WITHDRAWN_BY),
        Session(ctx.engine) as session,
    ):
        row = _row(session, request.authority)
        # Read before the row changes: a query would flush the change and take the
        # database's write lock while the files are staged.
        keys = SecretVault(ctx, row.secret_store)
        v2 = keys.get(row.tls_crypt_v2_ref, length=SERVER_KEY_LEN)
        shared = keys.get(row.tls_crypt_ref, length=STATIC_KEY_LEN)
        before = (row.server_cn, row.crl_path, row.server_dir)
        if request.common_name is not None or row.server_cn is None:
            row.server_cn = credentials.common_name
        if out_dir is not None:
            if row.crl_path is None:
                row.crl_path = str(own_crl)
            row.server_dir = str(out_dir.resolve())
            row.server_ttl_seconds = request.ttl.seconds
            row.server_key_type = request.key_type.value
        if (row.server_cn, row.crl_path, row.server_dir) != before:
            row.updated_at = ctx.clock.now()
            _record_configured(session, row, request.requested_by)
        session.add(row)
        config = _config_of(row)
        here = own_crl is not None and config.crl_path == own_crl.resolve()
        crl_verify = "crl.pem" if config.crl_path is None or here else str(config.crl_path)
        conf = SERVER_CONF.format(
            authority=request.authority,
            port=config.port,
            proto=config.proto.value,
            network=network.network_address,
            netmask=network.netmask,
            crl_verify=crl_verify,
        )
        files = {
            "server.conf": conf.encode(),
            "ca.pem": issuer.chain_pem + issuer.bundle_pem,
            "server.crt": credentials.certificate_pem,
            "server.key": credentials.key_pem,
            "tls-crypt-v2.key": ServerKey(v2).pem,
            "tls-crypt.key": StaticKey(shared).pem,
            "crl.pem": crl,
        }
        assert tuple(files) == SERVER_DIR_FILES
        # The directory, CN and CRL file are recorded once the files are in place, and the
        # files are put back if that fails: nothing delivered, nothing changed.
        with _replacing(files, out_dir):
            session.commit()
    return files


RENEW_SERVER_AFTER = 2 / 3


def renew_server_certificates(ctx: Context) -> list[str]:
    """The scheduled job: re-issue the certificate in each recorded server directory past 2/3
    of its life, or once issuing has moved to another root (a root rotation's switch), with its
    own CN, into that directory. It is judged by the ``server.crt`` found there, not by the
    authority's newest server certificate: a second server's certificate (``server-cert --out
    elsewhere``) says nothing about this one. A directory without a readable ``server.crt`` gets
    a fresh one for the deployment's CN; one holding a certificate this authority did not issue
    is left alone (logged). The others then get their ``ca.pem`` and chain brought up to date
    (``_current_chains``). The certificate a renewal replaced, if live, is revoked
    (``_revoke_replaced``). OpenVPN reads these files at start-up, so the server must then be
    restarted (the CRL, by contrast, is re-read per handshake)."""
    now = ctx.clock.now()
    due: list[tuple[OpenVpnRow, _Renewal]] = []
    ours: list[OpenVpnRow] = []
    failing: dict[str, str] = {}  # authority: what stops its renewal
    with Session(ctx.engine) as session:
        rows = session.exec(select(OpenVpnRow).where(col(OpenVpnRow.server_dir).is_not(None))).all()
    for row in rows:
        assert row.server_dir is not None
        try:
            issuer = active_issuer(ctx, row.authority)
        except (NotInitialised, Unavailable) as exc:  # one authority's: the others go on
            failing[row.authority] = exc.detail
            continue
        with Session(ctx.engine) as session:
            renewal = _renewal(session, row.authority, Path(row.server_dir), now, issuer)
        if renewal is not None:
            ours.append(row)
            if renewal.due:
                due.append((row, renewal))
    renewed = []
    for row, renewal in due:
        assert row.server_dir is not None
        directory = Path(row.server_dir)
        try:
            # Before anything is issued: a directory that cannot take the files would get a
            # certificate, withdrawn at once, on every run of the job.
            check_out_dir(ctx, row.authority, directory, SERVER_FILES)
        except InvalidInput as exc:
            failing[row.authority] = exc.detail
            continue
        credentials = issue_server_cert(
            ctx,
            ServerRequest(
                authority=row.authority,
                common_name=renewal.cn,
                key_type=KeyType(row.server_key_type or KeyType.EC_P256.value),
                ttl=Ttl(row.server_ttl_seconds or DEFAULT_SERVER_TTL.seconds),
                requested_by="scheduler",
            ),
        )
        deliver_server_cert(ctx, credentials, directory)
        if renewal.replaced is not None:
            _revoke_replaced(ctx, renewal.replaced)
        log.warning(
            "renewed the OpenVPN server certificate in %s (serial %s): restart openvpn to load it",
            directory,
            credentials.serial,
        )
        renewed.append(f"{row.authority}: {credentials.serial.hex[:12]}")
    for row in ours:
        assert row.server_dir is not None
        if row.authority in failing:
            continue
        try:
            rewritten = _current_chains(ctx, row.authority, Path(row.server_dir))
        except InvalidInput as exc:
            failing[row.authority] = exc.detail
            continue
        if rewritten:
            renewed.append(f"{row.authority}: {' and '.join(rewritten)}")
    if failing:
        # The server's files, not the caller's input: the job fails (``/readyz``) until fixed.
        raise Unavailable(
            "cannot renew the OpenVPN server certificate: "
            + "; ".join(f"{name}: {detail}" for name, detail in failing.items())
        )
    return renewed


def _current_chains(ctx: Context, authority: str, directory: Path) -> list[str]:
    """Bring what ``server-config`` wrote once up to date with the active issuer: ``ca.pem``
    (its chain, then the bundle) and the chain after a ``server.crt`` it issued; what was
    rewritten. A root rotation changes both while the certificate stays good: left alone,
    after the retire ``ca.pem`` still trusted only the retired root, so the server refused every
    client issued since, and ``server.crt`` went on sending "B signed by A", the cross
    certificate the retire revoked (docs/rotation.md: retiring "ends every trust path through
    it"). The key is not touched: each file is replaced alone, in one rename."""
    issuer = active_issuer(ctx, authority)
    wanted = {"ca.pem": issuer.chain_pem + issuer.bundle_pem}
    try:
        served = x509.load_pem_x509_certificates((directory / "server.crt").read_bytes())
    except (OSError, ValueError):
        served = []
    if served and served[0].issuer == issuer.certificate.subject:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            served[0].verify_directly_issued_by(issuer.certificate)
            wanted["server.crt"] = certs_pem(served[:1]) + issuer.chain_pem
    stale: dict[str, bytes] = {}
    for name, data in wanted.items():
        try:
            if (directory / name).read_bytes() == data:
                continue
        except OSError:
            pass
        stale[name] = data
    if not stale:
        return []
    check_out_dir(ctx, authority, directory, stale)
    for name, data in stale.items():
        write_atomic(directory / name, data)
    log.warning(
        "wrote the current chain of OpenVPN authority %r into %s in %s: restart openvpn to load it",
        authority,
        " and ".join(stale),
        directory,
    )
    return [f"{name} chain" for name in stale]


def _revoke_replaced(ctx: Context, serial: Serial) -> None:
    """The renewal is in the directory: the certificate it replaced is superseded (RFC 5280
    §5.3.1). Left valid, the one replaced at a root rotation's switch held the old root's
    retirement up until the old intermediate expired. OpenVPN goes on presenting it until it
    is restarted, which no client minds: Trellis's profiles check the server's certificate
    against ``<ca>`` and its name (``remote-cert-tls``, ``verify-x509-name``), never a CRL. A
    failure is logged, not raised: the renewal stands."""
    try:
        certs.revoke_certificate(ctx, serial, RevocationReason.SUPERSEDED, REPLACED_BY)
    except Conflict:
        pass  # revoked meanwhile
    except Exception as exc:  # the renewal stands whatever this is
        log.warning(
            "the replaced OpenVPN server certificate %s stays valid: it could not be revoked"
            " (%s: %s): revoke it by hand",
            serial,
            type(exc).__name__,
            exc,
        )


@dataclass(frozen=True, slots=True)
class _Renewal:
    cn: VpnName | None  # the installed certificate's CN; None: the deployment's
    due: bool = True
    replaced: Serial | None = None  # the installed certificate, live: revoked once replaced


def _renewal(
    session: Session, authority: str, directory: Path, now: dt.datetime, issuer: Issuer
) -> _Renewal | None:
    """Whether the server certificate in ``directory`` is due, judged by its own record; None
    for a certificate this authority did not issue. One issued under another root than the
    active issuer's is due (a root rotation's switch): once the old root is retired nothing
    chains it to the root that profiles issued since trust."""
    try:
        leaf = x509.load_pem_x509_certificates((directory / "server.crt").read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return _Renewal(None)  # gone or unreadable: a fresh one for the deployment
    row = session.get(CertificateRow, format(leaf.serial_number, "x"))
    if row is None or row.authority != authority or row.profile != SERVER_PROFILE:
        log.warning(
            "%s holds no server certificate of OpenVPN authority %r: not renewing it",
            directory / "server.crt",
            authority,
        )
        return None
    renew_at = row.not_before + (row.not_after - row.not_before) * RENEW_SERVER_AFTER
    cn = VpnName(row.spiffe_id.removeprefix("CN="))
    live = row.status == "active" and row.not_after > now
    return _Renewal(
        cn,
        due=row.status != "active" or now >= renew_at or _moved(session, row, issuer),
        replaced=Serial.parse(row.serial) if live else None,
    )


def _moved(session: Session, row: CertificateRow, issuer: Issuer) -> bool:
    """Whether ``row`` was issued under another root than the one ``issuer`` is under."""
    signed_by, active = session.get(CaRow, row.issuer_ca_id), session.get(CaRow, issuer.ca_id)
    return signed_by is None or active is None or signed_by.parent_id != active.parent_id


def write_files(files: dict[str, bytes], directory: Path) -> list[Path]:
    """Secrets 0600 from their first byte, the rest 0644, in a directory created 0700 (refused
    if others may write to it); the files replace those there all together or not at all
    (``replacing_together``): a new ``server.key`` beside the old ``server.crt`` is a server
    that no longer starts."""
    with _replacing(files, directory):
        pass
    return [directory / name for name in files]


def _replacing(
    files: dict[str, bytes], directory: Path | None
) -> contextlib.AbstractContextManager[None]:
    if directory is None:
        return contextlib.nullcontext()
    private_directory(directory)
    return replacing_together(
        {
            directory / name: (data, 0o600 if name in PRIVATE_FILES else 0o644)
            for name, data in files.items()
        }
    )


def deliver_server_cert(
    ctx: Context, credentials: ServerCredentials, directory: Path
) -> list[Path]:
    """``server.crt`` and ``server.key`` into ``directory`` (``write_files``), or the
    certificate withdrawn (revoked ``superseded``, actor ``openvpn:withdrawn``) if they do not
    get there, Ctrl-C included: Trellis keeps no copy of the key."""
    files = {"server.crt": credentials.certificate_pem, "server.key": credentials.key_pem}
    with certs.withdrawn_unless_delivered(ctx, credentials.serial, WITHDRAWN_BY):
        return write_files(files, directory)


# -- clients ----------------------------------------------------------------------------------

CLIENT_OVPN = """\
# OpenVPN client profile "{name}" from the Trellis authority "{authority}".
# Certificate serial {serial}, valid until {not_after}. Keep this file private: it holds the key.
client
dev tun
proto {proto}
remote {remote} {port}
nobind
persist-key
persist-tun
remote-cert-tls server
verify-x509-name {server_cn} name
tls-version-min 1.2
verb 3
<ca>
{ca}</ca>
<cert>
{cert}</cert>
<key>
{key}</key>
<{wrap}>
{wrap_key}</{wrap}>
"""


@dataclass(frozen=True, slots=True)
class ClientRequest:
    name: VpnName
    authority: str = OPENVPN
    ttl: Ttl = DEFAULT_CLIENT_TTL
    tls_crypt: TlsCrypt | None = None  # None: v2 for a new client, unchanged on renewal
    key_type: KeyType = KeyType.EC_P256
    requested_by: str = "cli"


@dataclass(frozen=True, slots=True)
class ClientProfile:
    name: str
    serial: Serial
    not_after: dt.datetime
    tls_crypt: TlsCrypt
    ovpn: bytes


@dataclass(frozen=True, slots=True)
class ClientInfo:
    name: str
    status: str  # active | revoked | expired | pending (being issued)
    serial: str | None
    not_after: dt.datetime | None
    revoked_at: dt.datetime | None
    tls_crypt: TlsCrypt
    created_at: dt.datetime


def _identity(name: str) -> str:
    return f"CN={name}"


def _live_certificates(session: Session, authority: str, name: str, now: dt.datetime) -> list[str]:
    return list(
        session.exec(
            select(CertificateRow.serial).where(
                CertificateRow.authority == authority,
                CertificateRow.profile == CLIENT_PROFILE,
                CertificateRow.spiffe_id == _identity(name),
                CertificateRow.status == "active",
                col(CertificateRow.not_after) > now,
            )
        ).all()
    )


@dataclass(frozen=True, slots=True)
class _Claim:
    claimed_at: dt.datetime
    previous: str | None  # the serial the name had, to supersede or to restore on failure
    created: bool
    tls_crypt: TlsCrypt


def _claim(ctx: Context, request: ClientRequest, *, renew: bool) -> _Claim:
    """Take the name for one issuance. A new row collides on the primary key; an existing row is
    taken by compare-and-swap on (serial, claimed_at), so of two concurrent claims on any number
    of replicas exactly one wins and the other gets ``Conflict`` (409)."""
    authority, name, now = request.authority, request.name.value, ctx.clock.now()
    with Session(ctx.engine) as session:
        config = _row(session, authority)
        if config.remote is None:
            raise Conflict("where do clients connect? configure the remote first")
        # Profiles verify the server as the configured CN, else the remote host: either way a
        # client holding that name could pose as the server to the other clients.
        if name == _default_server_cn(config).value:
            raise Conflict(f"{name} is the server's CN: a client must have another name")
        row = session.get(OpenVpnClientRow, (authority, name))
        live = _live_certificates(session, authority, name, now)
        if row is None:
            if renew:
                raise NotFound(f"no OpenVPN client {name!r}")
            if live:
                raise Conflict(f"client {name!r} already has a live certificate")
            tls_crypt = request.tls_crypt or TlsCrypt.V2
            session.add(
                OpenVpnClientRow(
                    authority=authority,
                    name=name,
                    serial=None,
                    tls_crypt=tls_crypt.value,
                    claimed_at=now,
                    created_at=now,
                )
            )
            try:
                session.commit()
            except sa.exc.IntegrityError:
                raise Conflict(f"client {name!r} is being added right now") from None
            return _Claim(now, None, True, tls_crypt)
        pending = row.serial is None and now - row.claimed_at < PENDING_TIMEOUT
        if pending:
            raise Conflict(f"client {name!r} is being issued right now")
        if not renew and live:
            raise Conflict(f"client {name!r} already has a live certificate: renew or revoke it")
        if renew and row.serial is not None:
            current = session.get(CertificateRow, row.serial)
            if current is not None and current.status == "revoked":
                raise Conflict(f"client {name!r} was revoked: add it again to onboard it anew")
        tls_crypt = request.tls_crypt or TlsCrypt(row.tls_crypt)
        previous, claimed_at = row.serial, row.claimed_at  # the commit below expires ``row``
        taken = session.execute(
            sa.update(OpenVpnClientRow)
            .where(
                col(OpenVpnClientRow.authority) == authority,
                col(OpenVpnClientRow.name) == name,
                col(OpenVpnClientRow.claimed_at) == claimed_at,
                (col(OpenVpnClientRow.serial) == previous)
                if previous is not None
                else col(OpenVpnClientRow.serial).is_(None),
            )
            .values(serial=None, claimed_at=now, tls_crypt=tls_crypt.value)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"client {name!r} is being changed right now")
        session.commit()
        return _Claim(now, previous, False, tls_crypt)


def _settle(ctx: Context, request: ClientRequest, claim: _Claim, serial: str | None) -> None:
    """Record the issued serial, or give the claim back (``serial`` None) after a failure."""
    key = (col(OpenVpnClientRow.authority) == request.authority) & (
        col(OpenVpnClientRow.name) == request.name.value
    )
    with Session(ctx.engine) as session:
        if serial is None and claim.created:
            session.execute(sa.delete(OpenVpnClientRow).where(key))
        else:
            session.execute(
                sa.update(OpenVpnClientRow)
                .where(key, col(OpenVpnClientRow.claimed_at) == claim.claimed_at)
                .values(serial=serial or claim.previous)
            )
        session.commit()


def _issue_profile(ctx: Context, request: ClientRequest, claim: _Claim) -> ClientProfile:
    issuer = _openvpn_issuer(ctx, request.authority)
    with Session(ctx.engine) as session:
        row = _row(session, request.authority)
        config = _config_of(row)
        server_cn = _default_server_cn(row)
        keys = SecretVault(ctx, row.secret_store)
        if claim.tls_crypt is TlsCrypt.V2:
            server = ServerKey(keys.get(row.tls_crypt_v2_ref, length=SERVER_KEY_LEN))
            wrap_key = new_client_key(server, Metadata.timestamp(ctx.clock.now())).pem
        else:
            wrap_key = StaticKey(keys.get(row.tls_crypt_ref, length=STATIC_KEY_LEN)).pem
    key = request.key_type.generate()
    issued = issue_tls_leaf(
        ctx,
        TlsLeafRequest(
            request.authority,
            CLIENT_PROFILE,
            request.name.value,
            Usage.CLIENT,
            key.public_key(),
            request.ttl,
            request.requested_by,
        ),
    )
    not_after = issued.certificate.not_valid_after_utc
    with certs.withdrawn_unless_delivered(ctx, issued.serial, WITHDRAWN_BY):
        ovpn = CLIENT_OVPN.format(
            name=request.name,
            authority=request.authority,
            serial=issued.serial.hex,
            not_after=not_after.isoformat().replace("+00:00", "Z"),
            proto=config.proto.value,
            remote=config.remote,
            port=config.port,
            server_cn=server_cn,
            ca=(issuer.chain_pem + issuer.bundle_pem).decode(),
            cert=(issued.certificate_pem + issuer.chain_pem).decode(),
            key=private_key_pem(key).decode(),
            wrap="tls-crypt-v2" if claim.tls_crypt is TlsCrypt.V2 else "tls-crypt",
            wrap_key=wrap_key.decode(),
        )
    return ClientProfile(
        request.name.value, issued.serial, not_after, claim.tls_crypt, ovpn.encode()
    )


def _issue_settled(ctx: Context, request: ClientRequest, claim: _Claim) -> ClientProfile:
    """Issue and record the serial under the name, or give the claim back and leave no
    certificate live (``withdrawn_unless_delivered``), whatever stops it."""
    try:
        profile = _issue_profile(ctx, request, claim)
        with certs.withdrawn_unless_delivered(ctx, profile.serial, WITHDRAWN_BY):
            _settle(ctx, request, claim, profile.serial.hex)
    except BaseException:
        _settle(ctx, request, claim, None)
        raise
    return profile


def add_client(ctx: Context, request: ClientRequest) -> ClientProfile:
    """Onboard one user: claim the name (409 while it has a live certificate), issue, render."""
    with counted(request.authority, CLIENT_PROFILE):
        return _issue_settled(ctx, request, _claim(ctx, request, renew=False))


def renew_client(ctx: Context, request: ClientRequest) -> ClientProfile:
    """A fresh key, certificate and tls-crypt key. The previous certificate is revoked
    (``superseded``) once the new one exists, so a name never has two live certificates."""
    with counted(request.authority, CLIENT_PROFILE):
        claim = _claim(ctx, request, renew=True)
        profile = _issue_settled(ctx, request, claim)
    if claim.previous is not None:
        # Already revoked by someone else is the outcome we wanted. The revocation rewrites the
        # CRL file itself (ca.certs.publish_revocations).
        with contextlib.suppress(Conflict):
            certs.revoke_certificate(
                ctx,
                Serial.parse(claim.previous),
                RevocationReason.SUPERSEDED,
                request.requested_by,
            )
    return profile


def list_clients(ctx: Context, authority: str = OPENVPN) -> list[ClientInfo]:
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        _row(session, authority)
        rows = session.exec(
            select(OpenVpnClientRow, CertificateRow)
            .join(
                CertificateRow,
                col(CertificateRow.serial) == col(OpenVpnClientRow.serial),
                isouter=True,
            )
            .where(OpenVpnClientRow.authority == authority)
            .order_by(col(OpenVpnClientRow.name))
        ).all()
    infos = []
    for client, cert in rows:
        info = certs.certificate_info(cert, now) if cert is not None else None
        infos.append(
            ClientInfo(
                name=client.name,
                status=info.status.value if info else "pending",
                serial=client.serial,
                not_after=info.not_after if info else None,
                revoked_at=info.revoked_at if info else None,
                tls_crypt=TlsCrypt(client.tls_crypt),
                created_at=client.created_at,
            )
        )
    return infos


@dataclass(frozen=True, slots=True)
class ClientRevoked:
    name: str
    # each with crl_skipped: why its issuer's CRL was not re-signed (a revoked CA, key gone)
    revoked: list[certs.CertificateInfo]
    crl_path: Path | None  # the CRL file rewritten, if one is configured
    crl_error: str | None = None  # why it could not be (the openvpn-crl job keeps trying)


def revoke_client(
    ctx: Context,
    name: VpnName,
    *,
    authority: str = OPENVPN,
    reason: RevocationReason = RevocationReason.CESSATION_OF_OPERATION,
    actor: str = "cli",
) -> ClientRevoked:
    """Offboard one user: every live certificate of the name is revoked (each re-signs its
    issuer's CRL in its own transaction), then the CRL file is rewritten before returning."""
    with Session(ctx.engine) as session:
        _row(session, authority)
        serials = _live_certificates(session, authority, name.value, ctx.clock.now())
        client = session.get(OpenVpnClientRow, (authority, name.value))
        current = session.get(CertificateRow, client.serial) if client and client.serial else None
    if not serials:
        if current is not None and current.status == "revoked":
            raise Conflict(f"client {name} is already revoked")
        raise NotFound(f"client {name} has no live certificate")
    revoked = []
    for serial in serials:
        try:
            revoked.append(
                certs.revoke_certificate(ctx, Serial.parse(serial), reason, actor, publish=False)
            )
        except Conflict:
            continue  # revoked concurrently: it is on the CRL either way
    try:
        return ClientRevoked(name.value, revoked, write_crl_file(ctx, authority))
    except Unavailable as error:
        # The answer goes to REST callers too, who are told no server path (docs/api.md): the
        # whole sentence, with the file and the temporary file's names, is the log's.
        log.warning("revoked %s, but the CRL file was not rewritten: %s", name, error.detail)
        return ClientRevoked(name.value, revoked, get_config(ctx, authority).crl_path, error.public)


# -- the CRL file -----------------------------------------------------------------------------


def _crl_cas(session: Session, authority: str, now: dt.datetime) -> list[CaRow]:
    """Intermediates first (retired ones still vouch for live certificates, prepared ones soon
    will), then roots; expired CAs need no CRL, nor do revoked intermediates.

    A revoked intermediate is listed on its root's CRL, which is in the file: with CRL_CHECK_ALL
    OpenVPN refuses every chain through it at that entry ("certificate revoked" at depth 1,
    tests/openvpn/test_real_openvpn.py), whatever its own CRL would say; a CRL missing at depth
    0 is at worst a VERIFY WARNING, never a pass. Its own CRL would do harm: after an
    emergency revocation its key is often gone, so once its last CRL is due nothing can re-sign
    it, and a file that must hold it could not be written at all; every revocation after that
    would stay out of the file, and within 48 hours every CRL in it expired."""
    rows = session.exec(
        select(CaRow).where(
            CaRow.authority == authority,
            col(CaRow.role).in_(("intermediate", "root")),
            CaRow.state != "revoked",
            col(CaRow.revoked_at).is_(None),
            col(CaRow.not_after) > now,
        )
    ).all()
    return sorted(rows, key=lambda r: (r.role != "intermediate", r.not_before, r.serial))


def crl_pem(ctx: Context, authority: str = OPENVPN) -> bytes:
    """One PEM CRL per unexpired CA of the authority, each re-signed first if it is due. Checked
    before anyone writes it: OpenVPN lets a client in with only a warning when a CA of its chain
    has no CRL, so a file short of one would silently un-revoke that CA's clients."""
    with Session(ctx.engine) as session:
        _row(session, authority)  # not the mesh's, nor a gateway's: not an OpenVPN authority
        cas = _crl_cas(session, authority, ctx.clock.now())
    if not cas:
        raise NotFound(f"authority {authority!r} has no CA")
    data = b"".join(current_crl(ctx, authority, ca.serial).pem for ca in cas)
    uncovered = _uncovered(cas, [x509.load_pem_x509_crl(b) for b in _CRL_BLOCK.findall(data)])
    if uncovered is not None:
        raise Unavailable(
            f"the CRLs of OpenVPN authority {authority!r} lack one for CA {uncovered.serial[:16]}:"
            " not written (OpenVPN would accept that CA's revoked clients)"
        )
    return data


def write_crl_file(ctx: Context, authority: str = OPENVPN) -> Path | None:
    """Replace the configured CRL file atomically when its content changed; None if no path is
    configured. An unchanged file keeps its mtime, so OpenVPN does not reload it for nothing."""
    config = get_config(ctx, authority)
    if config.crl_path is None:
        return None
    # stored before paths were checked (``conf_path``): written nowhere until set again
    conf_path(config.crl_path, "the configured CRL path (set another with configure)")
    with Session(ctx.engine) as session:
        # Judged on every write, not only when the path was set: a file can become something
        # else after ``configure`` (a key moved there, another keeper, a path stored before
        # these checks existed), and the job and every revocation write it unattended.
        try:
            check_crl_destination(
                session,
                authority,
                config.crl_path,
                f"the CRL file of OpenVPN authority {authority!r}",
                ctx.settings.own_data(),
            )
            check_crl_directory(config.crl_path, "the CRL path")
        except InvalidInput as error:
            raise Unavailable(
                f"{error.detail}: not written (set another with configure)",
                public=f"the configured CRL path of OpenVPN authority {authority!r} may not be"
                " written (the server log says why): not written",
            ) from None
    data = crl_pem(ctx, authority)
    try:
        unchanged = config.crl_path.read_bytes() == data
    except OSError:
        unchanged = False
    if not unchanged:
        try:
            write_atomic(config.crl_path, data)
        except OSError as error:
            raise Unavailable(
                f"cannot write the CRL file {config.crl_path}: {error}",
                public=f"cannot write the CRL file of OpenVPN authority {authority!r}:"
                f" {error.strerror or type(error).__name__}",
            ) from None
    return config.crl_path


def write_crl_files(ctx: Context) -> list[Path]:
    """The scheduled job's work: every configured CRL file, current. One failing file does not
    stop the others; the failures are raised together at the end."""
    with Session(ctx.engine) as session:
        names = list(
            session.exec(select(OpenVpnRow.authority).where(col(OpenVpnRow.crl_path).is_not(None)))
        )
    written, failures = [], []
    for name in names:
        try:
            path = write_crl_file(ctx, name)
        except Unavailable as error:
            failures.append(error)
            continue
        if path is not None:
            written.append(path)
    if failures:
        raise Unavailable(
            "; ".join(f.detail for f in failures), public="; ".join(f.public for f in failures)
        )
    return written


def crl_health(ctx: Context) -> Unavailable | None:
    """Why OpenVPN may soon refuse clients, or None: a CRL file that is missing, lacks a CRL for
    a CA, expires within ``CRL_WARN_BEFORE``, or has been older than the stored CRLs for more
    than ``CRL_STALE_AFTER`` (a revocation not yet written). The operator's ``detail`` names the
    file; the ``public`` one, for ``/readyz``, which anyone may read, does not."""
    now = ctx.clock.now()
    problems = []
    with Session(ctx.engine) as session:
        configs = session.exec(select(OpenVpnRow).where(col(OpenVpnRow.crl_path).is_not(None)))
        for config in configs:
            assert config.crl_path is not None
            cas = _crl_cas(session, config.authority, now)
            stored = {ca.id: session.get(CrlRow, ca.id) for ca in cas}
            path = Path(config.crl_path)
            problem = _file_problem(path, cas, stored, now)
            if problem:
                where = f"openvpn {config.authority}: "
                problems.append(
                    (where + problem(f"the CRL file {path}"), where + problem("the CRL file"))
                )
    if not problems:
        return None
    return Unavailable(
        "; ".join(detail for detail, _ in problems),
        public="; ".join(public for _, public in problems),
    )


def _key(cert: x509.Certificate) -> CertificateIssuerPublicKeyTypes:
    return cert.public_key()  # type: ignore[return-value]  # CA keys are EC, RSA or Ed25519


def _crls_of(
    ca: CaRow, crls: list[x509.CertificateRevocationList]
) -> list[x509.CertificateRevocationList]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    return [c for c in crls if c.issuer == cert.subject and c.is_signature_valid(_key(cert))]


def _uncovered(cas: list[CaRow], crls: list[x509.CertificateRevocationList]) -> CaRow | None:
    """The first CA without a CRL it signed among ``crls``. OpenVPN 2.6 sets OpenSSL's
    CRL_CHECK_ALL but lets "unable to get certificate CRL" pass with a VERIFY WARNING, so such
    a CA's revoked certificates (for the root: its revoked intermediates) are accepted."""
    return next((ca for ca in cas if not _crls_of(ca, crls)), None)


def _file_problem(
    path: Path, cas: list[CaRow], stored: dict[int | None, CrlRow | None], now: dt.datetime
) -> Callable[[str], str] | None:
    """The problem of the CRL file at ``path``, as a sentence about the file by whatever name
    it is given: its path for the operator, none for ``/readyz``."""
    try:
        blocks = _CRL_BLOCK.findall(path.read_bytes())
        crls = [x509.load_pem_x509_crl(block) for block in blocks]
    except OSError as error:
        strerror = error.strerror
        return lambda file: f"cannot read {file}: {strerror}"
    except ValueError:
        return lambda file: f"{file} does not parse"
    uncovered = _uncovered(cas, crls)
    if uncovered is not None:
        serial = uncovered.serial[:16]
        return lambda file: (
            f"{file} has no CRL for CA {serial}: OpenVPN accepts that CA's revoked clients"
            " (it only warns)"
        )
    soonest: dt.datetime | None = None
    for ca in cas:
        crl = _crls_of(ca, crls)[0]
        next_update = crl.next_update_utc
        if next_update is not None:
            soonest = next_update if soonest is None else min(soonest, next_update)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        row = stored.get(ca.id)
        if row is not None and row.number > number and now - row.this_update > CRL_STALE_AFTER:
            held = f"CRL #{number} of CA {ca.serial[:16]}, #{row.number} exists"
            return lambda file: f"{file} holds {held}"
    if soonest is not None and soonest <= now:
        when = soonest.isoformat()
        return lambda file: f"the CRL in {file} expired at {when}: OpenVPN refuses every client"
    if soonest is not None and soonest - now < CRL_WARN_BEFORE:
        when = soonest.isoformat()
        return lambda file: f"the CRL in {file} expires at {when}: is the crl job running?"
    return None
