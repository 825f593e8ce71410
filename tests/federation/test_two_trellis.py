"""Two real Trellis instances federate over HTTPS, the way two teams would run them.

A (``a.test``) and B (``b.test``): ``trellis init``, ``trellis serve`` on 127.0.0.1, separate
data dirs and SQLite databases. A trusts B with ``https_spiffe`` (B's serving SVID
``spiffe://b.test/trellis/server``, bootstrapped with B's bundle.pem); B trusts A with
``https_web`` and A's CA (A's serving certificate has IP SAN 127.0.0.1). Each server's
scheduler fetches the other's bundle. Then openssl verifies an SVID of B with the bundle A
fetched, py-spiffe reads the bundle map, and B's endpoint starts serving bad bundles (same port,
B's own certificate, so only the content is wrong): A keeps the last good bundle.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from ca.jwks import bundle_jwks
from tests.conftest import free_port
from tests.federation.fedkit import Answer, BundleServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]

TRELLIS = str(Path(sys.executable).with_name("trellis"))


class Instance:
    """One Trellis: its CLI (run against its data dir) and its server."""

    def __init__(self, data_dir: Path, trust_domain: str) -> None:
        self.data_dir, self.trust_domain = data_dir, trust_domain
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TRELLIS_DATA_DIR": str(data_dir),
            "TRELLIS_DATABASE_URL": f"sqlite:///{data_dir / 'trellis.db'}",
            "TRELLIS_KEY_PASSPHRASE": "federation-test-passphrase",
        }
        self.server: subprocess.Popen[str] | None = None

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [TRELLIS, *args], env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return finish(self.start(*args))

    @property
    def bundle_pem(self) -> bytes:
        return (self.data_dir / "bundle.pem").read_bytes()

    @property
    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.bundle_pem.decode())

    @property
    def admin(self) -> dict[str, str]:
        token = (self.data_dir / "admin-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, verify=self.tls, **{"timeout": 10, **kwargs})

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, verify=self.tls, timeout=30, **kwargs)

    def serve(self) -> None:
        self.server = subprocess.Popen(
            [TRELLIS, "serve", "--port", str(self.port)], env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self) -> None:
        assert self.server is not None
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.get("/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.server.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.trust_domain} did not start: {self.output}")
            time.sleep(0.2)

    output = ""

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.terminate()
        try:
            self.output, _ = self.server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.output, _ = self.server.communicate()
        self.server = None


def finish(process: subprocess.Popen[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert result.returncode == code, f"{' '.join(map(str, process.args))}: {out}{err}"
    return result


def finish_all(*processes: subprocess.Popen[str]) -> None:
    """Wait for every process before judging any, so none is left running."""
    failures = []
    for process in processes:
        try:
            finish(process)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, failures


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Instance, Instance]]:
    a, b = Instance(tmp_path / "a", "a.test"), Instance(tmp_path / "b", "b.test")
    finish_all(a.start("init", "--trust-domain", "a.test"),
               b.start("init", "--trust-domain", "b.test"))  # fmt: skip
    try:
        a.serve()
        b.serve()
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


def certs_of(jwks: dict[str, Any]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0])) for k in jwks["keys"]]


def pem_of(jwks: dict[str, Any]) -> bytes:
    from ca.pem import certs_pem

    return certs_pem(certs_of(jwks))


def openssl_verify(
    bundle: Path, chain: Path, purpose: str = "sslclient"
) -> subprocess.CompletedProcess[str]:
    """Verify the leaf of ``chain`` (leaf first, then intermediates) to ``bundle`` only."""
    svid = chain
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(bundle),
         "-untrusted", str(svid), str(svid)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def wait_for_bundle(instance: Instance, key: str, timeout: float = 25) -> dict[str, Any]:
    """Until the instance's scheduler has fetched ``key`` (its job runs every 10 s)."""
    deadline = time.monotonic() + timeout
    while True:
        published: dict[str, Any] = instance.get("/v1/bundles").json()
        if key in published or time.monotonic() > deadline:
            return published
        time.sleep(0.5)


