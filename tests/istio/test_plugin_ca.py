"""``trellis istio issue``: what istiod reads from the ``cacerts`` Secret, checked with openssl
and cryptography, in every output format."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlmodel import Session, select

from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.istio import IstioParams, issue_istio_intermediate
from ca.profiles import BACKDATE
from ca.store.models import CertificateRow
from tests.conftest import TRUST_DOMAIN
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import Cli, load_key, openssl, openssl_verify, public_key_pem

pytestmark = [
    SQLITE_ONLY,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]

CACERTS = {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}


def assert_is_istio_intermediate(cert: x509.Certificate, root: x509.Certificate) -> None:
    """istiod's plug-in CA: a CA for path length 0 under the Trellis root, critical keyUsage
    keyCertSign + cRLSign + digitalSignature, no EKU (Go's verifier would constrain every
    workload certificate by it), the trust domain's SPIFFE ID."""
    cert.verify_directly_issued_by(root)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign and usage.value.digital_signature
    assert not (
        usage.value.content_commitment
        or usage.value.key_encipherment
        or usage.value.data_encipherment
        or usage.value.key_agreement
    )
    assert x509.ExtendedKeyUsage not in {type(e.value) for e in cert.extensions}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://example.org")]
    assert cert.not_valid_after_utc <= root.not_valid_after_utc


