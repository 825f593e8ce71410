"""What the workload client does with a server's answer it cannot use: a 200 that is not an SVID
(a proxy's maintenance page, a list, missing fields, a certificate that is not PEM) is the
server side's fault, one line and exit 8, with nothing written; the agent backs off and retries
it like an outage instead of ending with a traceback."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x25519

from ca.agent import Agent, AgentConfig, Held
from ca.clock import FixedClock
from ca.config import Context
from ca.errors import AuthenticationFailed, InvalidInput, Unavailable
from ca.files import write_atomic
from ca.keys import PrivateKey
from ca.serverconn import ServerUrl
from ca.serving import ensure_server_certificate
from ca.workload import WorkloadClient, write_svid
from tests.ca.svidkit import SQLITE_ONLY, enrol, svid_dir_listing
from tests.cli.test_walkthrough import TRELLIS
from tests.fakeserver import FakeServer, fake_server, http_answer
from tests.rotation.test_agent_retry import Recording

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
FIELDS = {
    "spiffe_id": "spiffe://example.org/w",
    "serial": "01",
    "expires_at": "2030-01-01T00:00:00Z",
    "certificate": PEM_CERT,
    "chain": "",
    "bundle": PEM_CERT,
}

BAD_ANSWERS = [
    pytest.param(b"<html>maintenance</html>", id="fail/not-json"),
    pytest.param(b"[1]", id="fail/a-list"),
    pytest.param(b'{"spiffe_id": "x"}', id="fail/missing-fields"),
    pytest.param(json.dumps({**FIELDS, "serial": 1}).encode(), id="fail/not-a-string"),
    pytest.param(json.dumps({**FIELDS, "certificate": "garbage"}).encode(), id="fail/not-pem"),
    pytest.param(json.dumps(FIELDS).encode(), id="fail/bad-der"),
    pytest.param(b"\xff\xfe", id="fail/not-utf8"),
]


@SQLITE_ONLY
@pytest.mark.parametrize("body", BAD_ANSWERS)
def test_a_200_that_is_not_an_svid_is_the_servers_fault(
    ctx: Context, tmp_path: Path, body: bytes
) -> None:
    tls = ensure_server_certificate(ctx)
    with fake_server(tls.cert_path, tls.key_path, answer=http_answer(body)) as server:
        client = WorkloadClient(ServerUrl.parse(server.url), tls.bundle_path)
        with pytest.raises(Unavailable, match="answered 200 with"):
            client.request("trellis-join-secret", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@SQLITE_ONLY
def test_a_certificate_for_another_key_is_refused(ctx: Context, tmp_path: Path) -> None:
    other = enrol(ctx, "spiffe://example.org/other")
    document = {
        **FIELDS,
        "certificate": other.svid.certificate_pem.decode(),
        "chain": other.svid.chain_pem.decode(),
        "bundle": other.svid.bundle_pem.decode(),
    }
    tls = ensure_server_certificate(ctx)
    answer = http_answer(json.dumps(document).encode())
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        client = WorkloadClient(ServerUrl.parse(server.url), tls.bundle_path)
        with pytest.raises(Unavailable, match="for another key"):
            client.request("trellis-join-secret", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@SQLITE_ONLY
def test_the_cli_says_so_in_one_line_exit_8(ctx: Context, tmp_path: Path) -> None:
    tls = ensure_server_certificate(ctx)
    with fake_server(tls.cert_path, tls.key_path, answer=http_answer(b"[1]")) as server:
        result = subprocess.run(
            [TRELLIS, "svid", "request", "--server", server.url, "--bundle", str(tls.bundle_path),
             "--token", "trellis-join-secret", "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 8, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "answered 200 with" in lines[0], result.stderr


@SQLITE_ONLY
def test_the_agent_backs_off_and_retries(
    ctx: Context, clock: FixedClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "svid")
    tls = ensure_server_certificate(ctx)
    answer = http_answer(b"<html>maintenance</html>")
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        config = AgentConfig(ServerUrl.parse(server.url), tls.bundle_path, files.directory)
        agent = Recording(
            config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
            rng=random.Random(7),
        )  # fmt: skip
        agent.attempts = []
        with caplog.at_level(logging.WARNING, logger="trellis.agent"):
            agent.run(stop=lambda: len(agent.attempts) >= 3)
    assert len(agent.attempts) >= 3
    assert "answered 200 with not the JSON document of an SVID; retrying in" in caplog.text
    assert files.svid.read_bytes() == web.full_chain_pem  # the SVID on disk is kept


# --- the SVID files a renewal starts from ---------------------------------------------------------


def _encrypted(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


def _foreign(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


BAD_KEYS = [
    pytest.param(_encrypted, "is encrypted", id="fail/encrypted"),
    pytest.param(
        lambda _k: _foreign(ec.generate_private_key(ec.SECP521R1())),
        "EC keys on secp521r1 are not a Trellis key type",
        id="fail/p-521",
    ),
    pytest.param(
        lambda _k: _foreign(ed448.Ed448PrivateKey.generate()),
        "Ed448PrivateKey is not a Trellis key type",
        id="fail/ed448",
    ),
    pytest.param(
        lambda _k: _foreign(x25519.X25519PrivateKey.generate()),
        "X25519PrivateKey is not a Trellis key type",
        id="fail/x25519",
    ),
    pytest.param(
        lambda _k: _foreign(ec.generate_private_key(ec.SECP256R1())),
        "is not the key of",
        id="fail/another-key",
    ),
    pytest.param(lambda _k: b"garbage", "is not a readable private key", id="fail/garbage"),
]


@SQLITE_ONLY
@pytest.mark.parametrize(("key_pem", "reason"), BAD_KEYS)
def test_a_key_file_it_cannot_use_is_invalid_input(
    ctx: Context, tmp_path: Path, key_pem: Callable[[PrivateKey], bytes], reason: str
) -> None:
    """Not a traceback (TypeError, KeyError) nor exit 3 'authentication failed' after asking the
    server: the file is checked here."""
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "svid")
    Path(os.path.realpath(files.key)).write_bytes(key_pem(web.key))
    client = WorkloadClient(ServerUrl.parse("https://127.0.0.1:1"), files.bundle)
    with pytest.raises(InvalidInput, match=reason):
        client.renew(files.directory)
    agent = Agent(
        AgentConfig(ServerUrl.parse("https://127.0.0.1:1"), files.bundle, files.directory)
    )
    with pytest.raises(InvalidInput, match=f"no valid SVID .*{reason}.*no --token"):
        agent.run(once=True)


@SQLITE_ONLY
def test_svid_renew_with_an_encrypted_key_is_exit_2(ctx: Context, tmp_path: Path) -> None:
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "svid")
    Path(os.path.realpath(files.key)).write_bytes(_encrypted(web.key))
    result = subprocess.run(
        [TRELLIS, "svid", "renew", "--server", "https://127.0.0.1:1",
         "--dir", str(files.directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        f"trellis: {files.key} is encrypted: an SVID key is kept unencrypted (its file is 0600)"
    ]


# --- --server and --dir, checked at start-up ------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    "server", ["http://127.0.0.1:1", "https://", "https://host:port", "ftp://x"], ids=str
)
def test_the_agent_refuses_a_bad_server_at_start_with_an_svid_on_disk(
    ctx: Context, tmp_path: Path, server: str
) -> None:
    """It started quietly and retried the bad URL at half-life as if the server were down."""
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "svid")
    result = subprocess.run(
        [TRELLIS, "agent", "--server", server, "--bundle", str(files.bundle),
         "--dir", str(files.directory)],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"trellis: --server {server!r} must be an https:// URL with a host (https://host:port)"
    ]


def test_svid_renew_names_no_bundle_option(tmp_path: Path) -> None:
    missing = tmp_path / "nonexist"
    result = subprocess.run(
        [TRELLIS, "svid", "renew", "--server", "https://127.0.0.1:1", "--dir", str(missing)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"trellis: {missing / 'bundle.pem'}: cannot read the trust bundle"
    ]


# --- writing the SVID files ----------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    "failure",
    [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
    ids=["fail/interrupted", "fail/full-disk"],
)
def test_a_write_that_fails_before_the_swap_leaves_the_directory_as_it_was(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """Ctrl-C or a full disk while the new set is staged (here: at its last file): the staged
    directory, with the new key in it, stayed behind, one more on each of the agent's retries."""
    old = enrol(ctx, "spiffe://example.org/old")
    files = old.on_disk(tmp_path / "svid")
    before = svid_dir_listing(files.directory)

    def staging_fails(path: Path, data: bytes, mode: int = 0o644) -> None:
        if path.name == "bundle.pem":
            raise failure
        write_atomic(path, data, mode)

    monkeypatch.setattr("ca.workload.write_atomic", staging_fails)
    new = enrol(ctx, "spiffe://example.org/new")
    with pytest.raises(type(failure)):
        write_svid(files, new.full_chain_pem, new.key, new.svid.bundle_pem)
    assert svid_dir_listing(files.directory) == before


