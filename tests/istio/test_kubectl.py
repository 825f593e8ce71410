"""``trellis istio issue --kubeconfig``: the real ``kubectl`` server-side-applies the ``cacerts``
Secret, the renewal job re-applies it, failures are typed and recorded.

There is no Kubernetes API server on the test machines, so kubectl talks to the loopback
stand-in in ``tests/istio/kubeapi.py`` (it answers kubectl's discovery and stores applied
Secrets; it is not kube-apiserver). kubectl runs through a shim that logs its argv, to show the
key is only ever in the request body; its discovery cache goes to a ``HOME`` under tmp_path, so
the scan for key material covers every file the test run wrote.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, select

from ca.clock import FixedClock
from ca.config import Context
from ca.istio import RENEWAL_INTERVAL, IstioParams, deliver, issue_istio_intermediate
from ca.jobs import job_named
from ca.scheduler import run_job
from ca.store.models import CertificateRow, IstioClusterRow
from tests.conftest import free_port
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import Cli, crls, load_key, openssl_verify
from tests.istio.kubeapi import TOKEN, KubeApi, kubeconfig, serve

KUBECTL = shutil.which("kubectl")
pytestmark = [
    SQLITE_ONLY,
    pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (Debian: kubernetes-client)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]
CACERTS = {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
SECRET = ("istio-system", "cacerts")


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeApi]:
    """The stand-in, a kubeconfig for it, and kubectl behind an argv-logging shim on PATH."""
    api, server = serve(tmp_path / "kube")
    shim = tmp_path / "bin" / "kubectl"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/kubectl-argv.log\n'
                    f'exec {KUBECTL} "$@"\n')  # fmt: skip
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:/usr/bin:/bin")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    kubeconfig(tmp_path / "kubeconfig", api.url, api.ca_pem, context="east-admin")
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def applied(api: KubeApi) -> dict[str, bytes]:
    secret = api.secrets[SECRET]
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "trellis"}
    return {name: base64.b64decode(value) for name, value in secret["data"].items()}


def assert_valid_cacerts(data: dict[str, bytes], directory: Path, at: dt.datetime) -> None:
    """The intermediate verifies to root-cert.pem through cert-chain.pem (openssl), and the key
    is the certificate's (checked in memory: the key is never written to disk here)."""
    directory.mkdir()
    for name in CACERTS - {"ca-key.pem"}:
        (directory / name).write_bytes(data[name])
    verified = openssl_verify(
        directory / "root-cert.pem", directory / "ca-cert.pem", directory / "cert-chain.pem", at=at
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    (cert,) = x509.load_pem_x509_certificates(data["ca-cert.pem"])
    assert load_key(data["ca-key.pem"]).public_key() == cert.public_key()


def key_material(key_pem: bytes) -> list[bytes]:
    der = load_key(key_pem).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return [der, key_pem[40:90], base64.b64encode(key_pem)[20:80], base64.b64encode(der)[16:64]]


def assert_nowhere_but_the_body(api: KubeApi, tmp_path: Path, key_pem: bytes) -> None:
    secrets = key_material(key_pem)
    for request in api.requests:
        seen = f"{request.path}?{request.query}".encode()
        assert not any(s in seen for s in secrets)
        if request.method != "PATCH":
            assert not any(s in request.body for s in secrets)
    argv = (tmp_path / "kubectl-argv.log").read_bytes()
    applied = b"apply --server-side --field-manager=trellis --force-conflicts --validate=false -f -"
    assert applied in argv
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert tmp_path / "kubectl-argv.log" in files and tmp_path / "kubeconfig" in files
    for path in files:
        content = path.read_bytes()
        assert not any(s in content for s in secrets), path


def test_issue_applies_the_cacerts_secret(
    ctx: Context, cli: Cli, kube: KubeApi, tmp_path: Path
) -> None:
    issued = json.loads(
        cli.ok("istio", "issue", "--cluster", "east", "--kubeconfig", str(tmp_path / "kubeconfig"),
               "--kube-context", "east-admin", "--json")
    )  # fmt: skip
    assert issued["written"] == []
    assert issued["applied"].startswith("secret/cacerts serverside-applied (kubeconfig ")
    data = applied(kube)
    assert set(data) == CACERTS
    assert_valid_cacerts(data, tmp_path / "check", ctx.clock.now())
    (cert,) = x509.load_pem_x509_certificates(data["ca-cert.pem"])
    assert format(cert.serial_number, "x") == issued["serial"]

    (patch,) = [r for r in kube.requests if r.method == "PATCH"]
    assert patch.path == "/api/v1/namespaces/istio-system/secrets/cacerts"
    assert patch.content_type == "application/apply-patch+yaml"
    assert patch.query["fieldManager"] == ["trellis"] and patch.query["force"] == ["true"]
    assert any(s in patch.body for s in key_material(data["ca-key.pem"])[2:])  # only here
    assert_nowhere_but_the_body(kube, tmp_path, data["ca-key.pem"])

    (listed,) = json.loads(cli.ok("istio", "list", "--json"))
    assert listed["output"] is None and listed["last_error"] is None
    assert listed["kubeconfig"] == str((tmp_path / "kubeconfig").resolve())
    assert listed["kube_context"] == "east-admin"


def test_the_renewal_job_reapplies_a_new_intermediate(
    ctx: Context, clock: FixedClock, kube: KubeApi, tmp_path: Path
) -> None:
    params = IstioParams("east", kubeconfig=tmp_path / "kubeconfig", with_crl=True)
    deliver(ctx, issue_istio_intermediate(ctx, params), params)
    first = applied(kube)
    assert set(first) == CACERTS | {"ca-crl.pem"}

    clock.advance(dt.timedelta(days=21))  # past 2/3 of the default 30 days
    result = job_named("istio-intermediates").run(ctx)
    renewed = applied(kube)
    (cert,) = x509.load_pem_x509_certificates(renewed["ca-cert.pem"])
    assert result == f"renewed east -> {format(cert.serial_number, 'x')[:12]}"
    assert renewed["ca-key.pem"] != first["ca-key.pem"]
    assert renewed["root-cert.pem"] == first["root-cert.pem"]
    assert set(renewed) == CACERTS | {"ca-crl.pem"}
    assert_valid_cacerts(renewed, tmp_path / "check", clock.now())
    assert_nowhere_but_the_body(kube, tmp_path, renewed["ca-key.pem"])


def test_a_revocation_reaches_ca_crl_pem_without_the_key(
    ctx: Context, cli: Cli, kube: KubeApi, tmp_path: Path
) -> None:
    """Only ``data.ca-crl.pem`` is applied, under its own field manager, so the keys the full
    apply owns stay (server-side apply would drop them from a partial apply by ``trellis``)."""
    issued = json.loads(
        cli.ok("istio", "issue", "--cluster", "east", "--kubeconfig", str(tmp_path / "kubeconfig"),
               "--with-crl", "--json")
    )  # fmt: skip
    before = applied(kube)
    cli.ok("revoke", issued["serial"], "--yes")
    assert job_named("istio-intermediates").run(ctx) == "east: ca-crl.pem now with root CRL #2"
    after = applied(kube)
    assert {k: after[k] for k in CACERTS} == {k: before[k] for k in CACERTS}
    _, root_crl = crls(after["ca-crl.pem"])
    assert root_crl.get_revoked_certificate_by_serial_number(int(issued["serial"], 16))
    crl_patch = [r for r in kube.requests if r.method == "PATCH"][-1]
    assert crl_patch.query["fieldManager"] == ["trellis-crl"]
    assert b"ca-key.pem" not in crl_patch.body


def test_a_first_delivery_that_fails_records_no_cluster(
    ctx: Context, cli: Cli, kube: KubeApi, tmp_path: Path, clock: FixedClock
) -> None:
    """exit 8 said the issue failed, yet the cluster was recorded, and the job issued it a new
    intermediate every 5 minutes, forever, for a target that never worked. A cluster whose
    first delivery fails is not kept; its certificate is (the issuance happened)."""
    dead = kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{free_port()}", kube.ca_pem)
    result = cli("istio", "issue", "--cluster", "east", "--kubeconfig", str(dead))
    assert result.code == 8, result  # Unavailable
    (line,) = result.err.strip().splitlines()
    assert "kubectl apply (kubeconfig " in line and "failed (exit 1)" in line
    assert "connection refused" in line.lower(), line
    assert line.endswith("; cluster east is not recorded (issue it again)"), line
    assert json.loads(cli.ok("istio", "list", "--json")) == []
    assert _istio_certificates(ctx) == 1
    for _ in range(3):
        clock.advance(RENEWAL_INTERVAL)
        assert job_named("istio-intermediates").run(ctx) == "nothing due"
    assert _istio_certificates(ctx) == 1
    kubeconfig(tmp_path / "kubeconfig", kube.url, kube.ca_pem)  # the server is there
    cli.ok("istio", "issue", "--cluster", "east", "--kubeconfig", str(dead))
    assert set(applied(kube)) == CACERTS


def test_an_unreachable_server_fails_clearly_and_is_retried(
    ctx: Context, cli: Cli, kube: KubeApi, tmp_path: Path, clock: FixedClock
) -> None:
    """A cluster Trellis already serves: the failure is recorded and the job retries it."""
    config = tmp_path / "kubeconfig"
    cli.ok("istio", "issue", "--cluster", "east", "--kubeconfig", str(config))
    delivered = applied(kube)
    dead = kubeconfig(config, f"https://127.0.0.1:{free_port()}", kube.ca_pem)
    result = cli("istio", "issue", "--cluster", "east", "--kubeconfig", str(dead))
    assert result.code == 8, result  # Unavailable
    (line,) = result.err.strip().splitlines()
    assert "kubectl apply (kubeconfig " in line and "failed (exit 1)" in line
    assert "connection refused" in line.lower() and "not recorded" not in line, line
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.last_error and "connection refused" in row.last_error
        first_serial = row.serial
    assert "delivery failed, the scheduler retries" in cli.ok("istio", "list")

    job = job_named("istio-intermediates")
    clock.advance(RENEWAL_INTERVAL)  # the job's next scheduled run retries it
    on_the_row: list[str] = []

    def seen(*args: object) -> None:
        statement = " ".join(str(args[2]).split())
        if "istio_cluster" in statement:
            on_the_row.append(statement)

    sa.event.listen(ctx.engine, "before_cursor_execute", seen)
    try:
        run = run_job(ctx, job)
    finally:
        sa.event.remove(ctx.engine, "before_cursor_execute", seen)
    assert run is not None and not run.last_ok
    # The failure is recorded once: its UPDATE is the last statement on the cluster's row (a
    # second recording of the same error read the row again, for an UPDATE with no change).
    assert on_the_row[-1].startswith("UPDATE istio_cluster SET last_error="), on_the_row
    # Read over HTTP: the cluster, not its kubeconfig's path (the row and the log have that).
    assert run.last_result == "Unavailable: delivery failing: east (trellis istio list)"
    assert applied(kube) == delivered

    kubeconfig(tmp_path / "kubeconfig", kube.url, kube.ca_pem)  # the server is back
    clock.advance(dt.timedelta(seconds=10))  # the scheduler's first retry: too soon to issue
    run = run_job(ctx, job)
    assert run is not None and not run.last_ok and "retried from" in run.last_result
    clock.advance(RENEWAL_INTERVAL)
    run = run_job(ctx, job)
    assert run is not None and run.last_ok, run.last_result
    assert run.last_result.startswith("renewed east -> ")
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.last_error is None and row.serial != first_serial
    assert set(applied(kube)) == CACERTS and applied(kube) != delivered


def _istio_certificates(ctx: Context) -> int:
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CertificateRow).where(CertificateRow.profile == "istio-intermediate")
        ).all()
    return len(rows)


