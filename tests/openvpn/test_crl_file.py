"""The CRL file OpenVPN's crl-verify reads: a CRL for every CA of the chain, rewritten by the
revoking command and by the ``openvpn-crl`` job, and ``crl_health`` for ``/readyz``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ca import certs
from ca.authority import active_issuer
from ca.clock import FixedClock
from ca.config import Context
from ca.errors import Unavailable
from ca.jobs import job_named
from ca.openvpn import ClientRequest, VpnName, add_client, crl_health, crl_pem, write_crl_file
from ca.revocation import RevocationReason
from ca.rotation import rotate
from ca.scheduler import FAILING_AFTER, run_job
from ca.serial import Serial
from tests.conftest import sqlite_database
from tests.openvpn.vpnkit import crls_in


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite only: nothing here depends on the database (test_clients.py and test_rest.py run
    on both)."""
    return sqlite_database(request, tmp_path / "trellis.db")


def _health(ctx: Context) -> str:
    """What ``crl_health`` tells the operator ("" for nothing)."""
    problem = crl_health(ctx)
    return problem.detail if problem else ""


def _serial(ctx: Context, name: str) -> Serial:
    return add_client(ctx, ClientRequest(VpnName(name))).serial


def test_configuring_a_path_writes_the_file_at_once(vpn: Context, crl_file: Path) -> None:
    assert crl_file.read_bytes() == crl_pem(vpn)
    assert crl_health(vpn) is None


def test_every_unexpired_ca_has_a_crl_even_mid_rotation(vpn: Context, crl_file: Path) -> None:
    """A prepared intermediate issues nothing yet, but once it is activated its clients must
    pass CRL_CHECK_ALL at once: its CRL is in the file from the moment it exists."""
    old = active_issuer(vpn, "vpn").certificate
    [transition] = rotate(vpn, "vpn", force=True)
    assert transition.event == "prepared"
    assert crl_health(vpn) is not None  # the file lacks the new CA's CRL until rewritten
    write_crl_file(vpn)
    issuers = [crl.issuer for crl in crls_in(crl_file.read_bytes())]
    assert len(issuers) == 3 and issuers[0] == old.subject
    assert crl_health(vpn) is None


def test_the_job_rewrites_only_what_changed_and_reports_health(
    vpn: Context, crl_file: Path, clock: FixedClock
) -> None:
    job = job_named("openvpn-crl")
    assert job.run(vpn) == "1 OpenVPN CRL file(s) current"
    mtime = crl_file.stat().st_mtime_ns
    crl_file.touch()
    touched = crl_file.stat().st_mtime_ns
    job.run(vpn)
    assert crl_file.stat().st_mtime_ns == touched  # unchanged content: not rewritten
    # a revocation whose file write was missed (another replica): the job catches up
    serial = _serial(vpn, "mallory")
    # (publish=False: as if another replica revoked and this host's file was not rewritten)
    certs.revoke_certificate(vpn, serial, RevocationReason.KEY_COMPROMISE, "test", publish=False)
    assert crl_health(vpn) is None  # not stale yet: within CRL_STALE_AFTER
    clock.advance(dt.timedelta(minutes=6))
    assert "holds CRL #" in _health(vpn)
    job.run(vpn)
    assert crl_health(vpn) is None
    listed = [entry.serial_number for crl in crls_in(crl_file.read_bytes()) for entry in crl]
    assert listed == [serial.value]
    assert mtime != crl_file.stat().st_mtime_ns


