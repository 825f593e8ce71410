"""The workload side: get an SVID with a join token, renew it by proving possession of its key.

Used by ``trellis svid request|renew`` (and later the agent). It speaks to the REST API over
HTTPS, trusting only the bundle it was given: the bundle is how a workload recognises Trellis.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca import errors
from ca.clock import Clock, SystemClock
from ca.csr import parse_csr
from ca.files import write_atomic, write_private
from ca.keys import KeyType, PrivateKey
from ca.pem import load_certs, private_key_pem
from ca.renewal import make_proof

__all__ = ["SvidFiles", "WorkloadClient", "write_svid"]

TIMEOUT = httpx.Timeout(15.0, connect=5.0)

_STATUS_ERRORS: dict[int, type[errors.TrellisError]] = {
    400: errors.InvalidInput,
    401: errors.AuthenticationFailed,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.InvalidInput,
}


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


def write_svid(files: SvidFiles, chain_pem: bytes, key: PrivateKey, bundle_pem: bytes) -> None:
    """Key first, then certificate: each file is replaced atomically."""
    write_private(files.key, private_key_pem(key))
    write_atomic(files.svid, chain_pem)
    write_atomic(files.bundle, bundle_pem)


def _csr(key: PrivateKey) -> bytes:
    algorithm = None if KeyType.of(key) is KeyType.ED25519 else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


class WorkloadClient:
    def __init__(self, server: str, bundle: Path, clock: Clock | None = None) -> None:
        if not server.startswith(("https://", "http://")):
            raise errors.InvalidInput("--server must be an https:// URL")
        self._server = server.rstrip("/")
        try:
            self._tls = ssl.create_default_context(cafile=str(bundle))
        except (OSError, ssl.SSLError):
            raise errors.InvalidInput(f"cannot read the trust bundle {bundle}") from None
        self._clock = clock or SystemClock()

    def _post(self, path: str, credential: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            with httpx.Client(verify=self._tls, timeout=TIMEOUT) as client:
                response = client.post(
                    self._server + path,
                    json=body,
                    headers={"Authorization": f"Bearer {credential}"},
                )
        except httpx.HTTPError as exc:
            raise errors.Unavailable(f"cannot reach {self._server}: {exc}") from None
        if response.status_code == 200:
            data: dict[str, Any] = response.json()
            return data
        try:
            detail = str(response.json().get("detail", response.text))
        except ValueError:
            detail = response.text[:200]
        raise _STATUS_ERRORS.get(response.status_code, errors.Unavailable)(
            f"server refused ({response.status_code}): {detail}"
        )

    def _store(self, data: dict[str, Any], key: PrivateKey, out: Path) -> Received:
        chain = (data["certificate"] + data["chain"]).encode()
        bundle = data["bundle"].encode()
        load_certs(chain)
        load_certs(bundle)
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
        files = SvidFiles(directory)
        try:
            current = load_certs(files.svid.read_bytes())[0]
            old_key = serialization.load_pem_private_key(files.key.read_bytes(), None)
        except (OSError, ValueError, IndexError):
            raise errors.InvalidInput(f"no readable svid.pem and svid.key in {directory}") from None
        key_type = KeyType.of(old_key)  # type: ignore[arg-type]
        key = key_type.generate()  # a fresh key on every renewal: rotation, not just re-dating
        csr = _csr(key)
        proof = make_proof(current, old_key, parse_csr(csr).sha256, self._clock.now())  # type: ignore[arg-type]
        data = self._post("/v1/svid/renew", proof, {"csr": csr.decode(), "ttl": ttl})
        return self._store(data, key, directory)
