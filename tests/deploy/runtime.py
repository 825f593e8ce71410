"""Running the deploy material's commands on this machine: the single-node set's environment
and a server started from its manifests, probed the way the kubelet probes."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.deploy.dockerfile import healthcheck_command
from tests.deploy.manifests import K8S, Obj, load_set
from tests.processes import terminate

BIN = Path(sys.executable).parent
TRELLIS = str(BIN / "trellis")


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}


@contextmanager
def running(
    argv: list[str], environ: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        terminate(process, grace=15)


def probe(port: int, action: Obj) -> int:
    """An httpGet probe as the kubelet makes it: no certificate verification."""
    scheme = action["scheme"].lower()
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    url = f"{scheme}://127.0.0.1:{port}{action['path']}"
    return httpx.get(url, verify=insecure, timeout=3).status_code


def wait_for(port: int, action: Obj, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}: {log.read_text()}")
        try:
            if probe(port, action) == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"never ready: {log.read_text()}")


def healthcheck(environ: dict[str, str]) -> int:
    command = healthcheck_command()
    command[0] = sys.executable  # `python` in the image
    return subprocess.run(command, env=environ, timeout=30, check=False).returncode


def container(spec: Obj, name: str) -> Obj:
    found: Obj = next(
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name
    )
    return found


@dataclass(frozen=True)
class SingleNode:
    """The single-node StatefulSet's init and server containers with its ConfigMap and the
    example Secret's placeholder passphrase; only the volume path, host and port differ."""

    environ: dict[str, str]
    port: int
    init: Obj
    server: Obj

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def bundle(self) -> str:
        return self.environ["TRELLIS_DATA_DIR"] + "/bundle.pem"

    def run(self, *args: str) -> str:
        result = subprocess.run(
            [TRELLIS, *args],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout


def single_node(data_dir: Path) -> SingleNode:
    manifests = load_set(K8S / "single")
    statefulset = manifests.defined("StatefulSet", "trellis")
    config = manifests.defined("ConfigMap", "trellis-config")
    assert statefulset and config
    spec = statefulset.body["spec"]["template"]["spec"]
    port = free_port()
    environ = {
        **clean_environ(),
        **config.body["data"],
        # The example's placeholder is refused (ca.config.PLACEHOLDER): one of the test's own.
        "TRELLIS_KEY_PASSPHRASE": "runtime-test-passphrase",
        "TRELLIS_DATA_DIR": str(data_dir),
        "TRELLIS_HOST": "127.0.0.1",  # loopback only on this shared machine
        "TRELLIS_PORT": str(port),
    }
    return SingleNode(environ, port, container(spec, "init"), container(spec, "trellis"))


@contextmanager
def serving(node: SingleNode, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The init container's command, then the server's, until it is ready."""
    node.run(*node.init["args"])
    with running([TRELLIS, *node.server["args"]], node.environ, log) as process:
        wait_for(node.port, node.server["readinessProbe"]["httpGet"], process, log)
        yield process
