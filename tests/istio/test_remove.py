"""``trellis istio remove``: a cluster is renewed until it is removed; removal stops the
renewals, leaves the output alone, and revokes its intermediates only when asked."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from sqlmodel import Session, select

from ca import audit, istio
from ca.clock import FixedClock
from ca.config import Context
from ca.crl import current_crl
from ca.errors import NotFound
from ca.istio import (
    RENEWAL_INTERVAL,
    IstioParams,
    deliver,
    issue_istio_intermediate,
    renew_due_clusters,
)
from ca.istio_clusters import RemovedCluster, remove_cluster
from ca.jobs import job_named
from ca.scheduler import run_job
from ca.store.models import CaRow, CertificateRow, IstioClusterRow
from ca.store.models_audit import AuditRow
from tests.ca.racekit import first_held
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import Cli

pytestmark = [
    SQLITE_ONLY,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]


def _intermediates(ctx: Context) -> dict[str, str]:
    """serial -> status of every Istio intermediate issued."""
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CertificateRow).where(CertificateRow.profile == "istio-intermediate")
        ).all()
    return {row.serial: row.status for row in rows}


def _events(ctx: Context) -> list[AuditRow]:
    with Session(ctx.engine) as session:
        return list(
            session.exec(select(AuditRow).where(AuditRow.event == "istio.cluster.removed")).all()
        )


def test_remove_stops_renewals_and_leaves_the_output(
    ctx: Context, cli: Cli, clock: FixedClock, tmp_path: Path
) -> None:
    """A decommissioned --out target got a new CA private key written at every renewal, and
    no command could stop it."""
    out = tmp_path / "cacerts.yaml"
    issued = json.loads(cli.ok("istio", "issue", "--cluster", "east", "--out", str(out), "--json"))
    written = out.read_bytes()
    removed = cli.ok("istio", "remove", "--cluster", "east", "--yes")
    assert removed.splitlines()[0].startswith(
        f"removed cluster east: intermediate {issued['serial'][:16]} is no longer renewed"
    )
    assert f"its output {out.resolve()} is left as it is" in removed
    assert json.loads(cli.ok("istio", "list", "--json")) == []
    clock.advance(dt.timedelta(days=29))  # well past 2/3 of 30 days
    assert job_named("istio-intermediates").run(ctx) == "nothing due"
    assert out.read_bytes() == written
    assert _intermediates(ctx) == {issued["serial"]: "active"}  # not revoked by default
    (event,) = _events(ctx)
    assert event.subject == "istio cluster east" and event.actor == "cli"
    assert json.loads(event.detail) == {
        "serial": issued["serial"],
        "authority": "mesh",
        "revoke": [],
    }


def test_remove_ends_the_failing_retries(
    ctx: Context, cli: Cli, clock: FixedClock, tmp_path: Path
) -> None:
    """A recorded cluster whose output fails is retried, and the job (and /readyz) failing,
    until it is removed."""
    east = tmp_path / "east"
    params = IstioParams("east", output=east, output_format="files")
    deliver(ctx, issue_istio_intermediate(ctx, params), params)
    shutil.rmtree(east)
    east.write_text("no longer a directory\n")
    clock.advance(dt.timedelta(days=21))
    job = job_named("istio-intermediates")
    run = run_job(ctx, job)
    assert run is not None and not run.last_ok
    cli.ok("istio", "remove", "--cluster", "east", "--yes")
    clock.advance(RENEWAL_INTERVAL)
    run = run_job(ctx, job)
    assert run is not None and run.last_ok and run.last_result == "nothing due"
    assert len(_intermediates(ctx)) == 1


def test_remove_with_revoke_revokes_every_live_intermediate_of_the_cluster(
    ctx: Context, cli: Cli, tmp_path: Path
) -> None:
    out, other = tmp_path / "east.yaml", tmp_path / "west.yaml"
    first = json.loads(cli.ok("istio", "issue", "--cluster", "east", "--out", str(out), "--json"))
    second = json.loads(cli.ok("istio", "issue", "--cluster", "east", "--out", str(out), "--json"))
    west = json.loads(cli.ok("istio", "issue", "--cluster", "west", "--out", str(other), "--json"))
    removed = json.loads(
        cli.ok("istio", "remove", "--cluster", "east", "--revoke", "--yes", "--json")
    )
    assert removed["cluster"] == "east" and removed["serial"] == second["serial"]
    assert removed["revoked"] == [first["serial"], second["serial"]]
    assert _intermediates(ctx) == {
        first["serial"]: "revoked",
        second["serial"]: "revoked",
        west["serial"]: "active",
    }
    with Session(ctx.engine) as session:
        row = session.get(CertificateRow, second["serial"])
        assert row is not None and row.revocation_reason == "cessationOfOperation"
        root = session.get(CaRow, row.issuer_ca_id)
        assert root is not None
    crl = current_crl(ctx, "mesh", root.serial)
    listed = x509.load_pem_x509_crl(crl.pem)
    assert listed.get_revoked_certificate_by_serial_number(int(second["serial"], 16))
    assert json.loads(_events(ctx)[0].detail)["revoke"] == [first["serial"], second["serial"]]
    assert [c["cluster"] for c in json.loads(cli.ok("istio", "list", "--json"))] == ["west"]


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (("--cluster", "east"), 1, "not confirmed: no terminal to ask on (pass --yes)"),
        (("--cluster", "west", "--yes"), 5, "no Istio cluster 'west' is recorded"),
        (("--cluster", "East_1", "--yes"), 2, "a cluster name is a DNS label"),
    ],
    ids=["fail/no-terminal", "fail/unknown", "fail/bad-name"],
)
def test_remove_refused(
    cli: Cli, tmp_path: Path, args: tuple[str, ...], code: int, reason: str
) -> None:
    cli.ok("istio", "issue", "--cluster", "east", "--out", str(tmp_path / "c.yaml"))
    result = cli("istio", "remove", *args)
    assert result.code == code, result
    assert reason in result.err
    assert [c["cluster"] for c in json.loads(cli.ok("istio", "list", "--json"))] == ["east"]


def test_a_renewal_under_way_does_not_bring_a_removed_cluster_back(
    ctx: Context, clock: FixedClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job reads the clusters, then renews each: one removed in between was recorded
    again by its renewal, and renewed from then on."""
    out = tmp_path / "east.yaml"
    params = IstioParams("east", output=out)
    intermediate = issue_istio_intermediate(ctx, params)
    deliver(ctx, intermediate, params)
    written = out.read_bytes()
    clock.advance(dt.timedelta(days=21))
    checked = istio.check_output

    def removed_meanwhile(given: IstioParams) -> None:
        remove_cluster(ctx, given.cluster)
        checked(given)

    monkeypatch.setattr(istio, "check_output", removed_meanwhile)
    assert renew_due_clusters(ctx) == []
    with Session(ctx.engine) as session:
        assert session.exec(select(IstioClusterRow)).all() == []
    assert out.read_bytes() == written
    serial = format(intermediate.certificate.serial_number, "x")
    assert _intermediates(ctx) == {serial: "active"}  # the renewal was not recorded


def test_a_cluster_removed_twice_at_once_is_removed_once(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite has no FOR UPDATE: the second removal read the row the first was deleting, and
    both were answered as removals and recorded (its DELETE matched nothing, an SAWarning)."""
    params = IstioParams("east", output=tmp_path / "east.yaml")
    deliver(ctx, issue_istio_intermediate(ctx, params), params)

    first, second = first_held(
        monkeypatch,
        audit,
        "record",
        lambda: remove_cluster(ctx, "east"),
        lambda: remove_cluster(ctx, "east"),
    )

    assert isinstance(first, RemovedCluster), first
    assert isinstance(second, NotFound), second
    assert len(_events(ctx)) == 1
