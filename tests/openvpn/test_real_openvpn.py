"""The real programs: an ``openvpn`` server built from ``trellis openvpn server-config`` and
``openvpn`` clients running the generated .ovpn as is, on 127.0.0.1.

Server mode needs a tun device, so the server runs peer-to-peer TLS (``--tls-server``, ``--dev
null``) over TCP with every security directive of the rendered server.conf (ca, cert, key, dh
none, tls-version-min, remote-cert-tls client, tls-crypt-v2, tls-crypt, crl-verify) and only the
server-mode lines replaced. A p2p TCP server serves one connection at a time and starts a fresh
TLS session (re-reading crl-verify if the file changed) when a connection ends, in the same
process; in server mode every new client gets a fresh session. Clients add ``--dev null`` (no
tun) and ``--connect-retry-max 1`` (give up instead of retrying) on the command line; remote,
proto and every inline block come from the profile.

Trellis commands run in-process through the Typer app (``InProcessTrellis``) to keep the suite
fast; the offboarding command runs as a real ``trellis`` process, as an operator types it.

Skipped, saying why, only when the ``openvpn`` binary is missing (CI installs it).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.openvpn.vpnkit import InProcessTrellis, openvpn_binary, parse_profile, replace_block
from tests.processes import terminate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(openvpn_binary() is None, reason="the openvpn binary is not installed"),
]

SERVER_CN = "vpn.example.org"
CONNECTED = "Initialization Sequence Completed"
LISTENING = "Listening for incoming TCP connection"
# Directives a p2p TLS server cannot use (they need server mode and a tun device).
SERVER_MODE_ONLY = {"port", "proto", "dev", "topology", "server", "keepalive", "persist-tun"}


@dataclass
class OpenVpn:
    """One openvpn process; its log is a file we poll."""

    args: list[str]
    log: Path
    cwd: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        handle = self.log.open("wb")
        self.process = subprocess.Popen(
            [str(openvpn_binary()), *self.args], cwd=self.cwd, stdout=handle, stderr=handle
        )
        handle.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.text())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} (x{count}) in {self.log}:\n{self.text()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"openvpn did not give up:\n{self.text()}") from None

    def stop(self) -> None:
        terminate(self.process)


@dataclass
class Deployment:
    trellis: InProcessTrellis
    root: Path
    server_dir: Path
    port: int
    svid: Path
    logs: list[OpenVpn] = field(default_factory=list)

    def add(self, name: str) -> Path:
        out = self.root / f"{name}.ovpn"
        self.trellis.run("openvpn", "client", "add", name, "--out", str(out))
        return out

    def server(self, name: str, proto: str = "tcp", **replace: str) -> OpenVpn:
        """The rendered server.conf in p2p form; ``replace`` swaps a directive's value. Any
        server still running (a failed test's) is stopped first: they share the port."""
        for process in self.logs:
            process.stop()
        lines = (self.server_dir / "server.conf").read_text().splitlines()
        kept = []
        for line in lines:
            if not line or line.startswith("#") or line.split()[0] in SERVER_MODE_ONLY:
                continue
            key = line.split()[0]
            kept.append(f"{key} {replace[key]}" if key in replace else line)
        p2p = self.root / f"{name}.conf"
        p2p.write_text(
            "\n".join(
                [
                    *kept,
                    "dev null",
                    "tls-server",
                    "proto tcp-server" if proto == "tcp" else "proto udp",
                    "local 127.0.0.1",
                    f"lport {self.port}",
                    "",
                ]
            )
        )
        server = OpenVpn(["--config", str(p2p)], self.root / f"{name}.log", self.server_dir)
        self.logs.append(server)
        server.wait_for(LISTENING if proto == "tcp" else "UDPv4 link local")
        return server

    def client(self, profile: Path, log: str) -> OpenVpn:
        client = OpenVpn(
            ["--config", str(profile), "--dev", "null", "--connect-retry-max", "1"],
            self.root / f"{log}.log",
            self.root,
        )
        self.logs.append(client)
        return client


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """What an operator types: a mesh CA with one minted SVID, and an OpenVPN CA whose server
    files are in ``server/`` and whose clients connect to 127.0.0.1 over TCP."""
    deployment = _deploy(tmp_path_factory.mktemp("openvpn-e2e"))
    yield deployment
    for process in deployment.logs:
        process.stop()


@pytest.fixture
def own_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A deployment of the test's own, for what changes the CA hierarchy."""
    deployment = _deploy(tmp_path)
    yield deployment
    for process in deployment.logs:
        process.stop()


def _deploy(root: Path) -> Deployment:
    trellis = InProcessTrellis(root / "var", f"sqlite:///{root / 'trellis.db'}")
    trellis.run("init", "--trust-domain", "example.org")
    trellis.run(
        "svid",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/ns/default/sa/web",
        "--out",
        str(root / "web"),
    )
    port = free_port()
    trellis.run("openvpn", "init")
    trellis.run(
        "openvpn", "configure", "--remote", "127.0.0.1", "--port", str(port), "--proto", "tcp"
    )
    server_dir = root / "server"
    trellis.run("openvpn", "server-config", "--cn", SERVER_CN, "--out", str(server_dir))
    return Deployment(trellis, root, server_dir, port, root / "web")


def test_handshake_then_refused_after_revocation_without_restart(deployment: Deployment) -> None:
    profile = deployment.add("alice")
    server = deployment.server("server")
    alice = deployment.client(profile, "alice-1")
    alice.wait_for(CONNECTED)
    assert "VERIFY X509NAME OK: CN=vpn.example.org" in alice.text()
    assert "VERIFY OK: depth=0, CN=alice" in server.text()

    deployment.trellis.process().run("openvpn", "client", "revoke", "alice", "--yes")
    alice.stop()
    server.wait_for(LISTENING, count=2)  # the same process, ready for the next connection
    again = deployment.client(profile, "alice-2")
    server.wait_for("VERIFY ERROR: depth=0, error=certificate revoked: CN=alice")
    assert again.wait_exit() != 0
    assert CONNECTED not in again.text()
    assert server.process.poll() is None, "the server kept running"
    assert "SIGHUP" not in server.text()
    server.stop()


def test_a_mesh_svid_is_not_a_vpn_client_certificate(deployment: Deployment) -> None:
    """The .ovpn of a live client, with only <cert> and <key> swapped for a workload SVID and
    its key (the tls-crypt-v2 key still gets the packets to TLS): the VPN CA did not issue it."""
    text = deployment.add("svid-holder").read_text()
    text = replace_block(text, "cert", (deployment.svid / "svid.pem").read_text())
    text = replace_block(text, "key", (deployment.svid / "svid.key").read_text())
    swapped = deployment.root / "svid.ovpn"
    swapped.write_text(text)
    server = deployment.server("server-svid")
    client = deployment.client(swapped, "svid")
    server.wait_for(r"VERIFY ERROR: depth=\d+, error=unable to get local issuer certificate")
    assert client.wait_exit() != 0
    assert CONNECTED not in client.text()
    server.stop()


def test_a_client_certificate_cannot_act_as_the_server(deployment: Deployment) -> None:
    """A VPN client's certificate (clientAuth only) in the server's place: the client refuses it
    before it compares names. OpenSSL's own purpose check (a TLS client wants serverAuth) fires
    first; ``remote-cert-tls server`` would refuse it next, for the same missing EKU."""
    stolen = parse_profile(deployment.add("rogue").read_text())
    cert, key = deployment.root / "rogue.crt", deployment.root / "rogue.key"
    cert.write_text(stolen.blocks["cert"])
    key.write_text(stolen.blocks["key"])
    key.chmod(0o600)
    server = deployment.server("server-rogue", cert=str(cert), key=str(key))
    victim = deployment.client(deployment.add("victim"), "victim")
    assert victim.wait_exit() != 0
    text = victim.text()
    assert CONNECTED not in text
    assert "VERIFY ERROR: depth=0, error=unsuitable certificate purpose: CN=rogue" in text, text
    assert "VERIFY X509NAME" not in text
    server.stop()


def test_a_shared_tls_crypt_client_connects_too(deployment: Deployment) -> None:
    out = deployment.root / "legacy.ovpn"
    deployment.trellis.run(
        "openvpn", "client", "add", "legacy", "--tls-crypt", "shared", "--out", str(out)
    )
    assert "<tls-crypt>" in out.read_text()
    server = deployment.server("server-shared")
    client = deployment.client(out, "legacy")
    client.wait_for(CONNECTED)
    client.stop()
    server.stop()


def test_the_default_udp_profile_connects(deployment: Deployment) -> None:
    """UDP is the default proto: a profile made after ``configure --proto udp`` says so, and a
    UDP server (same port number) takes it."""
    deployment.trellis.run("openvpn", "configure", "--proto", "udp")
    try:
        profile = deployment.add("roamer")
        assert "proto udp" in parse_profile(profile.read_text()).directives
        server = deployment.server("server-udp", proto="udp")
        client = deployment.client(profile, "roamer")
        client.wait_for(CONNECTED)
        assert "VERIFY OK: depth=0, CN=roamer" in server.text()
        client.stop()
        server.stop()
    finally:
        deployment.trellis.run("openvpn", "configure", "--proto", "tcp")


def test_profiles_and_keys_are_private(deployment: Deployment) -> None:
    # a profile of its own: pytest-xdist may run this test on a worker where alice's is not
    assert deployment.add("paula").stat().st_mode & 0o777 == 0o600
    for name in ("server.key", "tls-crypt-v2.key", "tls-crypt.key"):
        assert (deployment.server_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert os.access(deployment.server_dir / "crl.pem", os.R_OK)


REVOKED = r"VERIFY ERROR: depth=0, error=certificate revoked: CN=dave"


def _refused(deployment: Deployment, server: OpenVpn, profile: Path, attempt: int) -> None:
    """One more connection of the revoked ``dave``: refused for being revoked."""
    client = deployment.client(profile, f"dave-{attempt}")
    server.wait_for(REVOKED, count=attempt)
    assert client.wait_exit() != 0
    assert CONNECTED not in client.text()
    assert "unable to get certificate CRL" not in server.text()
    server.wait_for(LISTENING, count=attempt + 1)


def test_a_revoked_client_stays_refused_whatever_rewrites_the_crl_file(
    deployment: Deployment,
) -> None:
    """Every path that rewrites the CRL file (or is refused from doing so) leaves one OpenVPN
    keeps reading, without restart, with a CRL for every CA: the revoked client stays out."""
    from ca.config import Settings, build_context
    from ca.jobs import job_named

    profile = deployment.add("dave")
    trellis, crl = deployment.trellis, deployment.server_dir / "crl.pem"
    trellis.process().run("openvpn", "client", "revoke", "dave", "--yes")
    server = deployment.server("server-crl-paths")
    attempt = 1
    _refused(deployment, server, profile, attempt)

    def job() -> None:
        settings = Settings(
            data_dir=trellis.data_dir,
            database_url=trellis.env["TRELLIS_DATABASE_URL"],
            key_passphrase=trellis.env["TRELLIS_KEY_PASSPHRASE"],  # type: ignore[arg-type]
        )
        ctx = build_context(settings)
        try:
            job_named("openvpn-crl").run(ctx)
        finally:
            ctx.close()

    other = deployment.root / "erin.ovpn"
    rewrites = [
        (
            "configure --crl-path",
            lambda: trellis.run("openvpn", "configure", "--crl-path", str(crl)),
        ),
        ("openvpn crl", lambda: trellis.run("openvpn", "crl")),
        ("the openvpn-crl job", job),
        (
            "server-config",
            lambda: trellis.run("openvpn", "server-config", "--out", str(deployment.server_dir)),
        ),
        (
            "another client's revocation",
            lambda: (
                trellis.run("openvpn", "client", "add", "erin", "--out", str(other)),
                trellis.run("openvpn", "client", "revoke", "erin", "--yes"),
            ),
        ),
        (
            "a second authority's claim",
            lambda: (
                trellis.run("openvpn", "init", "--authority", "vpn2"),
                trellis.run(
                    "openvpn", "configure", "--authority", "vpn2", "--crl-path", str(crl), ok=False
                ),
            ),
        ),
        (
            "the gateway's claim",
            lambda: (
                trellis.run("gateway", "init"),
                trellis.run(
                    "gateway",
                    "truststore",
                    "--format",
                    "nginx",
                    "--out",
                    str(deployment.server_dir),
                    ok=False,
                ),
            ),
        ),
    ]
    for what, rewrite in rewrites:
        rewrite()
        assert crl.read_bytes().count(b"BEGIN X509 CRL") == 2, what
        attempt += 1
        _refused(deployment, server, profile, attempt)
    server.stop()


def test_without_the_intermediate_crl_openvpn_lets_a_revoked_client_in(
    deployment: Deployment,
) -> None:
    """Why a CRL file short of a CA's CRL is refused, not warned about (ca.openvpn.crl_pem):
    OpenVPN 2.6 logs a VERIFY WARNING for a CA without a CRL and accepts the client."""
    profile = deployment.add("frank")
    trellis, crl = deployment.trellis, deployment.server_dir / "crl.pem"
    trellis.run("openvpn", "client", "revoke", "frank", "--yes")
    full = crl.read_bytes()
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\n", full, re.S)
    crl.write_bytes(blocks[-1])  # the root's only: what another authority's file amounts to
    try:
        server = deployment.server("server-no-crl")
        client = deployment.client(profile, "frank")
        client.wait_for(CONNECTED)
        assert "VERIFY WARNING: depth=0, unable to get certificate CRL: CN=frank" in server.text()
        client.stop()
        server.stop()
    finally:
        trellis.run("openvpn", "crl")
    assert crl.read_bytes() == full


def test_an_emergency_revocation_refuses_the_old_intermediates_clients_at_once(
    own_deployment: Deployment,
) -> None:
    """docs/revocation.md's emergency with the intermediate's key lost, against the real
    OpenVPN: the command itself rewrites the CRL file (no job run), which from then on holds
    no CRL for the revoked intermediate (nothing could re-sign it: ca.openvpn._crl_cas). Its
    client is refused at depth 1, where the root's CRL lists its intermediate; a client of the
    new intermediate connects."""
    deployment = own_deployment
    trellis, crl = deployment.trellis, deployment.server_dir / "crl.pem"
    alice = deployment.add("alice")
    server = deployment.server("server-emergency")
    first = deployment.client(alice, "alice-1")
    first.wait_for(CONNECTED)

    for key in (trellis.data_dir / "keys").glob("vpn-intermediate-*.pem"):
        key.unlink()
    trellis.process().run("authority", "revoke-intermediate", "--authority", "vpn", "--yes")
    assert crl.read_bytes().count(b"BEGIN X509 CRL") == 2  # the new intermediate's, the root's
    # the session after this connection reads the file (see the module's docstring)
    first.stop()
    server.wait_for(LISTENING, count=2)
    again = deployment.client(alice, "alice-2")
    server.wait_for(
        r"VERIFY ERROR: depth=1, error=certificate revoked: O=Trellis, CN=vpn intermediate"
    )
    assert again.wait_exit() != 0
    assert CONNECTED not in again.text()
    assert server.text().count("VERIFY OK: depth=0, CN=alice") == 1  # the first time only

    server.wait_for(LISTENING, count=3)
    bob = deployment.client(deployment.add("bob"), "bob")
    bob.wait_for(CONNECTED)
    assert "VERIFY OK: depth=0, CN=bob" in server.text()
    assert "unable to get certificate CRL: CN=bob" not in server.text()
    bob.stop()
    server.stop()
