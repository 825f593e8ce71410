"""The single-node manifests' commands and the image's configuration, run for real on this
machine (no container engine needed):

- the StatefulSet's init and server commands with its ConfigMap, probed the way the kubelet
  probes them, and the image's HEALTHCHECK against that server;
- the image's ENV, WORKDIR, CMD and HEALTHCHECK on a read-only root filesystem with only the
  data volume writable, in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy.dockerfile import FINAL, env, healthcheck_command, values
from tests.deploy.runtime import BIN, TRELLIS, healthcheck, probe, serving, single_node

pytestmark = pytest.mark.slow


def test_single_node_manifests_initialise_serve_and_pass_their_probes(tmp_path: Path) -> None:
    node = single_node(tmp_path / "data")
    with serving(node, tmp_path / "serve.log"):
        again = node.run(*node.init["args"])
        assert "already exists" in again, "the init container must be a no-op the second time"
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe(node.port, node.server[kind]["httpGet"]) == 200, kind
        assert healthcheck(node.environ) == 0
    assert healthcheck(node.environ) != 0, "the HEALTHCHECK must fail when the server is down"


def _can_make_read_only_root() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe_run = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -o remount,bind,ro / && ! touch /.trellis-ro-probe 2>/dev/null",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe_run.returncode == 0


DRIVER = """
import subprocess, sys, time
init, serve, check = {init!r}, {serve!r}, {check!r}
try:
    open("/tmp/.trellis-ro-probe", "w")
    sys.exit("the root filesystem is writable: the test would prove nothing")
except OSError:
    pass
subprocess.run(init, check=True)
server = subprocess.Popen(serve, stdout=open("serve.log", "wb"), stderr=subprocess.STDOUT)
try:
    deadline = time.monotonic() + 60
    while subprocess.run(check).returncode != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("not healthy: " + open("serve.log").read())
        time.sleep(0.5)
finally:
    server.terminate()
    server.wait(timeout=15)
"""


@pytest.mark.skipif(not _can_make_read_only_root(), reason="needs root and mount namespaces")
def test_the_image_configuration_runs_on_a_read_only_root(tmp_path: Path) -> None:
    """`trellis init` and the image's CMD, with the image's ENV and WORKDIR, on a root
    filesystem remounted read-only and only the VOLUME writable; the HEALTHCHECK passes.
    (Runs as root here: this machine's Python lives under /root, unreadable to uid 10001.
    Root ignores file modes but not a read-only mount, which is what this test is about.)"""
    image_env = env(FINAL)
    data_dir = image_env["TRELLIS_DATA_DIR"]
    assert values(FINAL, "WORKDIR")[-1] == data_dir
    port = free_port()
    environ = {
        **{k: v for k, v in image_env.items() if k != "PATH"},
        "PATH": f"{BIN}:/usr/bin:/bin",
        "TRELLIS_TRUST_DOMAIN": "example.org",
        "TRELLIS_PORT": str(port),
    }
    # The image's CMD, listening on loopback only on this shared machine.
    image_cmd = json.loads(values(FINAL, "CMD")[-1])
    cmd = [TRELLIS, *(a.replace("0.0.0.0", "127.0.0.1") for a in image_cmd)]
    check = [sys.executable, *healthcheck_command()[1:]]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(init=[TRELLIS, "init", "--exists-ok"], serve=cmd, check=check))
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o700)
    parent = str(Path(data_dir).parent)
    script = f"""set -e
mount -t tmpfs -o size=1m,mode=0755 tmpfs {parent}
mkdir -p {data_dir}
mount --bind {volume} {data_dir}
mount -o remount,ro {parent}
mount -o remount,bind,ro /
if mountpoint -q /dev/shm; then mount -o remount,bind,ro /dev/shm; fi
cd {data_dir}
exec {sys.executable} {driver}
"""
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"bundle.pem", "admin-token", "keys", "server", "trellis.db"} <= {
        p.name for p in volume.iterdir()
    }
