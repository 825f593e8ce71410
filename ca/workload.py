"""The workload side: get an SVID with a join token, renew it by proving possession of its key.

Used by ``trellis svid request|renew`` and the agent. It speaks to the REST API over HTTPS,
trusting only the bundle it was given and, within it, only Trellis's own server identity
(``ca.serverconn``): the bundle is how a workload recognises Trellis. Nor does it take the
server's word for a new bundle: an SVID is written only if it chains to the bundle that comes
with it, and a bundle (with an SVID or refreshed alone) only if it keeps one of the roots the
client trusts already, as every bundle of a root rotation does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from ca import errors
from ca.checks import chains_to
from ca.clock import Clock, SystemClock
from ca.csr import parse_csr
from ca.files import OwnData, check_writable, private_directory, write_atomic, write_private
from ca.keys import KeyType, PrivateKey
from ca.pem import load_certs, private_key_pem
from ca.renewal import make_proof
from ca.serverconn import ServerConnection, ServerUrl

__all__ = [
    "Received",
    "SvidFiles",
    "WorkloadClient",
    "check_svid_directory",
    "join_token",
    "read_svid",
    "write_bundle",
    "write_svid",
]

_STATUS_ERRORS: dict[int, type[errors.TrellisError]] = {
    400: errors.InvalidInput,
    401: errors.AuthenticationFailed,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.InvalidInput,
}
# What a 200 from /v1/svid and /v1/svid/renew holds (api.schemas.SvidResponse), all strings.
_SVID_FIELDS = ("spiffe_id", "serial", "expires_at", "certificate", "chain", "bundle")
# The files ``write_svid`` publishes, each a symlink through ``..data``; and every name it
# renames a symlink over in the directory it is given.
_FILES = ("svid.pem", "svid.key", "bundle.pem")
_LINKS = ("..data", *_FILES)


def join_token(text: str) -> str:
    """The join token as ``--token`` or ``TRELLIS_JOIN_TOKEN`` gives it, without surrounding
    whitespace: a Kubernetes Secret made from a file (``kubectl create secret
    --from-file``), or ``$(cat token)`` in a shell that keeps it, ends it with a newline, as
    the file did, and kubectl's users expect that to work. What is left goes into an HTTP
    header (``Authorization: Bearer``), which carries printable ASCII only: anything else is
    refused here, before a key is made or a byte sent. The message never repeats the token:
    it goes to a terminal or a pod's log, and a token with one stray character in it is still
    nearly all of a secret."""
    token = text.strip()
    if not token:
        raise errors.InvalidInput("the join token (--token or TRELLIS_JOIN_TOKEN) is empty")
    if not (token.isascii() and token.isprintable()) or any(ch.isspace() for ch in token):
        raise errors.InvalidInput(
            "the join token (--token or TRELLIS_JOIN_TOKEN) is not one: it holds a space, a"
            " control character or a non-ASCII one, which no HTTP header may carry"
        )
    return token


@dataclass(frozen=True, slots=True)
class SvidFiles:
    directory: Path

    @property
    def svid(self) -> Path:
        return self.directory / "svid.pem"

    @property
    def key(self) -> Path:
        return self.directory / "svid.key"

    @property
    def bundle(self) -> Path:
        return self.directory / "bundle.pem"


@dataclass(frozen=True, slots=True)
class Received:
    spiffe_id: str
    serial: str
    expires_at: str
    files: SvidFiles


def check_svid_directory(
    path: Path, *, what: str | None = None, own: OwnData | None = None
) -> Path:
    """``path`` if ``write_svid`` can publish an SVID there; ``InvalidInput`` naming ``what``
    otherwise. ``check_writable`` judges the directory; the names ``write_svid`` renames its
    symlinks over are judged here, as a rename cannot replace one that is a directory (what
    ``cp -rL``, ``tar -h`` or ``rsync -L`` of an SVID directory makes of ``..data``). Callers
    check before anything is issued or a join token spent: the write would fail after the
    server signed, and the certificate's key, never written, would be lost with the token's
    use."""
    name = what or str(path)
    check_writable(path, directory=True, what=what, own=own)
    for link in _LINKS:
        try:
            found = (path / link).lstat()
        except FileNotFoundError:  # the directory or the name not there yet
            continue
        except OSError as exc:
            raise errors.InvalidInput(f"{name}: {link}: {exc.strerror}") from None
        if stat.S_ISDIR(found.st_mode):
            raise errors.InvalidInput(
                f"{name}: {link} is a directory, where Trellis keeps a symlink (a copy made"
                " following links, cp -rL or tar -h?): remove it, or choose another directory"
            )
    return path


def write_svid(files: SvidFiles, chain_pem: bytes, key: PrivateKey, bundle_pem: bytes) -> None:
    """Publish certificate, key and bundle together, the way Kubernetes' atomic writer does:
    all three go into a fresh hidden directory, then one rename swaps the ``..data`` symlink to
    it. ``svid.pem``, ``svid.key`` and ``bundle.pem`` are symlinks through ``..data``. The swap is
    the one atomic step: a reader that resolves ``..data`` once and reads the three from there
    gets one set; one that opens ``svid.pem`` and then ``svid.key`` by name may straddle a swap
    and get a certificate and a key of different sets (docs/rotation.md tells readers to reload
    on the hook, or read again on a mismatch).

    A write that fails or is interrupted (a full disk, Ctrl-C) before the swap leaves the
    directory as it was: the staged directory, which may hold the new key, is removed, where
    it stayed behind unreferenced, one more on each of the agent's retries."""
    directory = private_directory(files.directory)
    stamp = f"..{time.strftime('%Y%m%d%H%M%S')}.{secrets.token_hex(4)}"
    staging = private_directory(directory / stamp, exclusive=True)
    data = directory / "..data"
    previous = os.readlink(data) if data.is_symlink() else None
    temporary = directory / f"..data.{secrets.token_hex(4)}"
    try:
        write_private(staging / "svid.key", private_key_pem(key))
        write_atomic(staging / "svid.pem", chain_pem)
        write_atomic(staging / "bundle.pem", bundle_pem)
        os.symlink(stamp, temporary)
        os.replace(temporary, data)
    except BaseException:
        temporary.unlink(missing_ok=True)
        # Decided by what ..data names, not by how far the code got: an interrupt may land
        # just after the rename, and the staged directory is then the published one.
        if not (data.is_symlink() and os.readlink(data) == stamp):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in _FILES:
        link = directory / name
        if not (link.is_symlink() and os.readlink(link) == f"..data/{name}"):
            temporary = directory / f".{name}.{secrets.token_hex(4)}"
            os.symlink(f"..data/{name}", temporary)
            os.replace(temporary, link)  # also converts plain files from older versions
    # Only a directory of ours beside the link: a ``..data`` made by hand to ``../shared`` also
    # starts with "..", and what it leads to is not the agent's to delete.
    if previous and previous != stamp and previous.startswith("..") and "/" not in previous:
        shutil.rmtree(directory / previous, ignore_errors=True)