@SQLITE_ONLY
def test_a_write_interrupted_just_after_the_swap_keeps_what_it_published(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename of ``..data`` is done when the interrupt lands: the staged directory is the
    published one and stays (removing it would leave ``..data`` pointing at nothing)."""
    old = enrol(ctx, "spiffe://example.org/old")
    files = old.on_disk(tmp_path / "svid")
    rename = os.replace

    def interrupted_after(source: Path, target: Path) -> None:
        rename(source, target)
        if Path(target).name == "..data":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_after)
    new = enrol(ctx, "spiffe://example.org/new")
    with pytest.raises(KeyboardInterrupt):
        write_svid(files, new.full_chain_pem, new.key, new.svid.bundle_pem)
    monkeypatch.undo()
    assert files.svid.read_bytes() == new.full_chain_pem
    assert files.key.exists() and files.bundle.exists()


# --- a renewal refused for good -------------------------------------------------------------------

REVOKED = http_answer(
    b'{"detail": "certificate 1f is revoked: it cannot be renewed"}', "401 Unauthorized"
)


class RevokedOnSecond(Agent):
    """The server is down at start; at the next renewal it refuses the SVID for good."""

    attempts: list[dt.datetime]
    server: FakeServer

    def renew(self) -> Held:
        self.attempts.append(self.clock.now())
        if len(self.attempts) == 2:
            self.server.answer = REVOKED
        return super().renew()


@SQLITE_ONLY
@pytest.mark.parametrize("token", [None, "trellis-join-secret"], ids=["no-token", "token"])
def test_a_permanent_refusal_is_not_retried_until_expiry(
    ctx: Context, clock: FixedClock, tmp_path: Path, token: str | None
) -> None:
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "svid")
    tls = ensure_server_certificate(ctx)
    down = http_answer(b'{"detail": "down"}', "503 Service Unavailable")
    with fake_server(tls.cert_path, tls.key_path, answer=down) as server:
        config = AgentConfig(
            ServerUrl.parse(server.url), tls.bundle_path, files.directory, token=token
        )
        agent = RevokedOnSecond(
            config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
            rng=random.Random(7),
        )  # fmt: skip
        agent.attempts, agent.server = [], server
        with pytest.raises(AuthenticationFailed, match="is revoked") as refused:
            agent.run()
        requests = [r for r in server.received if r]
    assert len(agent.attempts) == 2, agent.attempts
    assert agent.attempts[1] < web.cert.not_valid_after_utc - dt.timedelta(minutes=5)
    if token is None:
        assert "no --token" in refused.value.detail
    else:  # the token was tried at once (the fake server refuses it too)
        assert requests[-1].startswith(b"POST /v1/svid ")
        assert f"Bearer {token}".encode() in requests[-1]