def test_kubectl_missing_is_a_typed_error_before_anything_is_issued(
    ctx: Context, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was found only when applying: an intermediate was issued (its key lost) and the
    cluster recorded, so the job issued another every 5 minutes."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    config = tmp_path / "kubeconfig"
    config.write_text("apiVersion: v1\nkind: Config\n")
    result = cli("istio", "issue", "--cluster", "east", "--kubeconfig", str(config))
    assert result.code == 8
    (line,) = result.err.strip().splitlines()
    assert "kubectl is not installed" in line, line
    assert json.loads(cli.ok("istio", "list", "--json")) == []
    assert _istio_certificates(ctx) == 0


@pytest.mark.parametrize(
    ("options", "config", "reason"),
    [
        (("--kube-context", "nosuch"), None,
         "--kube-context 'nosuch' does not exist in it (contexts: east-admin)"),
        ((), {"current-context": ""}, "has no current-context: give --kube-context"),
        ((), {"current-context": "gone"},
         "its current-context 'gone' does not exist in it (contexts: east-admin)"),
        (("--kube-context", "east-admin"), {"clusters": []},
         "context 'east-admin' names no cluster with a server in it"),
        ((), "clusters: [\n", "kubectl cannot load it: error loading config file"),
    ],
    ids=["fail/no-such-context", "fail/no-current-context", "fail/current-context-missing",
         "fail/no-cluster", "fail/not-yaml"],
)  # fmt: skip
def test_a_kubeconfig_kubectl_would_refuse_issues_nothing(
    ctx: Context, cli: Cli, kube: KubeApi, tmp_path: Path,
    options: tuple[str, ...], config: dict[str, object] | str | None, reason: str,
) -> None:  # fmt: skip
    """What kubectl says without asking the cluster is asked before an intermediate is issued
    (exit 2, nothing issued or recorded): a failed apply loses the key, and a recorded cluster
    whose context does not exist cost a new intermediate every 5 minutes, forever."""
    path = tmp_path / "kubeconfig"
    if isinstance(config, str):
        path.write_text(config)
    elif config is not None:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
    result = cli("istio", "issue", "--cluster", "east", "--kubeconfig", str(path), *options)
    assert result.code == 2, result
    (line,) = result.err.strip().splitlines()
    assert line.startswith(f"trellis: --kubeconfig {path}") and reason in line, line
    assert "REDACTED" not in line and TOKEN not in line
    assert json.loads(cli.ok("istio", "list", "--json")) == []
    assert _istio_certificates(ctx) == 0
    assert not [r for r in kube.requests if r.method == "PATCH"]


def test_the_job_issues_nothing_for_a_context_that_is_gone(
    ctx: Context, cli: Cli, kube: KubeApi, tmp_path: Path, clock: FixedClock
) -> None:
    """A recorded cluster whose kubeconfig lost its context fails each run without an
    intermediate being issued; it is renewed once the context is back."""
    path = tmp_path / "kubeconfig"
    params = IstioParams("east", kubeconfig=path, kube_context="east-admin")
    deliver(ctx, issue_istio_intermediate(ctx, params), params)
    kubeconfig(path, kube.url, kube.ca_pem, context="renamed")
    clock.advance(dt.timedelta(days=21))  # due
    job = job_named("istio-intermediates")
    for _ in range(3):
        run = run_job(ctx, job)
        assert run is not None and not run.last_ok
        assert run.last_result == "Unavailable: delivery failing: east (trellis istio list)"
        clock.advance(RENEWAL_INTERVAL)
    assert _istio_certificates(ctx) == 1
    (listed,) = json.loads(cli.ok("istio", "list", "--json"))
    assert "--kube-context 'east-admin' does not exist in it" in listed["last_error"]
    kubeconfig(path, kube.url, kube.ca_pem, context="east-admin")
    run = run_job(ctx, job)
    assert run is not None and run.last_ok and run.last_result.startswith("renewed east -> ")
    assert _istio_certificates(ctx) == 2


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--out", "x.yaml", "--kubeconfig", "k"), "give either --out or --kubeconfig"),
        (("--out", "x.yaml", "--kube-context", "c"), "--kube-context needs --kubeconfig"),
        (("--kubeconfig", "k", "--format", "files"), "--kubeconfig applies a Secret"),
    ],
    ids=["fail/out-and-kubeconfig", "fail/context-alone", "fail/files"],
)
def test_refused(cli: Cli, tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    result = cli("istio", "issue", "--cluster", "east", *args)
    assert result.code == 2, result
    assert reason in result.err
    assert json.loads(cli.ok("istio", "list", "--json")) == []