@pytest.mark.parametrize(
    ("key_type", "key_class"),
    [("ec-p256", ec.EllipticCurvePrivateKey), ("rsa-2048", rsa.RSAPrivateKey)],
)
def test_files(ctx: Context, cli: Cli, tmp_path: Path, key_type: str, key_class: type) -> None:
    out = tmp_path / "east"
    issued = json.loads(
        cli.ok("istio", "issue", "--cluster", "east", "--format", "files", "--out", str(out),
               "--key-type", key_type, "--json")
    )  # fmt: skip
    assert {Path(p).name for p in issued["written"]} == CACERTS
    assert sorted(p.name for p in out.iterdir()) == sorted(CACERTS)
    assert (out / "ca-key.pem").stat().st_mode & 0o777 == 0o600

    # openssl: the intermediate verifies to root-cert.pem through cert-chain.pem
    verified = openssl_verify(out / "root-cert.pem", out / "ca-cert.pem", out / "cert-chain.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # ... and the key is the certificate's (openssl's view, then cryptography's)
    assert public_key_pem(out / "ca-key.pem", "key") == public_key_pem(out / "ca-cert.pem", "cert")
    key = load_key((out / "ca-key.pem").read_bytes())
    assert isinstance(key, key_class)

    issuer = active_issuer(ctx)
    (cert,) = x509.load_pem_x509_certificates((out / "ca-cert.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())
    roots = x509.load_pem_x509_certificates((out / "root-cert.pem").read_bytes())
    assert key.public_key() == cert.public_key()
    assert chain == [cert, roots[0]] and roots == list(issuer.roots)
    assert (out / "root-cert.pem").read_bytes() == issuer.bundle_pem
    assert_is_istio_intermediate(cert, roots[0])
    assert format(cert.serial_number, "x") == issued["serial"]

    listed = cli.ok("istio", "list").splitlines()
    assert listed[0].split() == ["CLUSTER", "SERIAL", "NOT", "AFTER", "KEY", "OUTPUT"]
    assert listed[1].split()[:2] == ["east", issued["serial"][:16]]
    assert listed[1].split()[-2:] == [key_type, str(out.resolve())]


def test_istio_list_json(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "east"
    cli.ok("istio", "issue", "--cluster", "east", "--format", "files", "--out", str(out))
    listed = json.loads(cli.ok("istio", "list", "--json"))
    assert [(c["cluster"], c["output"], c["format"]) for c in listed] == [
        ("east", str(out.resolve()), "files")
    ]


def test_the_key_leaves_trellis_and_is_not_stored(ctx: Context, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "east"
    cli.ok("istio", "issue", "--cluster", "east", "--format", "files", "--out", str(out))
    key = load_key((out / "ca-key.pem").read_bytes())
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    secrets = [der, base64.b64encode(der)[16:64], (out / "ca-key.pem").read_bytes()[40:90]]
    database = Path(ctx.settings.effective_database_url.removeprefix("sqlite:///"))
    stored = [p for p in ctx.settings.data_dir.rglob("*") if p.is_file()]
    stored += list(database.parent.glob(database.name + "*"))  # with its -wal and -shm files
    assert database in stored and any(p.parent.name == "keys" for p in stored)
    for path in stored:
        content = path.read_bytes()
        assert not any(secret in content for secret in secrets), path


def secret(path: Path) -> dict[str, Any]:
    text = path.read_text()
    assert "istio-generated" not in text  # it would mark the CA as istiod's own self-signed one
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def test_secret_yaml(ctx: Context, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "cacerts.yaml"
    cli.ok("istio", "issue", "--cluster", "east", "--out", str(out))  # secret-yaml by default
    assert out.stat().st_mode & 0o777 == 0o600
    document = secret(out)
    assert document["apiVersion"] == "v1" and document["kind"] == "Secret"
    assert document["metadata"]["name"] == "cacerts"
    assert document["metadata"]["namespace"] == "istio-system"
    assert document["type"] == "Opaque"
    data = {name: base64.b64decode(value) for name, value in document["data"].items()}
    assert set(data) == CACERTS  # exactly the four keys istiod reads together
    (cert,) = x509.load_pem_x509_certificates(data["ca-cert.pem"])
    roots = x509.load_pem_x509_certificates(data["root-cert.pem"])
    assert data["root-cert.pem"] == active_issuer(ctx).bundle_pem
    assert x509.load_pem_x509_certificates(data["cert-chain.pem"]) == [cert, roots[0]]
    assert load_key(data["ca-key.pem"]).public_key() == cert.public_key()
    assert_is_istio_intermediate(cert, roots[0])


def test_tls_secret_yaml(ctx: Context, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "cacerts.yaml"
    cli.ok("istio", "issue", "--cluster", "west", "--format", "tls-secret-yaml", "--out", str(out))
    document = secret(out)
    assert document["type"] == "kubernetes.io/tls"
    data = {name: base64.b64decode(value) for name, value in document["data"].items()}
    assert set(data) == {"tls.crt", "tls.key", "ca.crt"}
    cert = x509.load_pem_x509_certificates(data["tls.crt"])[0]
    assert load_key(data["tls.key"]).public_key() == cert.public_key()
    assert data["ca.crt"] == active_issuer(ctx).bundle_pem
    assert_is_istio_intermediate(cert, active_issuer(ctx).roots[0])


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--key-type", "ed25519"), "istiod does not support ed25519 CA keys"),
        (("--cluster", "East_1"), "a cluster name is a DNS label"),
        (("--format", "pkcs12"), "--format is one of"),
        # The job runs every 5 minutes and renews at 2/3 of the life: a 10 s intermediate
        # expired, and istiod with it, before any run could renew it.
        (("--ttl", "10s"), "--ttl 10s is too short for an Istio intermediate: at least 1h"),
        (("--ttl", "59m"), "--ttl 59m is too short for an Istio intermediate: at least 1h"),
    ],
    ids=["fail/ed25519", "fail/cluster-name", "fail/format", "fail/ttl-10s", "fail/ttl-59m"],
)
def test_refused(cli: Cli, tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    out = tmp_path / "out"
    given = dict(zip(args[::2], args[1::2], strict=True))
    options = {"--cluster": "east", "--format": "files", **given}
    result = cli("istio", "issue", "--out", str(out), *[x for kv in options.items() for x in kv])
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.err
    assert not out.exists()
    assert json.loads(cli.ok("istio", "list", "--json")) == []


def test_the_shortest_ttl_is_an_hour(ctx: Context, cli: Cli, tmp_path: Path) -> None:
    issued = json.loads(
        cli.ok("istio", "issue", "--cluster", "east", "--out", str(tmp_path / "c.yaml"),
               "--ttl", "1h", "--json")
    )  # fmt: skip
    (cert,) = x509.load_pem_x509_certificates(
        base64.b64decode(secret(tmp_path / "c.yaml")["data"]["ca-cert.pem"])
    )
    assert format(cert.serial_number, "x") == issued["serial"]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == dt.timedelta(hours=1) + BACKDATE


def _istio_certificates(ctx: Context) -> int:
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CertificateRow).where(CertificateRow.profile == "istio-intermediate")
        ).all()
    return len(rows)


@pytest.mark.parametrize(
    ("out", "output_format", "reason"),
    [
        ("adir", "secret-yaml", "is a directory, not a file"),
        ("afile/sub", "files", "cannot write under"),
        ("afile", "files", "exists and is not a directory"),
        ("afile/x.yaml", "secret-yaml", "cannot write under"),
        ("/proc/x.yaml", "secret-yaml", "a device or a process's file"),
    ],
    ids=["fail/dir-for-yaml", "fail/under-a-file", "fail/file-for-files", "fail/yaml-under-a-file",
         "fail/proc"],
)  # fmt: skip
def test_an_output_that_cannot_be_written_issues_nothing(
    ctx: Context, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    out: str, output_format: str, reason: str,
) -> None:  # fmt: skip
    """docs/cli.md: an --out path is checked before anything is issued (exit 2, one line), or
    an active CA certificate whose key was never delivered would be recorded."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "adir").mkdir()
    (work / "afile").write_text("a file\n")
    result = cli("istio", "issue", "--cluster", "east", "--out", out, "--format", output_format)
    assert result.code == 2, result
    (line,) = result.err.strip().splitlines()
    assert line.startswith(f"trellis: --out {out}: ") and reason in line, line
    assert json.loads(cli.ok("istio", "list", "--json")) == []
    assert _istio_certificates(ctx) == 0
    assert sorted(p.name for p in work.iterdir()) == ["adir", "afile"]
    assert list((work / "adir").iterdir()) == []


def test_with_a_public_url_the_intermediate_points_at_the_roots_revocation_data(
    settings: Settings, clock: FixedClock, tmp_path: Path
) -> None:
    """docs/revocation.md: "Intermediates point at the root's CRL the same way". The plug-in
    intermediates were the one kind that did not: no CRL Distribution Points, no AIA, so a
    relying party that follows them found nothing to ask about a revoked cluster."""
    public = "https://ca.example.test:8443"
    ctx = build_context(settings.model_copy(update={"public_url": public}), clock=clock)
    try:
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
        issued = issue_istio_intermediate(
            ctx, IstioParams("east", output=tmp_path / "east", output_format="files")
        )
        root = active_issuer(ctx).roots[0]
    finally:
        ctx.close()
    serial = format(root.serial_number, "x")
    (cert_file := tmp_path / "ca-cert.pem").write_bytes(
        issued.certificate.public_bytes(serialization.Encoding.PEM)
    )
    shown = openssl(
        "x509", "-in", str(cert_file), "-noout", "-ext", "crlDistributionPoints,authorityInfoAccess"
    )
    assert shown.returncode == 0, shown.stderr
    assert [line.strip() for line in shown.stdout.splitlines() if line.strip()] == [
        "X509v3 CRL Distribution Points:",
        "Full Name:",
        f"URI:{public}/v1/crl/mesh/{serial}.crl",
        "Authority Information Access:",
        f"OCSP - URI:{public}/v1/ocsp",
        f"CA Issuers - URI:{public}/v1/ca/mesh/{serial}.crt",
    ]
    assert_is_istio_intermediate(issued.certificate, root)
