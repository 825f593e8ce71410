"""What an instance restored from a backup shares with the instance the backup was taken of.

A backup copies the database and the key files; a CA key in Vault Transit is copied by
reference only (its row names the key), and the paths where OpenVPN CRLs, gateway truststores
and Istio intermediates are delivered are rows too. The restored copy signs with the original's
Vault keys and writes to the original's files: only one of the two may run (docs/operations.md,
"Backup and restore"), and a copy must never destroy a key the original may still sign with.

``trellis restore`` reads them from the staged database (``acts_on``) and writes the keys it
inherited to ``restored.json`` in the data dir (``marker``); ``shared_keys`` reads them back for
the key store, which then leaves those keys where they are (``ca.keys.store.SharedKeys``) when
an ``init --force`` or a root rotation would destroy them. Keys the copy makes itself after the
restore are not in the file and are cleaned up as on any instance. The original has no such
file: it does not know of its copies, and its own ``init --force`` destroys what they share.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ca.keys.store import SharedKeys

__all__ = [
    "MARKER",
    "ActsOn",
    "Restored",
    "acts_on",
    "crl_numbers_from",
    "marker",
    "read_marker",
    "shared_keys",
]

log = logging.getLogger("trellis.restored")

MARKER = "restored.json"


@dataclass(frozen=True, slots=True)
class ActsOn:
    """What a restored instance acts on outside its data dir, as the original did."""

    vault_keys: tuple[str, ...] = ()  # Transit key references of the CAs and OCSP responders
    openvpn_crl_files: tuple[str, ...] = ()
    openvpn_server_dirs: tuple[str, ...] = ()
    gateway_truststores: tuple[str, ...] = ()  # "node:path"
    istio_outputs: tuple[str, ...] = ()  # a directory, or "kubeconfig KUBECONFIG[ context C]"

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "vault_keys": list(self.vault_keys),
            "openvpn_crl_files": list(self.openvpn_crl_files),
            "openvpn_server_dirs": list(self.openvpn_server_dirs),
            "gateway_truststores": list(self.gateway_truststores),
            "istio_outputs": list(self.istio_outputs),
        }

    def __bool__(self) -> bool:
        return any(self.as_dict().values())


# Each read is of a table (and columns) an older schema may not have yet: a restore takes any
# revision it can migrate, and the first 'trellis serve' migrates it.
_QUERIES = {
    "vault_keys": (
        "SELECT key_ref FROM ca WHERE key_backend != 'file'"
        " UNION SELECT key_ref FROM ocsp_responder WHERE key_backend != 'file'"
    ),
    "openvpn_crl_files": "SELECT crl_path FROM openvpn WHERE crl_path IS NOT NULL",
    "openvpn_server_dirs": "SELECT server_dir FROM openvpn WHERE server_dir IS NOT NULL",
    "gateway_truststores": "SELECT node || ':' || path FROM gateway_truststore",
    "istio_outputs": (
        "SELECT coalesce(output, 'kubeconfig ' || kubeconfig"
        " || coalesce(' context ' || kube_context, ''))"
        " FROM istio_cluster WHERE output IS NOT NULL OR kubeconfig IS NOT NULL"
    ),
}
_VAULT_ONLY_CA = "SELECT key_ref FROM ca WHERE key_backend != 'file'"


def acts_on(database: Path) -> ActsOn:
    """Read from the (staged, checked) SQLite database at ``database``, read-only."""
    found: dict[str, tuple[str, ...]] = {}
    uri = f"{database.resolve().as_uri()}?mode=ro&immutable=1"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        for field, query in _QUERIES.items():
            try:
                rows = connection.execute(query).fetchall()
            except sqlite3.OperationalError:  # a table or column of a later revision
                if field != "vault_keys":
                    continue
                rows = connection.execute(_VAULT_ONLY_CA).fetchall()
            found[field] = tuple(sorted({str(value) for (value,) in rows if value}))
    return ActsOn(**found)


def crl_numbers_from(at: dt.datetime) -> int:
    """The least CRL number signed after a restore at ``at``: microseconds since the epoch.

    RFC 5280 §5.2.3 wants an issuer name's CRL numbers to increase, and a restore rolls the
    database, and with it each name's last number (``CrlIssuerRow``), back to the backup's: the
    restored copy would sign numbers the original already used, for CRLs that lack its later
    revocations. No name gets more than one CRL a microsecond, and a name never restored counts
    from 1: every number issued by time T is below T in microseconds (after a restore too,
    counting from this floor), so the first CRL after the restore outnumbers every CRL the
    original signed before it. It takes the restoring host's clock to be right; the original
    must not sign after it."""
    return int(at.timestamp() * 1_000_000)


def marker(archive: Path, at: dt.datetime, inherited: ActsOn) -> bytes:
    """The content of ``restored.json``."""
    body = {
        "restored_from": str(archive),
        "restored_at": at.isoformat(),
        "crl_numbers_from": crl_numbers_from(at),
        "inherited_vault_keys": list(inherited.vault_keys),
    }
    return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Restored:
    """What ``restored.json`` tells a process, read once when its context is built
    (``ca.config.build_context``): a restore fills only an empty data dir, so the marker does
    not change under a running process."""

    shared: SharedKeys = field(default_factory=SharedKeys)  # inherited from the one backed up
    crl_floor: int = 0  # ``crl_numbers_from`` of the restore; 0 if there was none


def read_marker(data_dir: Path) -> Restored:
    """None without ``restored.json``. One that cannot be read or parsed is taken to share
    every key outside the data dir (a key kept by mistake costs a ``vault delete`` by hand, one
    destroyed by mistake a CA) and to set no CRL floor."""
    try:
        raw = (data_dir / MARKER).read_bytes()
    except FileNotFoundError:
        return Restored()
    except OSError as error:
        log.warning("%s cannot be read (%s): no Vault key is destroyed", MARKER, error.strerror)
        return Restored(SharedKeys(every=True))
    try:
        body = json.loads(raw)
        refs = body["inherited_vault_keys"]
        if not isinstance(refs, list) or not all(isinstance(ref, str) for ref in refs):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        log.warning("%s is not what restore wrote: no Vault key is destroyed", MARKER)
        return Restored(SharedKeys(every=True))
    floor = body.get("crl_numbers_from")
    valid = isinstance(floor, int) and not isinstance(floor, bool) and floor > 0
    return Restored(SharedKeys(frozenset(refs)), floor if valid else 0)


def shared_keys(data_dir: Path) -> SharedKeys:
    """The keys this instance inherited from a restore: none without ``restored.json``."""
    return read_marker(data_dir).shared
