"""``trellis agent`` end to end: real ``trellis serve`` and agent processes keep two workloads'
SVID files fresh through renewals and an intermediate activation, while a mutual-TLS
connection between them is made every second and the files are sampled continuously."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr

from ca.config import Settings, build_context
from ca.durations import Ttl
from ca.entries import EntryParams, create_entry
from ca.identity import SpiffeId
from ca.store.db import SchemaPolicy
from ca.tokens import create_join_token
from tests.certassert import uri_sans
from tests.cli.test_walkthrough import TRELLIS, Trellis
from tests.conftest import free_port
from tests.processes import stopped_by_sigterm, terminate
from tests.rotation.rotkit import needs_openssl, openssl_verify

pytestmark = pytest.mark.slow

TTL = Ttl.parse("20s")
# The mutual-TLS test's SVIDs: renewed every ~5 s, so three renewals and an activation fit in
# ~16 s, with 5 s of slack before one expires should a renewal be late.
SHORT_TTL = Ttl.parse("10s")


@dataclass
class Mesh:
    cli: Trellis
    url: str
    bundle: Path
    log: Path

    def token(self, spiffe_id: str, uses: int = 1, ttl: Ttl = TTL) -> str:
        settings = Settings(
            data_dir=self.cli.data_dir,
            database_url=self.cli.env["TRELLIS_DATABASE_URL"],
            key_passphrase=SecretStr(self.cli.env["TRELLIS_KEY_PASSPHRASE"]),
        )
        ctx = build_context(settings, schema=SchemaPolicy.TRUSTED)
        try:
            entry = create_entry(
                ctx, EntryParams(SpiffeId.parse(spiffe_id), (), ttl=ttl, max_ttl=ttl)
            )
            _info, secret = create_join_token(ctx, entry.id, uses=uses)
        finally:
            ctx.close()
        return secret


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """``trellis serve`` on SQLite with the drill CA: 3-minute intermediates, 20-second SVIDs."""
    base = tmp_path_factory.mktemp("agent-mesh")
    cli = Trellis(base / "var", f"sqlite:///{base / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org", "--ca-ttl", "3m", "--svid-ttl", "20s")
    log = base / "serve.log"
    with cli.serving(log) as serving:
        yield Mesh(cli, serving.url, cli.data_dir / "bundle.pem", log)


class AgentProcess:
    def __init__(self, mesh: Mesh, directory: Path, *extra: str, token: str | None) -> None:
        self.directory = directory
        self.log_path = directory.parent / f"{directory.name}.agent.log"
        self._log: IO[str] = self.log_path.open("w")
        args = [TRELLIS, "agent", "--server", mesh.url, "--bundle", str(mesh.bundle)]
        args += ["--dir", str(directory), *extra]
        env = {k: v for k, v in mesh.cli.env.items() if k != "TRELLIS_JOIN_TOKEN"}
        if token is not None:
            args += ["--token", token]
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        status = terminate(self.process, grace=15)
        self._log.close()
        return status

    @property
    def log(self) -> str:
        return self.log_path.read_text()


def run_agent(
    mesh: Mesh, directory: Path, *extra: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [TRELLIS, "agent", "--server", mesh.url, "--bundle", str(mesh.bundle)]
    args += ["--dir", str(directory), *extra]
    if token is not None:
        args += ["--token", token]
    env = {k: v for k, v in mesh.cli.env.items() if k != "TRELLIS_JOIN_TOKEN"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


# --- reading the files the way a workload does -------------------------------------------------


def read_pair(directory: Path) -> tuple[x509.Certificate, list[x509.Certificate], object]:
    """Resolve ``..data`` once, then read certificate and key from that one generation."""
    for _ in range(100):
        data = Path(os.path.realpath(directory / "..data"))
        try:
            chain = x509.load_pem_x509_certificates((data / "svid.pem").read_bytes())
            key = serialization.load_pem_private_key((data / "svid.key").read_bytes(), None)
            return chain[0], chain[1:], key
        except FileNotFoundError:
            time.sleep(0.001)  # that generation was just replaced and removed: resolve again
    raise AssertionError(f"no readable generation in {directory}")


def matches(cert: x509.Certificate, key: object) -> bool:
    return cert.public_key() == key.public_key()  # type: ignore[attr-defined]


@dataclass
class Samples:
    count: int = 0
    realpath_mismatches: int = 0
    symlink_races: int = 0  # a swap between the two reads through the symlinks (retried)
    symlink_mismatches: int = 0  # still mismatched after the retry
    torn: int = 0  # a resolved generation with an unreadable (half-written) file
    serials: list[int] = field(default_factory=list)
    issuers: dict[int, str] = field(default_factory=dict)  # SVID serial -> intermediate serial


def _aki(cert: x509.Certificate) -> bytes:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    return aki.value.key_identifier or b""


def sample(directory: Path, samples: Samples, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            cert, chain, key = read_pair(directory)
        except ValueError:
            samples.torn += 1
            continue
        samples.count += 1
        if not matches(cert, key):
            samples.realpath_mismatches += 1
        if cert.serial_number not in samples.issuers:
            samples.serials.append(cert.serial_number)
            samples.issuers[cert.serial_number] = format(chain[0].serial_number, "x")
        for attempt in range(2):
            try:
                through = x509.load_pem_x509_certificates((directory / "svid.pem").read_bytes())
                link_key = serialization.load_pem_private_key(
                    (directory / "svid.key").read_bytes(), None
                )
                if matches(through[0], link_key):
                    break
            except (OSError, ValueError):
                pass
            if attempt == 0:
                samples.symlink_races += 1
            else:
                samples.symlink_mismatches += 1
        time.sleep(0.01)


# --- a mutual-TLS pair built from the agents' files ---------------------------------------------


@dataclass
class Handshakes:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    pairs: set[tuple[bytes, bytes]] = field(default_factory=set)  # (server, client) leaf AKIs


def tls_server(
    directory: Path, listener: socket.socket, record: Handshakes, stop: threading.Event
) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        try:
            context, _own = tls_context(directory, ssl.PROTOCOL_TLS_SERVER)  # reloaded every time
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.settimeout(5)
                assert tls.recv(16) == b"ping"
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                tls.sendall(b"pong " + uri_sans(peer)[0].encode())
        except Exception as exc:  # every server-side failure is reported
            record.server_errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()


def tls_context(directory: Path, protocol: int) -> tuple[ssl.SSLContext, x509.Certificate]:
    """An mTLS context from the current generation of the agent's files: ``..data`` resolved
    once, so certificate, key and bundle belong together (resolved again if that generation was
    removed by a swap in between)."""
    for _ in range(100):
        data = Path(os.path.realpath(directory / "..data"))
        context = ssl.SSLContext(protocol)
        context.check_hostname = False  # SPIFFE: the peer is identified by its URI SAN
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=str(data / "bundle.pem"))
            context.load_cert_chain(data / "svid.pem", data / "svid.key")
            own = x509.load_pem_x509_certificates((data / "svid.pem").read_bytes())[0]
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        return context, own
    raise AssertionError(f"no readable generation in {directory}")


def handshake(directory: Path, port: int, record: Handshakes) -> None:
    try:
        context, own = tls_context(directory, ssl.PROTOCOL_TLS_CLIENT)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"ping")
            answer = tls.recv(200)
            peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        assert answer == b"pong spiffe://example.org/agent/b", answer
        assert uri_sans(peer) == ["spiffe://example.org/agent/a"]
        record.pairs.add((_aki(peer), _aki(own)))
        record.ok += 1
    except (OSError, AssertionError, ValueError) as exc:
        record.failures.append(f"{time.strftime('%X')} {type(exc).__name__}: {exc}")


def client(directory: Path, port: int, record: Handshakes, stop: threading.Event) -> None:
    while not stop.is_set():
        handshake(directory, port, record)
        stop.wait(1)


# --- the tests -----------------------------------------------------------------------------------


def test_agents_keep_mutual_tls_working_through_renewals_and_an_activation(
    mesh: Mesh, tmp_path: Path
) -> None:
    exec_logs = {name: tmp_path / f"{name}.changes" for name in "ab"}
    agents = {
        name: AgentProcess(
            mesh,
            tmp_path / name,
            "--exec",
            f"sh -c 'echo changed >> {exec_logs[name]}'",
            token=mesh.token(f"spiffe://example.org/agent/{name}", ttl=SHORT_TTL),
        )
        for name in "ab"
    }
    stop = threading.Event()
    # The server stops after the client: a handshake the client began just as the test ended
    # would otherwise wait out its timeout against a server that no longer accepts.
    server_stop = threading.Event()
    server: threading.Thread | None = None
    threads: list[threading.Thread] = []
    samples = {name: Samples() for name in "ab"}
    record = Handshakes()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / n / "svid.pem").exists() for n in "ab"):
            assert all(a.process.poll() is None for a in agents.values()), "an agent exited"
            assert time.monotonic() < deadline, "the agents did not bootstrap"
            time.sleep(0.1)
        threads = [
            threading.Thread(target=sample, args=(tmp_path / n, samples[n], stop), daemon=True)
            for n in "ab"
        ]
        server = threading.Thread(
            target=tls_server, args=(tmp_path / "a", listener, record, server_stop), daemon=True
        )
        server.start()
        threads.append(
            threading.Thread(target=client, args=(tmp_path / "b", port, record, stop), daemon=True)
        )
        for thread in threads:
            thread.start()

        started = time.monotonic()
        rotated: list[str] = []
        new_issuer: str | None = None
        while time.monotonic() - started < 80:
            elapsed = time.monotonic() - started
            if not rotated and elapsed > 2:
                out = mesh.cli.json("authority", "rotate", "--now")
                assert isinstance(out, list)  # the REST shape: the transitions
                rotated += [t["event"] for t in out]
                assert rotated == ["prepared"], rotated
            elif rotated == ["prepared"] and elapsed > 4:
                out = mesh.cli.json("authority", "rotate", "--now")
                assert isinstance(out, list)
                rotated += [t["event"] for t in out]
                assert rotated == ["prepared", "retired", "activated"], rotated
                new_issuer = out[-1]["serial"]
            # done once both agents renewed three times and hold SVIDs of the new intermediate
            if (
                new_issuer is not None
                and elapsed > 10
                and all(
                    len(s.serials) >= 4 and s.issuers[s.serials[-1]] == new_issuer
                    for s in samples.values()
                )
            ):
                break
            time.sleep(0.2)
        duration = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        server_stop.set()
        if server is not None:
            server.join(timeout=10)
        listener.close()
        codes = {name: agent.stop() for name, agent in agents.items()}
    logs = {name: agent.log for name, agent in agents.items()}

    assert rotated == ["prepared", "retired", "activated"]
    assert not record.failures, record.failures
    assert not record.server_errors, record.server_errors
    # one every ~1 s (a loaded machine may stretch a handshake; none may fail)
    assert record.ok >= max(10, duration / 2), f"only {record.ok} handshakes in {duration:.0f} s"
    for name in "ab":
        s = samples[name]
        assert s.count > 100, f"{name}: only {s.count} samples"
        assert s.realpath_mismatches == 0, f"{name}: key and certificate of different generations"
        assert s.torn == 0, f"{name}: {s.torn} half-written files seen"
        assert s.symlink_mismatches == 0, f"{name}: mismatched through the symlinks twice running"
        assert len(s.serials) >= 3, f"{name}: fewer than two renewals: {logs[name]}"
        assert len(set(s.issuers.values())) == 2, f"{name}: not on exactly two intermediates"
        assert s.issuers[s.serials[-1]] == new_issuer, f"{name}: not on the new intermediate"
        assert logs[name].count("renewed: ") >= 2
        assert codes[name] == 0, f"agent {name} exited {codes[name]} on SIGTERM: {logs[name]}"
        # --exec ran after every change: the first SVID, each renewal, each bundle update
        changes = logs[name].count("obtained: ") + logs[name].count("renewed: ")
        changes += logs[name].count("bundle updated: ")
        assert exec_logs[name].read_text().count("changed") == changes >= 3
        # the atomic writer leaves one generation behind, and the key private
        entries = {p.name for p in (tmp_path / name).iterdir()}
        generations = {e for e in entries if e.startswith("..") and e != "..data"}
        assert len(generations) == 1, f"old generations left behind: {sorted(entries)}"
        assert entries - generations == {"..data", "bundle.pem", "svid.key", "svid.pem"}
        assert os.readlink(tmp_path / name / "..data") == generations.pop()
        assert os.stat(os.path.realpath(tmp_path / name / "svid.key")).st_mode & 0o777 == 0o600
    # handshakes happened with both agents on the old and on the new intermediate
    issuers = {ski for pair in record.pairs for ski in pair}
    assert len(issuers) == 2, record.pairs
    print(  # with -s: how often a read through the symlinks raced a swap (retried)
        "symlink races:",
        {n: s.symlink_races for n, s in samples.items()},
        "samples:",
        {n: s.count for n, s in samples.items()},
        "handshakes:",
        record.ok,
    )


@needs_openssl
def test_agent_once_obtains_a_valid_svid_and_exits(mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "init"
    token = mesh.token("spiffe://example.org/agent/once")
    result = run_agent(mesh, out, "--once", token=token)
    assert result.returncode == 0, result.stdout + result.stderr
    cert, chain, key = read_pair(out)
    assert matches(cert, key)
    assert uri_sans(cert) == ["spiffe://example.org/agent/once"]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() <= 20 + 30
    now = dt.datetime.now(dt.UTC)
    for purpose in ("sslclient", "sslserver"):
        check = openssl_verify((out / "bundle.pem").read_bytes(), cert, chain, now, purpose)
        assert check.returncode == 0, check.stdout + check.stderr
    assert (out / "bundle.pem").read_bytes() == mesh.bundle.read_bytes()
    assert os.stat(os.path.realpath(out / "svid.key")).st_mode & 0o777 == 0o600
    assert all((out / n).is_symlink() for n in ("svid.pem", "svid.key", "bundle.pem"))

    # a restarted init container finds a valid SVID and needs no token (the token is spent): it
    # renews it, which is how it learns that the SVID is still valid (not revoked)
    again = run_agent(mesh, out, "--once")
    assert again.returncode == 0, again.stderr
    renewed = read_pair(out)[0]
    assert renewed.serial_number != cert.serial_number
    assert uri_sans(renewed) == ["spiffe://example.org/agent/once"]


def test_agent_once_does_not_keep_a_revoked_svid(mesh: Mesh, tmp_path: Path) -> None:
    """--once reported success with a revoked SVID on disk, and the agent retried the refusal
    of its renewal until notAfter: it bootstraps again with the token at once, or exits."""
    out = tmp_path / "svid"
    token = mesh.token("spiffe://example.org/agent/revoked", uses=2)
    assert run_agent(mesh, out, "--once", token=token).returncode == 0
    revoked = read_pair(out)[0]
    serial = format(revoked.serial_number, "x")
    mesh.cli.run("revoke", serial, "--reason", "keyCompromise", "--yes")

    refused = run_agent(mesh, out, "--once")
    assert refused.returncode == 3, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "is revoked" in last and "no --token" in last, refused.stderr

    replaced = run_agent(mesh, out, "--once", token=token)
    assert replaced.returncode == 0, replaced.stderr
    assert "bootstrapping again with the join token" in replaced.stderr
    fresh = read_pair(out)[0]
    assert fresh.serial_number != revoked.serial_number
    assert uri_sans(fresh) == ["spiffe://example.org/agent/revoked"]


def test_agent_without_token_or_svid_fails_at_once(mesh: Mesh, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    started = time.monotonic()
    result = run_agent(mesh, empty)
    assert time.monotonic() - started < 20, "the agent did not give up at once"
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and "no valid SVID" in lines[-1] and "--token" in lines[-1], result.stderr
    assert not (empty / "svid.pem").exists()


def test_agent_once_with_a_spent_token_fails_clearly(mesh: Mesh, tmp_path: Path) -> None:
    token = mesh.token("spiffe://example.org/agent/spent")
    assert run_agent(mesh, tmp_path / "first", "--once", token=token).returncode == 0
    result = run_agent(mesh, tmp_path / "second", "--once", token=token)
    assert result.returncode == 3, result.stderr
    assert "already been used" in result.stderr
    assert not (tmp_path / "second" / "svid.pem").exists()


def _spends_nothing(mesh: Mesh, tmp_path: Path, *bad: str) -> str:
    """The agent refuses ``bad`` at start-up: exit 2, one line, and the join token it was given
    is still unused (an SVID obtained with it afterwards), no files written."""
    token = mesh.token(f"spiffe://example.org/agent/{tmp_path.name}")
    out = tmp_path / "svid"
    args = ("--dir", str(out), *bad) if "--dir" not in bad else bad
    refused = subprocess.run(
        [TRELLIS, "agent", "--server", mesh.url, "--bundle", str(mesh.bundle), *args,
         "--token", token, "--once"],
        env={k: v for k, v in mesh.cli.env.items() if k != "TRELLIS_JOIN_TOKEN"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trellis: "), refused.stderr
    assert not out.exists() or not any(out.iterdir())
    fresh = tmp_path / "fresh"
    assert run_agent(mesh, fresh, "--once", token=token).returncode == 0, "the token was spent"
    return lines[0]


@pytest.mark.parametrize(
    ("exec_command", "reason"),
    [
        pytest.param("echo 'unbalanced", "No closing quotation", id="fail/unbalanced-quote"),
        pytest.param("no-such-reload-cmd -s reload", "not on PATH", id="fail/not-on-path"),
        pytest.param("./no-such-hook", "not an executable file", id="fail/no-such-file"),
        pytest.param("", "--exec is empty", id="fail/empty"),
    ],
)
def test_agent_refuses_a_bad_exec_before_spending_the_token(
    mesh: Mesh, tmp_path: Path, exec_command: str, reason: str
) -> None:
    line = _spends_nothing(mesh, tmp_path, "--exec", exec_command)
    assert reason in line and "--exec" in line


@pytest.mark.parametrize("where", ["a-file", "a-file/below", "/proc/x"])
def test_agent_refuses_a_bad_dir_before_spending_the_token(
    mesh: Mesh, tmp_path: Path, where: str
) -> None:
    (tmp_path / "a-file").touch()
    directory = where if where.startswith("/") else str(tmp_path / where)
    line = _spends_nothing(mesh, tmp_path, "--dir", directory)
    assert f"--dir {directory}" in line


def test_a_reload_hook_that_cannot_run_is_a_warning(mesh: Mesh, tmp_path: Path) -> None:
    """The hook is found at start-up but cannot be executed when the SVID changes (here: its
    interpreter is missing): the agent warns, like for a hook exiting non-zero, and goes on."""
    hook = tmp_path / "hook"
    hook.write_text("#!/no/such/interpreter\n")
    hook.chmod(0o755)
    out = tmp_path / "svid"
    token = mesh.token("spiffe://example.org/agent/hook")
    result = run_agent(mesh, out, "--exec", str(hook), "--once", token=token)
    assert result.returncode == 0, result.stderr
    assert f"reload command {hook} cannot run: No such file or directory" in result.stderr
    cert, _chain, key = read_pair(out)
    assert matches(cert, key)


def test_sigterm_stops_the_agent_during_a_back_off(tmp_path: Path) -> None:
    """A sidecar gets 30 s between SIGTERM and SIGKILL: the agent stops within a second or so,
    even while it waits to retry a renewal (the server is down)."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org", "--ca-ttl", "1h", "--svid-ttl", "5m")
    out = tmp_path / "svid"
    cli.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(out), "--ttl", "40s"
    )
    log_path = tmp_path / "agent.log"
    args = [TRELLIS, "agent", "--server", f"https://127.0.0.1:{free_port()}"]
    args += ["--bundle", str(out / "bundle.pem"), "--dir", str(out)]
    with log_path.open("w") as log:
        process = subprocess.Popen(args, env=cli.env, stdout=log, stderr=subprocess.STDOUT)
    # Renewal at about 20 s; connection refused; retries after 1, 2, then 4 s (a quarter of the
    # ~17 s left caps the back-off there).
    status, took = stopped_by_sigterm(
        process,
        lambda: bool(re.search(r"retrying in ([4-9]|\d\d) s", log_path.read_text())),
        log_path,
        within=40,
    )
    assert status == 0, log_path.read_text()
    assert took < 2.5, f"exited {took:.1f} s after SIGTERM: {log_path.read_text()}"