def test_two_trellis_instances_federate(pair: tuple[Instance, Instance], tmp_path: Path) -> None:
    a, b = pair
    bootstrap = tmp_path / "b-bundle.pem"
    bootstrap.write_bytes(b.bundle_pem)

    # 1. A adds B with the CLI (https_spiffe), B adds A over REST (https_web, A's CA), while an
    #    SVID of b.test is minted
    b_svid = tmp_path / "b-svid"
    finish_all(
        b.start("svid", "mint", "--spiffe-id", "spiffe://b.test/ns/default/sa/api",
                "--out", str(b_svid)),
        a.start("federation", "add", "--trust-domain", "b.test",
                "--url", f"{b.url}/v1/bundle.jwks", "--profile", "https_spiffe",
                "--endpoint-spiffe-id", "spiffe://b.test/trellis/server",
                "--bootstrap-bundle", str(bootstrap)),
    )  # fmt: skip
    added = b.post(
        "/v1/federation",
        headers=b.admin,
        json={"trust_domain": "a.test", "url": f"{a.url}/v1/bundle.jwks", "profile": "https_web",
              "ca_pem": a.bundle_pem.decode()},
    )  # fmt: skip
    assert added.status_code == 201, added.text

    # 2. each server's scheduler fetches the other's bundle by itself (the job runs every 10 s)
    a_published = wait_for_bundle(a, "spiffe://b.test")
    b_published = wait_for_bundle(b, "spiffe://a.test")

    # 3. each publishes its own bundle and the other's, each under its own trust domain
    b_jwks = b.get("/v1/bundle.jwks").json()
    a_jwks = a.get("/v1/bundle.jwks").json()
    assert list(a_published) == ["spiffe://a.test", "spiffe://b.test"]
    assert list(b_published) == ["spiffe://b.test", "spiffe://a.test"]
    assert a_published["spiffe://b.test"] == b_jwks
    assert b_published["spiffe://a.test"] == a_jwks
    assert certs_of(a_published["spiffe://b.test"]) == x509.load_pem_x509_certificates(b.bundle_pem)

    # 4. openssl: B's SVID verifies with the bundle A fetched for b.test, and not with A's own
    #    (never merged); the other way round with A's serving SVID (spiffe://a.test/...)
    for published, name, chain, purpose in [
        (a_published, "spiffe://b.test", b_svid / "svid.pem", "sslclient"),
        (b_published, "spiffe://a.test", a.data_dir / "server" / "tls.crt", "sslserver"),
    ]:
        fetched, own = tmp_path / "fetched.pem", tmp_path / "own.pem"
        fetched.write_bytes(pem_of(published[name]))
        own.write_bytes(pem_of(next(v for k, v in published.items() if k != name)))
        verified = openssl_verify(fetched, chain, purpose)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert openssl_verify(own, chain, purpose).returncode != 0

    # 5. py-spiffe reads A's bundle map as a set of per-trust-domain X.509 bundles
    from spiffe import TrustDomain, X509Bundle, X509BundleSet, X509Svid

    bundles = X509BundleSet.of(
        [
            X509Bundle.parse_raw(
                TrustDomain(key.removeprefix("spiffe://")),
                b"".join(base64.b64decode(k["x5c"][0]) for k in jwks["keys"]),
            )
            for key, jwks in a_published.items()
        ]
    )
    svid = X509Svid.parse((b_svid / "svid.pem").read_bytes(), (b_svid / "svid.key").read_bytes())
    partner_bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert partner_bundle is not None
    assert partner_bundle.x509_authorities == set(x509.load_pem_x509_certificates(b.bundle_pem))
    own_bundle = bundles.get_bundle_for_trust_domain(TrustDomain("a.test"))
    assert own_bundle is not None and not own_bundle.x509_authorities & set(
        partner_bundle.x509_authorities
    )

    # 6. B's endpoint goes bad: same port, B's own serving certificate, a broken answer
    good = a_published["spiffe://b.test"]
    sequence = good["spiffe_sequence"]
    b.stop()
    b_server = b.data_dir / "server"
    impostor = BundleServer(b_server / "tls.crt", b_server / "tls.key", port=b.port)
    try:
        impostor.answer = Answer(body=b"<html>maintenance</html>")
        refused = finish(a.start("federation", "refresh", "b.test"), code=8)
        assert "not JSON" in refused.stdout and "kept their last good bundle" in refused.stderr

        intermediate = x509.load_pem_x509_certificates((b_svid / "svid.pem").read_bytes())[1]
        b_roots = certs_of(good)
        for document, reason in [
            (bundle_jwks(b_roots, sequence - 1, 300), "went backwards"),
            (bundle_jwks([*b_roots, intermediate], sequence, 300), "authorities changed"),
        ]:
            impostor.answer = Answer(body=json.dumps(document).encode())
            response = a.post("/v1/federation/b.test/refresh", headers=a.admin)
            assert response.status_code == 503 and reason in response.json()["detail"]
            state = a.get("/v1/federation/b.test", headers=a.admin).json()
            assert reason in state["last_error"] and state["sequence"] == sequence
            assert a.get("/v1/bundles").json()["spiffe://b.test"] == good
        assert impostor.requests == 3
        kept = tmp_path / "kept.pem"
        kept.write_bytes(pem_of(a.get("/v1/bundles").json()["spiffe://b.test"]))
        assert openssl_verify(kept, b_svid / "svid.pem").returncode == 0

        # 7. and recovers with the next good bundle
        impostor.answer = Answer(body=json.dumps(bundle_jwks(b_roots, sequence + 1, 300)).encode())
        recovered = a.post("/v1/federation/b.test/refresh", headers=a.admin).json()
        assert recovered["sequence"] == sequence + 1 and recovered["last_error"] is None
    finally:
        impostor.close()