def test_health_warns_before_openvpn_would_refuse_everybody(
    vpn: Context, crl_file: Path, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock.advance(dt.timedelta(hours=11))
    assert crl_health(vpn) is None
    clock.advance(dt.timedelta(hours=2))  # 11 h of the 24 h left: the job has been failing
    assert "expires at" in _health(vpn)
    clock.advance(dt.timedelta(hours=12))
    problem = _health(vpn)
    assert "expired" in problem and "refuses every client" in problem

    def read_only(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("ca.openvpn.write_atomic", read_only)
    with pytest.raises(Unavailable, match=r"cannot write the CRL file .*Read-only"):
        job_named("openvpn-crl").run(vpn)
    monkeypatch.undo()
    job_named("openvpn-crl").run(vpn)  # writable again: re-signed, rewritten, healthy
    assert crl_health(vpn) is None
    first = crls_in(crl_file.read_bytes())[0]
    assert first.next_update_utc == clock.now() + dt.timedelta(hours=24)


def test_a_failed_write_does_not_hide_the_revocation(
    vpn: Context, crl_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ca.openvpn import revoke_client

    serial = _serial(vpn, "oscar")

    def full(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ca.openvpn.write_atomic", full)
    result = revoke_client(vpn, VpnName("oscar"))
    assert [info.serial for info in result.revoked] == [serial]
    assert "No space left" in (result.crl_error or "")
    assert certs.get_certificate(vpn, serial).status is certs.CertStatus.REVOKED


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "cannot read", id="missing"),
        pytest.param(b"garbage", "no CRL for CA", id="not-crls"),
        pytest.param(
            b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "parse", id="bad"
        ),
    ],
)
def test_health_names_a_broken_file(
    vpn: Context, crl_file: Path, content: bytes | None, problem: str
) -> None:
    if content is None:
        crl_file.unlink()
    else:
        crl_file.write_bytes(content)
    assert problem in _health(vpn)
    assert _health(vpn).startswith("openvpn vpn: ")


def test_readyz_says_what_is_wrong_with_a_crl_file_not_where_it_is(
    vpn: Context, crl_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``/readyz`` is anybody's to read: its ``openvpn_crl`` and the failing ``openvpn-crl`` job
    it lists say which authority's CRL file is wrong and how; where the file is, only the log
    says. Both gave its path."""

    def read_only(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(30, "Read-only file system")

    crl_file.unlink()
    monkeypatch.setattr("ca.openvpn.write_atomic", read_only)
    for _ in range(FAILING_AFTER):
        run_job(vpn, job_named("openvpn-crl"))
    with TestClient(create_app(vpn), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
    detail = ready.json()["detail"]
    assert detail["openvpn_crl"] == (
        "openvpn vpn: cannot read the CRL file: No such file or directory"
    )
    assert (
        f"({FAILING_AFTER}x: Unavailable: cannot write the CRL file of OpenVPN authority 'vpn'"
        in detail["jobs"]
    ), detail
    assert str(crl_file.parent) not in ready.text
    assert f"cannot read the CRL file {crl_file}" in caplog.text  # for the operator
    assert f"cannot write the CRL file {crl_file}: " in caplog.text


def test_health_checks_signatures_not_just_names(
    vpn: Context, crl_file: Path, tmp_path: Path
) -> None:
    """A CRL with the right issuer name from another key (say, of a re-initialised authority)
    does not count."""
    from ca.openvpn import InitParams, init_openvpn

    stale = crl_file.read_bytes()
    init_openvpn(vpn, InitParams(force=True))
    from ca.openvpn import ConfigureParams, configure

    configure(vpn, ConfigureParams(crl_path=crl_file))
    assert crl_health(vpn) is None
    crl_file.write_bytes(stale)
    assert "no CRL for CA" in _health(vpn)


def test_the_crl_path_never_clobbers_another_file(vpn: Context, tmp_path: Path) -> None:
    from ca.errors import InvalidInput
    from ca.openvpn import ConfigureParams, configure, get_config

    precious = tmp_path / "passwd"
    precious.write_text("root:x:0:0::/root:/bin/sh\n")
    for target in (precious, tmp_path):
        with pytest.raises(InvalidInput, match="not a CRL file"):
            configure(vpn, ConfigureParams(crl_path=target))
    assert precious.read_text().startswith("root:")
    moved = tmp_path / "elsewhere" / "crl.pem"
    with pytest.raises(InvalidInput, match="not an existing directory"):  # a mistyped directory
        configure(vpn, ConfigureParams(crl_path=moved))
    assert not moved.parent.exists() and get_config(vpn).crl_path != moved
    moved.parent.mkdir()
    configure(vpn, ConfigureParams(crl_path=moved))  # new files and CRL files are fine
    configure(vpn, ConfigureParams(crl_path=moved))
    assert get_config(vpn).crl_path == moved and crls_in(moved.read_bytes())


def test_a_crl_path_stored_before_paths_were_checked_is_neither_written_nor_rendered(
    vpn: Context, tmp_path: Path
) -> None:
    """A row written by an earlier version, whose path would add a directive to server.conf."""
    from sqlmodel import Session, func, select

    from ca.errors import InvalidInput
    from ca.openvpn import OPENVPN, ServerRequest, server_config
    from ca.store.models import CertificateRow
    from ca.store.models_openvpn import OpenVpnRow

    bad = f"{tmp_path}/x\ncrl-verify /etc/passwd"
    with Session(vpn.engine) as session:
        row = session.get(OpenVpnRow, OPENVPN)
        assert row is not None
        row.crl_path = bad
        session.add(row)
        session.commit()
    with pytest.raises(InvalidInput, match=r"server\.conf"):
        write_crl_file(vpn)
    with Session(vpn.engine) as session:
        issued = session.exec(select(func.count()).select_from(CertificateRow)).one()
    with pytest.raises(InvalidInput, match=r"server\.conf"):
        server_config(vpn, ServerRequest(common_name=VpnName("vpnserver")))
    with Session(vpn.engine) as session:  # refused before a server certificate was issued
        assert session.exec(select(func.count()).select_from(CertificateRow)).one() == issued
    assert not (tmp_path / "x\ncrl-verify ").exists()


def test_a_server_directory_server_conf_cannot_name_is_refused_before_issuing(
    vpn_unconfigured: Context, tmp_path: Path
) -> None:
    """With no CRL path yet, the directory's crl.pem becomes the CRL file: judged first."""
    from sqlmodel import Session, func, select

    from ca.errors import InvalidInput
    from ca.openvpn import ConfigureParams, ServerRequest, configure, get_config, server_config
    from ca.store.models import CertificateRow

    configure(vpn_unconfigured, ConfigureParams(remote="vpn.example.org"))
    with Session(vpn_unconfigured.engine) as session:
        issued = session.exec(select(func.count()).select_from(CertificateRow)).one()
    with pytest.raises(InvalidInput, match=r"server\.conf"):
        server_config(vpn_unconfigured, ServerRequest(), out_dir=tmp_path / "my server")
    with Session(vpn_unconfigured.engine) as session:
        assert session.exec(select(func.count()).select_from(CertificateRow)).one() == issued
    assert get_config(vpn_unconfigured).crl_path is None
    files = server_config(vpn_unconfigured, ServerRequest(), out_dir=tmp_path / "srv")
    assert b"crl-verify crl.pem" in files["server.conf"]
    assert get_config(vpn_unconfigured).crl_path == (tmp_path / "srv" / "crl.pem").resolve()


def _lose_the_intermediate_key_and_revoke_it(ctx: Context) -> None:
    """What docs/revocation.md supports: the compromised intermediate's key already gone."""
    from ca.emergency import revoke_intermediate

    for key in (ctx.settings.data_dir / "keys").glob("vpn-intermediate-*.pem"):
        key.unlink()
    ctx.cache.clear()  # the signer this process holds is gone with its file
    result = revoke_intermediate(ctx, actor="cli", authority="vpn")
    assert result.final_crl_skipped is not None


def test_an_intermediate_revoked_with_its_key_lost_keeps_the_file_current(
    vpn: Context, crl_file: Path, clock: FixedClock
) -> None:
    """Regression: the file had to hold the revoked intermediate's CRL, which nothing could
    re-sign once due: from +25 h no write succeeded (the job failed, every ``client revoke``
    answered crl_error), and at +49 h every CRL in the file had expired: OpenVPN refused
    everybody. The root's CRL, which lists the intermediate, is what refuses its clients."""
    from ca.openvpn import revoke_client

    old = active_issuer(vpn, "vpn").certificate
    _serial(vpn, "alice")
    _lose_the_intermediate_key_and_revoke_it(vpn)
    new = active_issuer(vpn, "vpn").certificate
    start = clock.now()
    for hours in (0, 9, 17, 25, 49):
        clock.current = start + dt.timedelta(hours=hours)
        assert write_crl_file(vpn) == crl_file.resolve(), hours
        assert crl_health(vpn) is None, hours
        crls = crls_in(crl_file.read_bytes())
        assert [crl.issuer for crl in crls] == [new.subject, old.issuer], hours
        assert all(crl.next_update_utc > clock.now() for crl in crls), hours
        assert [entry.serial_number for entry in crls[1]] == [old.serial_number], hours
    bob = _serial(vpn, "bob")
    revoked = revoke_client(vpn, VpnName("bob"))
    assert revoked.crl_error is None
    assert [e.serial_number for e in crls_in(crl_file.read_bytes())[0]] == [bob.value]
    assert job_named("openvpn-crl").run(vpn) == "1 OpenVPN CRL file(s) current"


def test_an_emergency_revocation_rewrites_the_crl_file_at_once(
    vpn: Context, crl_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: revoke-intermediate left the file as it was until the openvpn-crl job ran
    (a minute with serve, an hour with cron): OpenVPN let the revoked intermediate's clients in
    until then. A file that cannot be written is reported, and the revocation stands."""
    from ca.emergency import revoke_intermediate

    old = active_issuer(vpn, "vpn").certificate
    result = revoke_intermediate(vpn, actor="cli", authority="vpn")
    root_crl = crls_in(crl_file.read_bytes())[-1]
    assert root_crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert result.publish_error is None

    def full(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ca.openvpn.write_atomic", full)
    again = revoke_intermediate(vpn, actor="cli", authority="vpn")
    assert again.publish_error == (
        "the vpn CRL files were not rewritten: cannot write the CRL file of OpenVPN authority"
        " 'vpn': No space left on device"
    )
    assert active_issuer(vpn, "vpn").certificate.serial_number == again.new_serial.value


KEY = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("content", [KEY, b"not a crl\n"], ids=["a-key", "text"])
def test_a_crl_path_that_became_another_file_is_never_overwritten(
    vpn: Context, crl_file: Path, content: bytes
) -> None:
    """Regression: only configure and ``crl --out`` judged the file; the job and every
    revocation overwrote whatever stood at the configured path since, and the job said "ok"."""
    from ca.openvpn import revoke_client

    crl_file.write_bytes(content)
    with pytest.raises(Unavailable, match=r"exists and is not a CRL file") as refused:
        job_named("openvpn-crl").run(vpn)
    assert str(crl_file.parent) not in refused.value.public
    assert crl_file.read_bytes() == content
    _serial(vpn, "carol")
    revoked = revoke_client(vpn, VpnName("carol"))
    assert revoked.crl_error is not None and "may not be written" in revoked.crl_error
    assert crl_file.read_bytes() == content


def test_a_crl_path_whose_directory_is_gone_is_not_recreated(vpn: Context, crl_file: Path) -> None:
    """Regression: the write made the missing directories again (an unmounted volume, an
    uninstalled OpenVPN), and the job said "ok" about a file no server reads."""
    crl_file.unlink()
    crl_file.parent.rmdir()
    with pytest.raises(Unavailable, match="not an existing directory"):
        job_named("openvpn-crl").run(vpn)
    assert not crl_file.parent.exists()
