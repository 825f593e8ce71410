"""Mesh and non-mesh workloads trust each other through the one Trellis root, with no Istio
running: this test plays istiod, signing workload certificates with the exported plug-in CA
intermediate exactly as istiod does, and real TLS 1.3 mutual handshakes (Python ssl, loopback)
decide. Each side trusts only ``root-cert.pem`` or the Trellis bundle."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca.config import Context
from ca.durations import Ttl
from ca.istio import IstioParams, issue_istio_intermediate, write_output
from ca.keys import KeyType
from ca.pem import certs_pem
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import (
    Peer,
    assert_connected,
    assert_refused,
    handshake,
    istiod_sign,
    load_key,
    openssl_verify,
)

pytestmark = SQLITE_ONLY

SLEEP = "spiffe://example.org/ns/default/sa/sleep"
HTTPBIN = "spiffe://example.org/ns/default/sa/httpbin"
WEB = "/ns/legacy/sa/web"  # a non-mesh workload with a Trellis SVID


def plug_in(ctx: Context, cluster: str, out: Path, key_type: KeyType = KeyType.EC_P256) -> Path:
    """``trellis istio issue --format files``: what the cluster's cacerts Secret holds."""
    params = IstioParams(cluster, key_type=key_type, ttl=Ttl(86400), output=out,
                         output_format="files")  # fmt: skip
    write_output(issue_istio_intermediate(ctx, params), "files", out)
    return out


def mesh_workload(cacerts: Path, spiffe_id: str, key_type: KeyType = KeyType.RSA_2048) -> Peer:
    """A sidecar: its certificate signed by istiod, chain leaf + intermediate, trusting only
    root-cert.pem."""
    (ca_cert,) = x509.load_pem_x509_certificates((cacerts / "ca-cert.pem").read_bytes())
    ca_key = load_key((cacerts / "ca-key.pem").read_bytes())
    leaf, key = istiod_sign(ca_cert, ca_key, spiffe_id, key_type=key_type)
    return Peer(spiffe_id, (leaf, ca_cert), key, (cacerts / "root-cert.pem").read_bytes())


@pytest.mark.parametrize("cluster_key", [KeyType.EC_P256, KeyType.RSA_2048], ids=lambda k: k.value)
def test_mesh_and_trellis_workloads_connect(
    ctx: Context,
    tmp_path: Path,
    workload: Callable[..., Peer],
    cluster_key: KeyType,
) -> None:
    cacerts = plug_in(ctx, "east", tmp_path / "east", cluster_key)
    sleep = mesh_workload(cacerts, SLEEP)
    web = workload(WEB)

    # the istiod-signed leaf is a valid TLS client and server certificate for openssl too
    leaf = tmp_path / "sleep.pem"
    leaf.write_bytes(certs_pem(sleep.chain))
    for purpose in ("sslclient", "sslserver"):
        verified = openssl_verify(cacerts / "root-cert.pem", leaf, cacerts / "ca-cert.pem", purpose)
        assert verified.returncode == 0, verified.stdout + verified.stderr

    # either side may be the server
    assert_connected(*handshake(sleep, web, tmp_path), SLEEP, web.name)
    assert_connected(*handshake(web, sleep, tmp_path), web.name, SLEEP)


def test_two_clusters_with_their_own_intermediates(
    ctx: Context, tmp_path: Path, workload: Callable[..., Peer]
) -> None:
    east, west = plug_in(ctx, "east", tmp_path / "east"), plug_in(ctx, "west", tmp_path / "west")
    assert (east / "ca-cert.pem").read_bytes() != (west / "ca-cert.pem").read_bytes()
    assert (east / "root-cert.pem").read_bytes() == (west / "root-cert.pem").read_bytes()
    sleep_east = mesh_workload(east, SLEEP)
    httpbin_west = mesh_workload(west, HTTPBIN, KeyType.EC_P256)  # ztunnel uses P-256 keys
    assert_connected(*handshake(httpbin_west, sleep_east, tmp_path), HTTPBIN, SLEEP)
    assert_connected(*handshake(sleep_east, httpbin_west, tmp_path), SLEEP, HTTPBIN)
    web = workload(WEB)
    assert_connected(*handshake(web, httpbin_west, tmp_path), web.name, HTTPBIN)


def test_a_foreign_trellis_intermediate_is_refused(
    ctx: Context, foreign_ctx: Context, tmp_path: Path, workload: Callable[..., Peer]
) -> None:
    """Another Trellis with the same trust domain name and subject names but other keys: its
    mesh cannot talk to ours, in either direction, and openssl agrees."""
    ours = plug_in(ctx, "east", tmp_path / "ours")
    theirs = plug_in(foreign_ctx, "east", tmp_path / "theirs")
    impostor = mesh_workload(theirs, SLEEP)
    for peer in (workload(WEB), mesh_workload(ours, HTTPBIN)):
        assert_refused(*handshake(peer, impostor, tmp_path))
        assert_refused(*handshake(impostor, peer, tmp_path))
    leaf = tmp_path / "impostor.pem"
    leaf.write_bytes(certs_pem(impostor.chain))
    assert openssl_verify(ours / "root-cert.pem", leaf, theirs / "ca-cert.pem").returncode != 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_the_plug_in_ca_cannot_delegate(ctx: Context, tmp_path: Path) -> None:
    """The intermediate has path length 0: a CA it signed (a cluster trying to create its own
    sub-CA) issues nothing that verifies."""
    cacerts = plug_in(ctx, "east", tmp_path / "east")
    (ca_cert,) = x509.load_pem_x509_certificates((cacerts / "ca-cert.pem").read_bytes())
    ca_key = load_key((cacerts / "ca-key.pem").read_bytes())
    sub_key = KeyType.EC_P256.generate()
    sub_ca = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=sub-ca"))
        .issuer_name(ca_cert.subject)
        .public_key(sub_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca_cert.not_valid_before_utc)
        .not_valid_after(ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf, _ = istiod_sign(sub_ca, sub_key, SLEEP)
    chain, below = tmp_path / "chain.pem", tmp_path / "leaf.pem"
    chain.write_bytes(certs_pem([sub_ca, ca_cert]))
    below.write_bytes(certs_pem([leaf]))
    result = openssl_verify(cacerts / "root-cert.pem", below, chain)
    assert result.returncode != 0
    assert "path length constraint exceeded" in result.stdout + result.stderr
