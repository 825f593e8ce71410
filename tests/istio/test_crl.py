"""``trellis istio issue --with-crl``: ``ca-crl.pem`` holds a CRL for every CA of the chain (the
intermediate's own, signed at issue time, and the root's), checked with ``openssl verify
-crl_check_all`` on an istiod-style workload certificate; revoking the intermediate reaches the
output through the ``istio-intermediates`` job, which never needs the intermediate's key."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ca.clock import FixedClock
from ca.config import Context
from ca.jobs import job_named
from ca.pem import certs_pem
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import Cli, crls, istiod_sign, load_key, openssl

pytestmark = [
    SQLITE_ONLY,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]

CACERTS = {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
WORKLOAD = "spiffe://example.org/ns/default/sa/web"


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(crl: x509.CertificateRevocationList) -> bytes | None:
    return crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def verify_workload(files: dict[str, bytes], directory: Path) -> tuple[int, str]:
    """An istiod-signed workload certificate, verified with every CRL of the chain checked."""
    (ca_cert,) = x509.load_pem_x509_certificates(files["ca-cert.pem"])
    leaf, _ = istiod_sign(ca_cert, load_key(files["ca-key.pem"]), WORKLOAD)
    directory.mkdir(exist_ok=True)
    paths = {name: directory / name for name in ("leaf.pem", *files)}
    paths["leaf.pem"].write_bytes(certs_pem([leaf]))
    for name, content in files.items():
        paths[name].write_bytes(content)
    done = openssl(
        "verify", "-x509_strict", "-crl_check_all", "-CRLfile", str(paths["ca-crl.pem"]),
        "-CAfile", str(paths["root-cert.pem"]), "-untrusted", str(paths["cert-chain.pem"]),
        str(paths["leaf.pem"]),
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def assert_crl_per_ca(files: dict[str, bytes]) -> None:
    """RFC 5280 §5: one CRL per CA of the chain, each naming its issuer, with the issuer's key
    identifier as AKI, a CRL number, a valid signature; the intermediate's lasts as long as it
    and is dated from its notBefore, backdated alike (a proxy whose clock lags must not find
    it "not yet valid")."""
    intermediate, root = x509.load_pem_x509_certificates(files["cert-chain.pem"])
    own, root_crl = crls(files["ca-crl.pem"])
    for crl, ca in ((own, intermediate), (root_crl, root)):
        assert crl.issuer == ca.subject
        assert aki(crl) == ski(ca)
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert len(own) == 0
    assert own.next_update_utc == intermediate.not_valid_after_utc
    assert own.last_update_utc == intermediate.not_valid_before_utc


def issue(cli: Cli, out: Path, *args: str) -> dict[str, str]:
    issued = cli.ok("istio", "issue", "--cluster", "east", "--out", str(out), "--json", *args)
    result = json.loads(issued)
    assert isinstance(result, dict)
    return result


def read_secret(path: Path) -> dict[str, bytes]:
    document = yaml.safe_load(path.read_text())
    return {name: base64.b64decode(value) for name, value in document["data"].items()}


def test_files_revoking_the_intermediate_reaches_ca_crl_pem(
    ctx: Context, cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "east"
    issued = issue(cli, out, "--format", "files", "--with-crl")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(files) == CACERTS | {"ca-crl.pem"}
    assert (out / "ca-crl.pem").stat().st_mode & 0o777 == 0o644  # public, like the certificates
    assert_crl_per_ca(files)
    code, output = verify_workload(files, tmp_path / "before")
    assert code == 0, output

    job = job_named("istio-intermediates")
    assert job.run(ctx) == "nothing due"  # the root CRL has not changed
    cli.ok("revoke", issued["serial"], "--reason", "keyCompromise", "--yes")
    assert job.run(ctx) == "east: ca-crl.pem now with root CRL #2"
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {name: after[name] for name in CACERTS} == {name: files[name] for name in CACERTS}
    own, root_crl = crls(after["ca-crl.pem"])
    assert own == crls(files["ca-crl.pem"])[0]  # the intermediate's block is kept as it was
    revoked = root_crl.get_revoked_certificate_by_serial_number(int(issued["serial"], 16))
    assert revoked is not None
    assert_crl_per_ca(after)
    code, output = verify_workload(after, tmp_path / "after")
    assert code != 0 and "certificate revoked" in output, output
    assert job.run(ctx) == "nothing due"


def test_secret_yaml_gets_ca_crl_pem_rewritten_in_place(
    ctx: Context, cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "cacerts.yaml"
    issued = issue(cli, out, "--with-crl")
    data = read_secret(out)
    assert set(data) == CACERTS | {"ca-crl.pem"}
    assert_crl_per_ca(data)
    assert verify_workload(data, tmp_path / "before")[0] == 0

    cli.ok("revoke", issued["serial"], "--yes")
    job_named("istio-intermediates").run(ctx)
    assert out.stat().st_mode & 0o777 == 0o600
    after = read_secret(out)
    assert set(after) == set(data)
    assert {name: after[name] for name in CACERTS} == {name: data[name] for name in CACERTS}
    assert after["ca-crl.pem"] != data["ca-crl.pem"]
    code, output = verify_workload(after, tmp_path / "after")
    assert code != 0 and "certificate revoked" in output, output


@pytest.mark.parametrize("output_format", ["files", "secret-yaml"])
def test_without_with_crl_there_is_no_ca_crl_pem(
    cli: Cli, tmp_path: Path, output_format: str
) -> None:
    out = tmp_path / ("east" if output_format == "files" else "cacerts.yaml")
    issue(cli, out, "--format", output_format)
    names = {p.name for p in out.iterdir()} if out.is_dir() else set(read_secret(out))
    assert names == CACERTS


def test_renewal_keeps_the_crl_option(
    ctx: Context, cli: Cli, clock: FixedClock, tmp_path: Path
) -> None:
    out = tmp_path / "cacerts.yaml"
    issued = issue(cli, out, "--with-crl", "--ttl", "3h")
    clock.advance(dt.timedelta(hours=2, minutes=1))  # past 2/3 of its life
    result = job_named("istio-intermediates").run(ctx)
    data = read_secret(out)
    (cert,) = x509.load_pem_x509_certificates(data["ca-cert.pem"])
    assert result == f"renewed east -> {format(cert.serial_number, 'x')[:12]}"
    assert format(cert.serial_number, "x") != issued["serial"]
    assert set(data) == CACERTS | {"ca-crl.pem"}
    assert_crl_per_ca(data)


def test_refused_with_the_tls_form(cli: Cli, tmp_path: Path) -> None:
    """istiod loads no CRL next to tls.crt/tls.key/ca.crt (it returns before looking)."""
    out = tmp_path / "cacerts.yaml"
    result = cli("istio", "issue", "--cluster", "east", "--out", str(out),
                 "--format", "tls-secret-yaml", "--with-crl")  # fmt: skip
    assert result.code == 2, result
    assert "--with-crl needs --format secret-yaml or files" in result.err
    assert not out.exists()
