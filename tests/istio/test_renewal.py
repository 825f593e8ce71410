"""The scheduled renewal of plug-in CA intermediates: re-issued into the recorded output once
2/3 of the intermediate's life has passed, and not before (``ca.istio.renew_due_clusters``, the
``istio-intermediates`` job), on the suite's ``FixedClock``."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.istio import IstioParams, issue_istio_intermediate, renew_due_clusters, write_output
from ca.jobs import job_named
from ca.profiles import BACKDATE
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import load_key, openssl_verify

pytestmark = [
    SQLITE_ONLY,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]
TTL = Ttl(3 * 3600)


def read(out: Path, output_format: str) -> dict[str, bytes]:
    if output_format == "files":
        return {p.name: p.read_bytes() for p in out.iterdir()}
    document = yaml.safe_load(out.read_text())
    return {name: base64.b64decode(value) for name, value in document["data"].items()}


@pytest.mark.parametrize("output_format", ["files", "secret-yaml"])
def test_renewed_after_two_thirds_of_its_life_not_before(
    ctx: Context, clock: FixedClock, tmp_path: Path, output_format: str
) -> None:
    out = tmp_path / ("east" if output_format == "files" else "cacerts.yaml")
    params = IstioParams("east", ttl=TTL, output=out, output_format=output_format)
    first = issue_istio_intermediate(ctx, params)
    write_output(first, output_format, out)
    issued = read(out, output_format)
    not_before = first.certificate.not_valid_before_utc
    life = first.certificate.not_valid_after_utc - not_before
    due = not_before + life * 2 / 3

    clock.current = due - dt.timedelta(seconds=1)
    assert renew_due_clusters(ctx) == []
    assert job_named("istio-intermediates").run(ctx) == "nothing due"
    assert read(out, output_format) == issued

    clock.current = due + dt.timedelta(seconds=1)
    (renewed,) = renew_due_clusters(ctx)
    files = read(out, output_format)
    (cert,) = x509.load_pem_x509_certificates(files["ca-cert.pem"])
    assert cert.serial_number != first.certificate.serial_number
    assert renewed == f"renewed east -> {format(cert.serial_number, 'x')[:12]}"
    assert cert.not_valid_before_utc == clock.now() - BACKDATE
    assert cert.not_valid_after_utc == clock.now() + TTL.delta
    assert load_key(files["ca-key.pem"]).public_key() == cert.public_key()
    assert files["ca-key.pem"] != issued["ca-key.pem"]  # a fresh key every time
    assert files["root-cert.pem"] == issued["root-cert.pem"]  # same root: istiod hot-reloads

    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    verified = openssl_verify(
        tmp_path / "root-cert.pem", tmp_path / "ca-cert.pem", tmp_path / "cert-chain.pem",
        at=clock.now(),
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr

    assert renew_due_clusters(ctx) == []  # the new one is not due


def test_clusters_without_an_output_are_not_renewed(ctx: Context, clock: FixedClock) -> None:
    issue_istio_intermediate(ctx, IstioParams("east", ttl=TTL))
    clock.advance(TTL.delta)
    assert renew_due_clusters(ctx) == []
