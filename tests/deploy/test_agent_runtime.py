"""The agent examples (deploy/k8s/agent) for real, against a Trellis started from the
single-node manifests: the init containers' and the sidecar's command lines, then the web
example's nginx configuration serving mTLS to the report job's identity, reloaded by the
sidecar's --exec hook. Paths, host and ports are the only things changed."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy.manifests import K8S, Obj, load_set
from tests.deploy.runtime import (
    TRELLIS,
    SingleNode,
    clean_environ,
    container,
    running,
    serving,
    single_node,
)

pytestmark = pytest.mark.slow

AGENT = load_set(K8S / "agent")
WEB_HOST = "web.demo.svc"


def _pod(kind: str, name: str) -> Obj:
    doc = AGENT.defined(kind, name)
    assert doc is not None
    spec: Obj = doc.body["spec"]["template"]["spec"]
    return spec


WEB, REPORT = _pod("Deployment", "web"), _pod("Job", "report")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SingleNode]:
    directory = tmp_path_factory.mktemp("trellis")
    node = single_node(directory / "data")
    with serving(node, directory / "serve.log"):
        yield node


def local(node: SingleNode, args: list[str], svid: Path) -> list[str]:
    """A container's agent command line with this machine's server, bundle and directory."""
    values = {"--server": node.url, "--bundle": node.bundle, "--dir": str(svid)}
    return [TRELLIS, *(values.get(args[i - 1], arg) if i else arg for i, arg in enumerate(args))]


def obtain(node: SingleNode, args: list[str], svid: Path, account: str, dns: str = "") -> None:
    """Register the service account's identity, make a join token, run the init container."""
    spiffe_id = f"spiffe://example.org/ns/demo/sa/{account}"
    entries = {e["spiffe_id"]: e["id"] for e in json.loads(node.run("entry", "list", "--json"))}
    if spiffe_id not in entries:  # the server is shared by this module's tests
        dns_args = ["--dns", dns] if dns else []
        entries[spiffe_id] = node.run("entry", "create", "--spiffe-id", spiffe_id, *dns_args)
    token = node.run("token", "create", "--entry", entries[spiffe_id].strip()).strip()
    result = subprocess.run(
        local(node, args, svid),
        env={**clean_environ(), "TRELLIS_JOIN_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert {p.name for p in svid.iterdir()} >= {"svid.pem", "svid.key", "bundle.pem"}


def test_the_sidecar_starts_from_the_init_containers_svid(node: SingleNode, tmp_path: Path) -> None:
    svid = tmp_path / "svid"
    obtain(node, WEB["initContainers"][0]["args"], svid, "web", WEB_HOST)
    # The sidecar's command line, stopped after its first step: it needs no token here...
    sidecar = [*local(node, container(WEB, "trellis-agent")["args"], svid), "--once"]
    started = subprocess.run(
        sidecar, env=clean_environ(), capture_output=True, text=True, timeout=60, check=False
    )
    assert started.returncode == 0, started.stderr
    # ... and without the init container's SVID (and no token) it refuses at once.
    empty = [*local(node, container(WEB, "trellis-agent")["args"], tmp_path / "empty"), "--once"]
    refused = subprocess.run(
        empty, env=clean_environ(), capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode != 0 and "no --token" in refused.stderr, refused.stderr


def get(port: int, client: Path | None, trust: Path) -> str:
    """What the report job's curl does: verify web by name against the bundle, present the
    client SVID (or none)."""
    context = ssl.create_default_context(cafile=str(trust / "bundle.pem"))
    if client is not None:
        context.load_cert_chain(client / "svid.pem", client / "svid.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=WEB_HOST) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {WEB_HOST}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := tls.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@pytest.mark.skipif(NGINX is None, reason="nginx not installed")
def test_web_serves_mtls_to_the_report_job_and_reloads(node: SingleNode, tmp_path: Path) -> None:
    assert NGINX is not None
    web_svid, report_svid = tmp_path / "web-svid", tmp_path / "report-svid"
    obtain(node, WEB["initContainers"][0]["args"], web_svid, "web", WEB_HOST)
    obtain(node, REPORT["initContainers"][0]["args"], report_svid, "report")
    run_dir, scratch = tmp_path / "app", tmp_path / "nginx-tmp"
    run_dir.mkdir()
    scratch.mkdir()
    port = free_port()
    config_map = AGENT.defined("ConfigMap", "web-nginx")
    assert config_map is not None
    conf = (
        config_map.body["data"]["nginx.conf"]
        .replace(" /tmp/", f" {scratch}/")
        .replace(" /run/svid/", f" {web_svid}/")
        .replace(" /run/app/", f" {run_dir}/")
        .replace("listen 8443 ssl", f"listen 127.0.0.1:{port} ssl")
    )
    assert str(port) in conf and "/run/" not in conf
    (tmp_path / "nginx.conf").write_text(conf)
    command = container(WEB, "web")["command"]
    assert command[0] == "nginx"
    argv = [NGINX, *command[1:], "-e", "stderr", "-c", str(tmp_path / "nginx.conf")]
    log = tmp_path / "nginx.log"
    with running(argv, clean_environ(), log) as process:
        deadline = time.monotonic() + 30
        while not (run_dir / "nginx.pid").exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        answer = get(port, report_svid, report_svid)
        assert answer.startswith("HTTP/1.1 200") and "hello from web" in answer, answer
        assert not get(port, None, report_svid).startswith("HTTP/1.1 200"), "mTLS is required"

        master = int((run_dir / "nginx.pid").read_text())
        before = workers(master)
        hook = shlex.split(_exec_hook().replace("/run/app/", f"{run_dir}/"))
        assert subprocess.run(hook, timeout=30, check=False).returncode == 0
        deadline = time.monotonic() + 10
        while not (workers(master) - before):  # SIGHUP: nginx starts new workers
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert get(port, report_svid, report_svid).startswith("HTTP/1.1 200")


def workers(master: int) -> set[int]:
    """The processes whose parent is ``master``."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            children.add(int(stat.parent.name))
    return children


def _exec_hook() -> str:
    args = container(WEB, "trellis-agent")["args"]
    hook: str = args[args.index("--exec") + 1]
    return hook
