"""Jobs that keep a node's files (``ca.jobs.Scope.NODE``) run on every node, whatever the other
nodes do: two "nodes" (``TRELLIS_NODE_NAME``) on one PostgreSQL database, first as two
contexts in this process, then as two ``trellis serve`` processes.

A cluster-wide job is skipped by a replica while another replica's run is in progress
(tests/rotation/test_exactly_once.py). A gateway truststore or an OpenVPN CRL file on node B is
written by no run on node A, so B skipping its run for A's left B's files to age: every time, for
replicas whose runs fell together (a job's runs keep the phase of its process's start), and for
as long as A's run hung (a truststore on a stuck network file system).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from pydantic import SecretStr

from ca import gateway
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.jobs import JOBS, Job, Scope, job_named
from ca.openvpn import (
    ClientRequest,
    ConfigureParams,
    InitParams,
    VpnName,
    add_client,
    configure,
    init_openvpn,
    revoke_client,
)
from ca.revocation import RevocationReason
from ca.scheduler import run_job
from ca.serial import Serial
from ca.store.models import JobRunRow
from tests.cli.test_walkthrough import Trellis
from tests.conftest import PASSPHRASE, make_postgres_database
from tests.gateway.conftest import ACME
from tests.gateway.gwkit import load_crls, partner_csr
from tests.openvpn.vpnkit import crls_in

pytestmark = pytest.mark.postgres

F = gateway.TruststoreFormat


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    return make_postgres_database(postgres_server)


def _node(pg_url: str, data_dir: Path, name: str, clock: FixedClock) -> Context:
    settings = Settings(
        data_dir=data_dir,
        database_url=pg_url,
        key_passphrase=SecretStr(PASSPHRASE),
        node_name=name,
    )
    return build_context(settings, clock=clock)


@pytest.fixture
def nodes(pg_url: str, tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Context, Context]]:
    """Nodes A and B: one database, one key directory, two node names."""
    a = _node(pg_url, tmp_path / "var", "node-a", clock)
    b = _node(pg_url, tmp_path / "var", "node-b", clock)
    yield a, b
    a.close()
    b.close()


@contextmanager
def running(ctx: Context, job: Job) -> Iterator[None]:
    """A run of ``job`` in progress in ``ctx`` (holding whatever lock it takes) until the block
    ends."""
    entered, release = threading.Event(), threading.Event()

    def hold(_: Context) -> str:
        entered.set()
        assert release.wait(30), "never released"
        return "held"

    done: list[JobRunRow | None] = []
    thread = threading.Thread(target=lambda: done.append(run_job(ctx, _with(job, hold))))
    thread.start()
    try:
        assert entered.wait(30), f"the run of {job.name} never started"
        yield
    finally:
        release.set()
        thread.join(30)
    assert done and done[0] is not None, "the holding run was skipped"


def _with(job: Job, run: object) -> Job:
    return dataclasses.replace(job, run=run)  # type: ignore[arg-type]


def _revoked(crls: list[x509.CertificateRevocationList], serial: Serial) -> bool:
    return any(c.get_revoked_certificate_by_serial_number(serial.value) for c in crls)


def test_a_node_refreshes_its_truststores_while_another_node_runs_the_job(
    nodes: tuple[Context, Context], pg_url: str, tmp_path: Path, clock: FixedClock
) -> None:
    a, b = nodes
    gateway.init_gateway(a, gateway.GatewayParams())
    gateway.add_consumer(a, ACME)
    gateway.write_truststore(a, F.NGINX, tmp_path / "on-a")
    gateway.write_truststore(b, F.NGINX, tmp_path / "on-b")
    issued = gateway.issue_certificate(
        a, gateway.CertRequest(ACME, "tests", csr_pem=partner_csr()[1])
    )
    gateway.revoke_gateway_certificate(a, issued.serial, RevocationReason.KEY_COMPROMISE, "t")

    job = job_named("gateway-truststores")
    with running(a, job):  # A's scheduler is in its run of the job
        run = run_job(b, job)
    assert run is not None, "node B skipped its run while node A ran the job"
    assert run.last_ok and run.node == "node-b"
    # what A's revocation rewrote was A's truststore, not B's: B's run did
    assert run.last_result == "rewrote 1 gateway truststore file(s)"
    assert _revoked(load_crls((tmp_path / "on-b" / "crl.pem").read_bytes()), issued.serial)

    # another process of node B is still excluded while B's own run is in progress
    b2 = _node(pg_url, tmp_path / "var", "node-b", clock)
    try:
        with running(b, job):
            assert run_job(b2, job) is None
            assert run_job(a, job) is not None  # node A is not
    finally:
        b2.close()


def test_a_node_rewrites_its_openvpn_crl_file_while_another_node_runs_the_job(
    nodes: tuple[Context, Context], tmp_path: Path
) -> None:
    """One CRL path, one file on each node that runs ``trellis serve`` (here both nodes share a
    file system, so B's copy is made stale by hand)."""
    a, b = nodes
    crl_file = tmp_path / "openvpn" / "crl.pem"
    crl_file.parent.mkdir()
    init_openvpn(a, InitParams())
    configure(a, ConfigureParams(remote="vpn.example.org", crl_path=crl_file))
    serial = add_client(a, ClientRequest(VpnName("alice"))).serial
    stale = crl_file.read_bytes()

    job = job_named("openvpn-crl")
    with running(a, job):
        revoke_client(a, VpnName("alice"), reason=RevocationReason.KEY_COMPROMISE, actor="t")
        crl_file.write_bytes(stale)  # node B's copy: A's revocation wrote only A's
        run = run_job(b, job)
    assert run is not None, "node B skipped its run while node A ran the job"
    assert run.last_ok, run.last_result
    assert _revoked(crls_in(crl_file.read_bytes()), serial)


def test_the_jobs_of_a_nodes_files_are_node_scoped() -> None:
    scopes = {job.name: job.scope for job in JOBS}
    assert {name for name, scope in scopes.items() if scope is Scope.NODE} == {
        "gateway-truststores",
        "openvpn-crl",
        "openvpn-server-certificate",
    }
    assert scopes["server-certificate"] is Scope.REPLICA


@pytest.mark.slow
def test_two_serve_nodes_each_keep_their_own_truststore(pg_url: str, tmp_path: Path) -> None:
    """Node A's run of ``gateway-truststores`` hangs on a truststore whose ``crl.pem`` never
    answers (a FIFO, as a stuck network mount would); node B, started after a revocation,
    still rewrites its own truststore at once."""
    node_a = Trellis(tmp_path / "a", pg_url)
    node_a.env["TRELLIS_NODE_NAME"] = "node-a"
    node_a.set_up("init", "--trust-domain", "example.org")
    node_a.set_up("gateway", "init")
    node_a.set_up("gateway", "consumer", "add", "acme")
    # node B: a copy of the data dir, with the key directory shared (one volume)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "keys")
    os.symlink(tmp_path / "a" / "keys", tmp_path / "b" / "keys")
    node_b = Trellis(tmp_path / "b", pg_url)
    node_b.env["TRELLIS_NODE_NAME"] = "node-b"

    on_a, on_b = tmp_path / "nginx-a", tmp_path / "nginx-b"
    node_a.set_up("gateway", "truststore", "--format", "nginx", "--out", str(on_a))
    node_b.set_up("gateway", "truststore", "--format", "nginx", "--out", str(on_b))
    (tmp_path / "acme.csr").write_bytes(partner_csr()[1])
    issue = ["gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "acme.csr")]
    issued = json.loads(node_a.set_up(*issue, "--out", str(tmp_path / "acme.pem"), "--json"))
    assert isinstance(issued, dict)
    serial = Serial.parse(issued["serial"])
    revoked = json.loads(node_a.set_up("gateway", "cert", "revoke", str(serial), "--json"))
    assert isinstance(revoked, dict)
    assert revoked["rewritten"] == [str(on_a / "crl.pem")]  # the revoking node's files only
    assert not _revoked(load_crls((on_b / "crl.pem").read_bytes()), serial)

    (on_a / "crl.pem").unlink()
    os.mkfifo(on_a / "crl.pem")
    with node_a.serving(tmp_path / "a.log"):
        writer = _reader_waiting(on_a / "crl.pem", timeout=30)  # A's run is stuck in it
        try:
            with node_b.serving(tmp_path / "b.log"):
                deadline = time.monotonic() + 30
                while not _revoked(load_crls((on_b / "crl.pem").read_bytes()), serial):
                    assert time.monotonic() < deadline, (
                        "node B's truststore was not rewritten while node A's run hung: "
                        + (tmp_path / "b.log").read_text()[-2000:]
                    )
                    time.sleep(0.3)
        finally:
            os.close(writer)  # A's run reads an empty file and goes on


def _reader_waiting(fifo: Path, *, timeout: float) -> int:
    """Once a reader has ``fifo`` open, a writer's end, held open so the reader keeps waiting
    (opening it for writing without blocking fails until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert time.monotonic() < deadline, f"nobody opened {fifo} to read it"
            time.sleep(0.2)