def read_svid(files: SvidFiles) -> tuple[x509.Certificate, PrivateKey]:
    """The SVID in ``files`` and its key, or ``InvalidInput`` saying what is wrong with them
    locally: a key file that is encrypted, of a type Trellis does not issue, or not the
    certificate's, is the caller's problem (exit 2), not one to send to the server."""
    try:
        cert = load_certs(files.svid.read_bytes())[0]
        key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    except (OSError, errors.InvalidInput, IndexError):
        raise errors.InvalidInput(
            f"no readable svid.pem and svid.key in {files.directory}"
        ) from None
    except TypeError:  # cryptography's "Password was not given but private key is encrypted"
        raise errors.InvalidInput(
            f"{files.key} is encrypted: an SVID key is kept unencrypted (its file is 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise errors.InvalidInput(f"{files.key} is not a readable private key") from None
    try:
        KeyType.of(key)  # type: ignore[arg-type]
    except errors.InvalidInput as exc:
        raise errors.InvalidInput(f"{files.key}: {exc.detail}") from None
    if cert.public_key() != key.public_key():
        raise errors.InvalidInput(f"{files.key} is not the key of {files.svid}")
    return cert, key  # type: ignore[return-value]


def write_bundle(files: SvidFiles, bundle_pem: bytes) -> None:
    """Refresh only the bundle, keeping the current certificate and key (same atomic swap)."""
    chain = files.svid.read_bytes()
    _cert, key = read_svid(files)
    write_svid(files, chain, key, bundle_pem)


def _csr(key: PrivateKey) -> bytes:
    algorithm = None if KeyType.of(key) is KeyType.ED25519 else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


class WorkloadClient:
    def __init__(
        self,
        server: ServerUrl,
        bundle: Path,
        clock: Clock | None = None,
        *,
        bundle_name: str | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """``bundle_name`` is how a message names the bundle file: the ``--bundle`` option by
        default, or the file itself when a command has no such option (``svid renew``).
        ``stop`` abandons a request in progress (``ca.serverconn.Stopped``)."""
        self._server = ServerConnection(server, bundle, bundle_name or f"--bundle {bundle}")
        self._clock = clock or SystemClock()
        self._stop = stop

    def _post(self, path: str, credential: str, body: dict[str, Any]) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {credential}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        answer = self._server.exchange(
            "POST", path, json.dumps(body).encode(), headers, stop=self._stop
        )
        try:
            data = json.loads(answer.body)
        except ValueError:  # UnicodeDecodeError included
            data = None
        if answer.status == 200:
            if isinstance(data, dict) and all(isinstance(data.get(f), str) for f in _SVID_FIELDS):
                return {f: data[f] for f in _SVID_FIELDS}
            raise self._not_an_svid("not the JSON document of an SVID")
        if isinstance(data, dict) and isinstance(data.get("detail"), str):
            detail = data["detail"]
        else:
            detail = answer.body[:200].decode(errors="replace")
        raise _STATUS_ERRORS.get(answer.status, errors.Unavailable)(
            f"server refused ({answer.status}): {' '.join(detail.split())[:500]}"
        )

    def _not_an_svid(self, why: str) -> errors.Unavailable:
        """A 200 that is not what Trellis answers (a proxy's maintenance page, a truncated or
        foreign document) is the server side's fault, retried by the agent like an outage."""
        return errors.Unavailable(f"{self._server.url} answered 200 with {why}")

    def _keeps_a_root(self, roots: list[x509.Certificate]) -> None:
        """A bundle from the server replaces the one the client trusts, so it must hold one of
        the roots the client trusts already: a root rotation keeps the old root and the new one
        in the bundle while clients catch up (docs/rotation.md), so an honest server's bundle
        always does. A server that is not Trellis but got past ``authenticate`` (its key
        stolen, a CA under the root that should not have signed for it) would otherwise make
        its own root the client's only trust anchor, for this and every later connection."""
        if not self._server.roots.intersection(roots):
            raise self._not_an_svid(
                f"a bundle holding none of the roots of {self._server.bundle_name}: a new root"
                " is taken only beside one already trusted; nothing was written"
            )

    def fetch_bundle(self) -> bytes:
        """The server's current trust bundle (PEM), fetched over the pinned TLS connection."""
        answer = self._server.exchange("GET", "/v1/bundle", stop=self._stop)
        if answer.status != 200:
            raise errors.Unavailable(f"bundle fetch answered {answer.status}")
        try:
            roots = load_certs(answer.body)
        except errors.InvalidInput:
            raise self._not_an_svid("a bundle that is not PEM certificates") from None
        self._keeps_a_root(roots)
        return answer.body

    def _store(self, data: dict[str, str], key: PrivateKey, out: Path) -> Received:
        """Write the answer's SVID and bundle over the held ones, if they are what Trellis
        would send: the SVID for the key sent, chaining to the bundle that comes with it
        (``ca.checks.chains_to``), and a bundle that keeps a root the client trusts
        (``_keeps_a_root``). Anything else is refused with nothing written."""
        chain = (data["certificate"] + data["chain"]).encode()
        bundle = data["bundle"].encode()
        try:
            certs, roots = load_certs(chain), load_certs(bundle)
            leaf = certs[0]
            roots[0]
        except (errors.InvalidInput, IndexError):
            raise self._not_an_svid("a certificate or bundle that is not PEM") from None
        if leaf.public_key() != key.public_key():
            raise self._not_an_svid("a certificate for another key than the one sent")
        if chains_to(certs, roots) is None:
            raise self._not_an_svid(
                "an SVID that does not chain to the bundle sent with it; nothing was written"
            )
        self._keeps_a_root(roots)
        files = SvidFiles(out)
        write_svid(files, chain, key, bundle)
        return Received(data["spiffe_id"], data["serial"], data["expires_at"], files)

    def request(
        self, token: str, out: Path, key_type: KeyType = KeyType.EC_P256, ttl: str | None = None
    ) -> Received:
        key = key_type.generate()
        data = self._post("/v1/svid", token, {"csr": _csr(key).decode(), "ttl": ttl})
        return self._store(data, key, out)

    def renew(self, directory: Path, ttl: str | None = None) -> Received:
        current, old_key = read_svid(SvidFiles(directory))
        key = KeyType.of(old_key).generate()  # a fresh key each time: rotation, not re-dating
        csr = _csr(key)
        proof = make_proof(current, old_key, parse_csr(csr).sha256, self._clock.now())
        data = self._post("/v1/svid/renew", proof, {"csr": csr.decode(), "ttl": ttl})
        return self._store(data, key, directory)
