"""The scheduled renewal of plug-in CA intermediates: re-issued into the recorded output once
2/3 of the intermediate's life has passed, and not before (``ca.istio.renew_due_clusters``, the
``istio-intermediates`` job), on the suite's ``FixedClock``."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from sqlmodel import Session, select

from ca.certs import revoke_certificate
from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.errors import Unavailable
from ca.istio import (
    MIN_TTL,
    RENEWAL_INTERVAL,
    IstioParams,
    deliver,
    issue_istio_intermediate,
    renew_due_clusters,
    write_output,
)
from ca.jobs import job_named
from ca.profiles import BACKDATE
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CertificateRow, IstioClusterRow
from cli.launch import Interrupted
from tests.conftest import interrupt_a_rename
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


def test_a_cluster_recorded_with_a_ttl_below_the_minimum_is_renewed_with_it(
    ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """A cluster recorded before MIN_TTL (an hour) existed, with a 10 s intermediate, is
    renewed with an hour, not refused at every run."""
    out = tmp_path / "cacerts.yaml"
    params = IstioParams("east", ttl=TTL, output=out)
    deliver(ctx, issue_istio_intermediate(ctx, params), params)
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None
        row.ttl_seconds = 10
        session.add(row)
        session.commit()
    clock.advance(TTL.delta)
    (renewed,) = renew_due_clusters(ctx)
    (cert,) = x509.load_pem_x509_certificates(read(out, "secret-yaml")["ca-cert.pem"])
    assert renewed == f"renewed east -> {format(cert.serial_number, 'x')[:12]}"
    assert cert.not_valid_after_utc == clock.now() + MIN_TTL.delta
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.ttl_seconds == MIN_TTL.seconds and row.last_error is None


def _issued(ctx: Context) -> dict[str, int]:
    """Istio intermediates issued so far, per cluster."""
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CertificateRow).where(CertificateRow.profile == "istio-intermediate")
        ).all()
    return dict(Counter(row.requested_by.split("istio cluster ")[1].rstrip(")") for row in rows))


def _run(ctx: Context) -> str:
    """One run of the job; its failure message, or "ok: <result>"."""
    try:
        return "ok: " + job_named("istio-intermediates").run(ctx)
    except Unavailable as exc:
        return exc.detail


def test_an_output_that_cannot_be_written_fails_without_issuing(
    ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """The recorded output is judged before a renewal is issued: an intermediate for a path
    that cannot be written is an active CA certificate whose key is lost."""
    east = tmp_path / "east"
    issue_istio_intermediate(ctx, IstioParams("east", ttl=TTL, output=east, output_format="files"))
    clock.advance(TTL.delta * 2 / 3 + dt.timedelta(seconds=1))  # east is due
    west = tmp_path / "west.yaml"
    issue_istio_intermediate(ctx, IstioParams("west", ttl=TTL, output=west))  # west is not
    east.write_text("a file where the directory was\n")

    for _ in range(3):  # the scheduled run, then the scheduler's quicker retries
        message = _run(ctx)
        assert message.startswith(f"east: the output {east}: exists and is not a directory")
        assert "west" not in message
        assert _issued(ctx) == {"east": 1, "west": 1}
        clock.advance(dt.timedelta(seconds=10))
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.last_error and "not a directory" in row.last_error

    east.unlink()  # repaired: the next run delivers a new intermediate
    assert _run(ctx).startswith("ok: renewed east -> ")
    assert _issued(ctx) == {"east": 2, "west": 1}
    assert sorted(p.name for p in east.iterdir()) == sorted(read(east, "files"))
    assert _run(ctx) == "ok: nothing due"


def test_a_failed_delivery_is_retried_on_the_next_scheduled_run(
    ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """docs/istio.md: the job's next run (5 minutes) issues a new intermediate for a cluster
    whose delivery failed; the scheduler's retries of the failed run in between (10 s, 20 s,
    40 s, ...) report the failure without issuing another undeliverable intermediate, and
    re-issue no other cluster."""
    east, west = tmp_path / "east", tmp_path / "west.yaml"
    issue_istio_intermediate(ctx, IstioParams("east", ttl=TTL, output=east, output_format="files"))
    issue_istio_intermediate(ctx, IstioParams("west", ttl=TTL, output=west))
    (east / "ca-key.pem").mkdir(parents=True)  # writable directory, but the key cannot land
    clock.advance(TTL.delta * 2 / 3 + dt.timedelta(seconds=1))  # both are due

    first, failed_at = _run(ctx), clock.now()
    assert first.startswith("east: the output could not be written: Is a directory"), first
    assert _issued(ctx) == {"east": 2, "west": 2}
    # west delivered; east's ca-cert.pem, which stood there without its key, is not written
    assert (west.exists(), (east / "ca-cert.pem").exists()) == (True, False)
    for retry in (10, 30, 70, 150):  # the scheduler's retries: 10 s, 20 s, 40 s, 80 s apart
        clock.current = failed_at + dt.timedelta(seconds=retry)
        message = _run(ctx)
        assert message.startswith("east: the output could not be written: Is a directory")
        assert "retried from" in message
        assert _issued(ctx) == {"east": 2, "west": 2}, retry
    clock.current = failed_at + dt.timedelta(seconds=300)  # the next scheduled run
    assert _run(ctx).startswith("east: the output could not be written")
    assert _issued(ctx) == {"east": 3, "west": 2}

    (east / "ca-key.pem").rmdir()
    clock.advance(dt.timedelta(minutes=5))
    assert _run(ctx).startswith("ok: renewed east -> ")
    assert _issued(ctx) == {"east": 4, "west": 2}


def test_a_delivery_interrupted_is_recorded_and_retried(
    ctx: Context, clock: FixedClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (``cli.launch.Interrupted``, a ``BaseException``) while ``trellis istio issue``
    writes the output of a cluster it serves: nothing was recorded, so the cluster passed for
    delivered and the job left it, its intermediate's key lost, until that intermediate was
    due."""
    east = tmp_path / "east"
    params = IstioParams("east", ttl=TTL, output=east, output_format="files")
    deliver(ctx, issue_istio_intermediate(ctx, params), params)
    intermediate = issue_istio_intermediate(ctx, params)

    def interrupted(*_args: object) -> list[Path]:
        raise Interrupted

    with monkeypatch.context() as patched, pytest.raises(Interrupted):
        patched.setattr("ca.istio.write_output", interrupted)
        deliver(ctx, intermediate, params)
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.last_error == "not delivered: Interrupted"
    clock.advance(RENEWAL_INTERVAL)
    assert _run(ctx).startswith("ok: renewed east -> ")
    assert _issued(ctx) == {"east": 3}


