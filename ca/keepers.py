"""Files Trellis keeps rewriting on its own, and who keeps each one.

    OpenVPN authority A   its CRL file (``openvpn.crl_path``, rewritten by every revocation and
                          each minute by the ``openvpn-crl`` job) and every file
                          ``trellis openvpn server-config`` wrote to its server directory
                          (``SERVER_DIR_FILES``; the ``openvpn-server-certificate`` job rewrites
                          ``server.crt`` and ``server.key``, server-config run again all of them)
    gateway truststore    what ``trellis gateway truststore --out`` wrote on one node (rewritten by
                          revocations and the ``gateway-truststores`` job)

Two keepers of one file overwrite each other for ever, and the loser's readers get the winner's
content: an OpenVPN server reading another CA's CRLs lets that authority's revoked clients in
(OpenVPN only warns about a CA without a CRL), nginx reading a VPN CRL refuses every partner, an
OpenVPN server whose ``ca.pem`` is a gateway truststore lets every gateway partner connect. So a
new keeper is refused (``InvalidInput``) when a file it would keep is already kept by another.
Paths are compared resolved (a symlink or ``..`` names the same file). A truststore path on one
node is another file than the same path on another node; an OpenVPN CRL file is written on
every node that runs ``trellis serve`` (the ``openvpn-crl`` job is node-scoped), so it collides
with a truststore on any node.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, col, select

from ca.errors import InvalidInput
from ca.store.models_gateway import GatewayTruststoreRow
from ca.store.models_openvpn import OpenVpnRow

__all__ = [
    "NGINX_FILES",
    "SERVER_DIR_FILES",
    "SERVER_FILES",
    "Footprint",
    "Keeper",
    "check_free",
    "openvpn_keeper",
    "truststore_footprint",
    "truststore_keeper",
]

# What a truststore of each directory format writes (``ca.gateway.build_truststore``).
NGINX_FILES = ("crl.pem", "client-ca.pem")
KONG_FILES = ("README.txt",)
KONG_PATTERNS = ("root-*.pem", "intermediate-*.pem")  # and stale ones of these are deleted
SERVER_FILES = ("server.crt", "server.key")  # what the renewal job rewrites
# What ``ca.openvpn.server_config`` writes to a server directory: OpenVPN reads each of them, so
# the authority keeps them all, not only those a job rewrites (server-config, run again,
# rewrites every one, and until then OpenVPN trusts whatever ``ca.pem`` holds).
SERVER_DIR_FILES = (
    "server.conf",
    "ca.pem",
    "server.crt",
    "server.key",
    "tls-crypt-v2.key",
    "tls-crypt.key",
    "crl.pem",
)


@dataclass(frozen=True, slots=True)
class Keeper:
    """Who keeps a file: an OpenVPN authority, or a truststore recorded on a node."""

    kind: str  # "openvpn" or "truststore"
    name: str  # the authority, or the path the truststore was recorded under
    node: str | None = None  # truststores only

    def __str__(self) -> str:
        if self.kind == "openvpn":
            return f"OpenVPN authority {self.name!r}"
        return f"the gateway truststore written to {self.name} on {self.node}"


def openvpn_keeper(authority: str) -> Keeper:
    return Keeper("openvpn", authority)


def truststore_keeper(node: str, path: Path | str) -> Keeper:
    return Keeper("truststore", str(path), node)


@dataclass(frozen=True, slots=True)
class Footprint:
    """The files one keeper rewrites: named ones, and in ``patterns`` those of a directory whose
    names match (Kong's per-CA files, which also come and go)."""

    files: frozenset[Path]
    patterns: tuple[tuple[Path, tuple[str, ...]], ...] = ()

    @classmethod
    def of(
        cls, files: Iterable[Path], patterns: Iterable[tuple[Path, tuple[str, ...]]] = ()
    ) -> Footprint:
        return cls(
            frozenset(path.resolve() for path in files),
            tuple((directory.resolve(), globs) for directory, globs in patterns),
        )

    def holds(self, path: Path) -> bool:
        return path in self.files or any(
            path.parent == directory and any(fnmatch.fnmatchcase(path.name, g) for g in globs)
            for directory, globs in self.patterns
        )

    def shared_with(self, other: Footprint) -> Path | None:
        """A file both keep, if any."""
        for path in sorted(self.files):
            if other.holds(path):
                return path
        for path in sorted(other.files):
            if self.holds(path):
                return path
        for directory, _ in self.patterns:
            if any(directory == theirs for theirs, _ in other.patterns):
                return directory
        return None


def truststore_footprint(format: str, path: Path) -> Footprint:
    if format == "nginx":
        return Footprint.of(path / name for name in NGINX_FILES)
    if format == "kong":
        return Footprint.of((path / name for name in KONG_FILES), [(path, KONG_PATTERNS)])
    return Footprint.of([path])


def _openvpn_footprint(row: OpenVpnRow) -> Footprint:
    files = [Path(row.crl_path)] if row.crl_path else []
    if row.server_dir:
        files += [Path(row.server_dir) / name for name in SERVER_DIR_FILES]
    return Footprint.of(files)


def _kept(session: Session, keeper: Keeper) -> list[tuple[Keeper, Footprint]]:
    """Every other keeper that could collide with ``keeper``."""
    kept = [
        (openvpn_keeper(row.authority), _openvpn_footprint(row))
        for row in session.exec(select(OpenVpnRow)).all()
    ]
    stores = select(GatewayTruststoreRow)
    if keeper.kind == "truststore":  # the same path on another node is another file
        stores = stores.where(col(GatewayTruststoreRow.node) == keeper.node)
    kept += [
        (truststore_keeper(row.node, row.path), truststore_footprint(row.format, Path(row.path)))
        for row in session.exec(stores).all()
    ]
    return [(other, footprint) for other, footprint in kept if other != keeper]


def check_free(session: Session, keeper: Keeper, footprint: Footprint, what: str) -> None:
    """Refuse ``what`` (the path the caller asked for) if another keeper keeps one of the files
    ``keeper`` would keep."""
    for other, theirs in _kept(session, keeper):
        shared = footprint.shared_with(theirs)
        if shared is not None:
            raise InvalidInput(
                f"{what}: {shared} is kept current by {other}: refusing to overwrite it"
                " (the two would overwrite each other for ever); choose another path"
            )