@pytest.mark.parametrize("stop", ["interrupted", "failed"])
def test_a_first_delivery_stopped_records_no_cluster(
    ctx: Context, clock: FixedClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """The cluster's first delivery, stopped (Ctrl-C) or failed: the command said so, and the
    cluster is not kept for the job to issue to every 5 minutes; its certificate is."""
    east = tmp_path / "east"
    params = IstioParams("east", ttl=TTL, output=east, output_format="files")
    intermediate = issue_istio_intermediate(ctx, params)

    def stopped(*_args: object) -> list[Path]:
        raise Interrupted if stop == "interrupted" else OSError(28, "No space left on device")

    expected = Interrupted if stop == "interrupted" else Unavailable
    with monkeypatch.context() as patched, pytest.raises(expected) as raised:
        patched.setattr("ca.istio.write_output", stopped)
        deliver(ctx, intermediate, params)
    if stop == "failed":
        assert str(raised.value) == (
            "the output could not be written: No space left on device; "
            "cluster east is not recorded (issue it again)"
        )
    with Session(ctx.engine) as session:
        assert session.exec(select(IstioClusterRow)).all() == []
    clock.advance(RENEWAL_INTERVAL)
    assert _run(ctx) == "ok: nothing due"
    assert _issued(ctx) == {"east": 1}


def test_a_first_delivery_does_not_forget_an_issuance_that_replaced_it(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``istio issue`` of a new cluster at once: the first one's failed delivery leaves
    the second one's record alone (that one's delivery decides)."""
    east = tmp_path / "east.yaml"
    params = IstioParams("east", ttl=TTL, output=east)
    first = issue_istio_intermediate(ctx, params)
    second = issue_istio_intermediate(ctx, params)
    with monkeypatch.context() as patched, pytest.raises(Unavailable) as raised:
        patched.setattr(
            "ca.istio.write_output", lambda *_: (_ for _ in ()).throw(OSError(5, "EIO"))
        )
        deliver(ctx, first, params)
    assert "not recorded" not in str(raised.value)
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.serial == format(second.certificate.serial_number, "x")


@pytest.mark.parametrize("after", [1, 2, 4])
def test_a_write_stopped_part_way_leaves_the_old_files_whole(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """--format files wrote ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem and
    ca-crl.pem one after the other: Ctrl-C (or a full disk) between two left a new key beside
    the old certificate, which istiod cannot load. Now the old set stays, every file of it,
    nothing staged is left, and the failure is recorded for the job to re-issue."""
    east = tmp_path / "east"
    params = IstioParams("east", ttl=TTL, output=east, output_format="files", with_crl=True)
    write_output(issue_istio_intermediate(ctx, params), "files", east)
    before = read(east, "files")
    assert len(before) == 5
    with monkeypatch.context() as patched, pytest.raises(Interrupted):
        interrupt_a_rename(patched, east, after=after)
        deliver(ctx, issue_istio_intermediate(ctx, params), params)
    assert read(east, "files") == before  # hidden staged or kept files would show here
    cert = x509.load_pem_x509_certificate(before["ca-cert.pem"])
    assert load_key(before["ca-key.pem"]).public_key() == cert.public_key()
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.last_error == "not delivered: Interrupted"


def test_one_cluster_failing_unforeseen_is_recorded_and_the_others_renew(
    ctx: Context, clock: FixedClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure that is no TrellisError or OSError, here the codec's UnicodeDecodeError from a
    cacerts.yaml overwritten with bytes that are not UTF-8 (its ca-crl.pem due a new root CRL),
    escaped the job: the clusters after it were not renewed, and nothing was recorded on it.
    Now it is recorded on its cluster (its traceback logged), the others renew, and the run
    fails naming it."""
    east, west = tmp_path / "east.yaml", tmp_path / "west"
    east_params = IstioParams("east", ttl=Ttl(4 * TTL.seconds), output=east, with_crl=True)
    write_output(issue_istio_intermediate(ctx, east_params), "secret-yaml", east)
    west_params = IstioParams("west", ttl=TTL, output=west, output_format="files")
    revoked = issue_istio_intermediate(ctx, west_params)
    write_output(revoked, "files", west)
    serial = Serial(revoked.certificate.serial_number)
    revoke_certificate(ctx, serial, RevocationReason.SUPERSEDED, "tests/istio")  # new root CRL
    east.write_bytes(b"\xff\xfe not the cacerts Secret\n")
    clock.advance(TTL.delta * 2 / 3 + dt.timedelta(seconds=1))  # west is due, east is not

    with caplog.at_level(logging.ERROR, logger="trellis.istio"):
        message = _run(ctx)
    assert message == "east: unexpected UnicodeDecodeError (logged with its traceback)", message
    assert _issued(ctx) == {"east": 1, "west": 2}
    assert x509.load_pem_x509_certificate((west / "ca-cert.pem").read_bytes()).serial_number != (
        revoked.certificate.serial_number
    )
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert (
            row is not None
            and row.last_error == "unexpected UnicodeDecodeError (logged with its traceback)"
        )
    (logged,) = [r for r in caplog.records if r.name == "trellis.istio"]
    assert logged.exc_info is not None and logged.exc_info[0] is UnicodeDecodeError
    assert "east" in logged.getMessage()


def test_a_cacerts_yaml_broken_by_hand_is_refused_without_quoting_its_key(
    ctx: Context, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cacerts.yaml someone edited into invalid YAML, due a new root CRL: PyYAML's error
    quotes the line it stopped on, here ``ca-key.pem``'s base64, and the job logged that error's
    traceback. Now the cluster is failed as not holding the Secret Trellis wrote, and no part of
    the key reaches a log record."""
    east = tmp_path / "east.yaml"
    params = IstioParams("east", ttl=TTL, output=east, with_crl=True)
    intermediate = issue_istio_intermediate(ctx, params)
    write_output(intermediate, "secret-yaml", east)
    key = yaml.safe_load(east.read_text())["data"]["ca-key.pem"]
    east.write_text(east.read_text().replace(f"ca-key.pem: {key}", f"ca-key.pem: {key}: x"))
    with pytest.raises(yaml.YAMLError, match="mapping values"):
        yaml.safe_load(east.read_text())
    other = issue_istio_intermediate(ctx, IstioParams("west", ttl=TTL))
    revoke_certificate(  # a new root CRL: east's ca-crl.pem is due
        ctx, Serial(other.certificate.serial_number), RevocationReason.SUPERSEDED, "tests/istio"
    )

    with caplog.at_level(logging.DEBUG):
        message = _run(ctx)
    assert message == f"east: {east} is not the cacerts Secret Trellis wrote", message
    quoted = [key[i : i + 24] for i in range(0, len(key) - 24, 8) if key[i : i + 24] in caplog.text]
    assert not quoted
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, "east")
        assert row is not None and row.last_error == message.removeprefix("east: ")
    # What /readyz and GET /v1/jobs show of the run names the cluster, not the file.
    with pytest.raises(Unavailable) as again:
        job_named("istio-intermediates").run(ctx)
    assert again.value.public.startswith("delivery failing: east (retried from ")
    assert str(east) in again.value.detail
