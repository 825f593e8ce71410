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
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x25519
from cryptography.x509.oid import NameOID

from ca.agent import Agent, AgentConfig, Held
from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.errors import AuthenticationFailed, InvalidInput, Unavailable
from ca.files import write_atomic
from ca.grants import join_grant
from ca.issue import IssuedSvid, issue_svid
from ca.keys import KeyType, PrivateKey
from ca.pem import certs_pem
from ca.root_rotation import rotate_root
from ca.serverconn import ServerUrl
from ca.serving import ServerTls, ensure_server_certificate
from ca.workload import WorkloadClient, write_svid
from cli.main import main
from tests.ca.svidkit import (
    SQLITE_ONLY,
    add_entry,
    enrol,
    join_secret,
    make_csr,
    svid_dir_listing,
)
from tests.cli.test_walkthrough import TRELLIS
from tests.conftest import TRUST_DOMAIN
from tests.fakeserver import FakeServer, fake_server, http_answer
from tests.rotation.test_agent_retry import Recording
from tests.tlsfiles import signed_leaf

T = TypeVar("T")
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


# --- an SVID and a bundle the client has no reason to trust ------------------------------------


WEB = "spiffe://example.org/web"


def rogue_root() -> tuple[x509.Certificate, PrivateKey]:
    """A root of one's own making, as a server that is not Trellis would hand out."""
    key = KeyType.EC_P256.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ROGUE ROOT")])
    now = dt.datetime.now(dt.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return root, key


def signed_by(
    issuer: x509.Certificate, issuer_key: PrivateKey, key: PrivateKey, spiffe_id: str
) -> x509.Certificate:
    """An SVID-like leaf for ``key``, signed by whatever ``issuer_key`` is (a CA or not)."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    return signed_leaf(issuer.subject, issuer_key, key.public_key(), names)  # type: ignore[arg-type]


def svid_document(leaf: x509.Certificate, chain: bytes, bundle: bytes) -> bytes:
    return json.dumps(
        {
            **FIELDS,
            "certificate": certs_pem([leaf]).decode(),
            "chain": chain.decode(),
            "bundle": bundle.decode(),
        }
    ).encode()


def ask_with_key(monkeypatch: pytest.MonkeyPatch, key: PrivateKey, ask: Callable[[], T]) -> T:
    """``ask()`` with ``key`` as the one the client makes for its CSR: the canned answer is
    an SVID for it, as a server that signed the CSR would send."""
    with monkeypatch.context() as patched:
        patched.setattr(KeyType, "generate", lambda _self: key)
        return ask()


def _rogue_answer(ctx: Context, key: PrivateKey, case: str) -> bytes:
    root, root_key = rogue_root()
    issuer = active_issuer(ctx)
    if case == "fail/rogue-root-as-bundle":  # the probe's answer
        return svid_document(signed_by(root, root_key, key, WEB), b"", certs_pem([root]))
    if case == "fail/rogue-svid-with-the-real-bundle":
        return svid_document(signed_by(root, root_key, key, WEB), b"", issuer.bundle_pem)
    # An SVID's key is no CA key, though its chain and names are the real ones.
    other = enrol(ctx, "spiffe://example.org/other")
    leaf = signed_by(other.cert, other.key, key, WEB)
    return svid_document(leaf, other.full_chain_pem, issuer.bundle_pem)


ROGUE_ANSWERS = {
    "fail/rogue-root-as-bundle": "a bundle holding none of the roots of",
    "fail/rogue-svid-with-the-real-bundle": "an SVID that does not chain to the bundle sent",
    "fail/signed-by-a-workload-svid": "an SVID that does not chain to the bundle sent",
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", ROGUE_ANSWERS)
@pytest.mark.parametrize("how", ["request", "renew"])
def test_an_svid_the_client_has_no_reason_to_trust_is_not_written(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, how: str
) -> None:
    """A server that got past the server check (Trellis's own certificate here: a stolen key,
    or a CA under the root that should not have signed for it) answered with an SVID of its
    own root and that root as the bundle: the client wrote both, and its next connections
    trusted only the rogue root. Now the SVID must chain to the bundle sent with it, and that
    bundle must keep a root the client trusts; else nothing is written."""
    web = enrol(ctx, WEB)
    files = web.on_disk(tmp_path / "svid")
    held = svid_dir_listing(files.directory)
    tls = ensure_server_certificate(ctx)
    key = KeyType.EC_P256.generate()
    answer = http_answer(_rogue_answer(ctx, key, case))
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        url = ServerUrl.parse(server.url)
        if how == "request":
            ask = partial(WorkloadClient(url, tls.bundle_path).request, "t", tmp_path / "out")
        else:
            ask = partial(WorkloadClient(url, files.bundle).renew, files.directory)
        with pytest.raises(Unavailable, match=ROGUE_ANSWERS[case]) as refused:
            ask_with_key(monkeypatch, key, ask)
    assert "nothing was written" in refused.value.detail
    assert not (tmp_path / "out").exists()
    assert svid_dir_listing(files.directory) == held


@SQLITE_ONLY
def test_svid_request_refuses_the_probes_answer_exit_8(
    ctx: Context,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The probe's ``svid request``, in-process (its key is the one the answer is for)."""
    tls = ensure_server_certificate(ctx)
    key = KeyType.EC_P256.generate()
    answer = http_answer(_rogue_answer(ctx, key, "fail/rogue-root-as-bundle"))
    monkeypatch.setenv("TRELLIS_JOIN_TOKEN", "trellis-join-secret")
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        argv = ["svid", "request", "--server", server.url, "--bundle", str(tls.bundle_path),
                "--out", str(tmp_path / "out")]  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            ask_with_key(monkeypatch, key, partial(main, argv))
    assert exited.value.code == 8
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "a bundle holding none of the roots of --bundle" in lines[0], lines
    assert not (tmp_path / "out").exists()


@SQLITE_ONLY
def test_a_bundle_refresh_without_a_trusted_root_is_refused(ctx: Context, tmp_path: Path) -> None:
    """The agent's refresh every 5 minutes replaces bundle.pem the same way."""
    web = enrol(ctx, WEB)
    files = web.on_disk(tmp_path / "svid")
    held = svid_dir_listing(files.directory)
    tls = ensure_server_certificate(ctx)
    root, _ = rogue_root()
    answer = http_answer(certs_pem([root]), content_type="application/x-pem-file")
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        agent = Agent(AgentConfig(ServerUrl.parse(server.url), tls.bundle_path, files.directory))
        with pytest.raises(Unavailable, match="a bundle holding none of the roots of"):
            agent.refresh_bundle()
    assert svid_dir_listing(files.directory) == held


def _honest(ctx: Context, key: PrivateKey) -> IssuedSvid:
    entry = add_entry(ctx, f"spiffe://example.org/honest/{os.urandom(4).hex()}")
    _, secret = join_secret(ctx, entry)
    return issue_svid(ctx, join_grant(ctx, secret), make_csr(key, uris=[str(entry.spiffe_id)]))


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("issuer_key", "subject_key"),
    [
        (KeyType.EC_P256, KeyType.ED25519),
        (KeyType.ED25519, KeyType.EC_P384),
        (KeyType.RSA_2048, KeyType.RSA_2048),
    ],
    ids=lambda k: k.value,
)
def test_an_honest_answer_is_taken_for_every_key_type(
    bare_ctx: Context,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    issuer_key: KeyType,
    subject_key: KeyType,
) -> None:
    """The chain check takes what Trellis signs, Ed25519 included (which cryptography's
    ``PolicyBuilder`` refuses)."""
    init_authority(bare_ctx, AuthorityParams(TRUST_DOMAIN, key_type=issuer_key))
    tls = ensure_server_certificate(bare_ctx)
    key = subject_key.generate()
    svid = _honest(bare_ctx, key)
    answer = http_answer(svid_document(svid.certificate, svid.chain_pem, svid.bundle_pem))
    out = tmp_path / "svid"
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        client = WorkloadClient(ServerUrl.parse(server.url), tls.bundle_path)
        ask_with_key(monkeypatch, key, partial(client.request, "t", out, subject_key))
    assert (out / "svid.pem").read_bytes() == svid.certificate_pem + svid.chain_pem
    assert (out / "bundle.pem").read_bytes() == svid.bundle_pem


@SQLITE_ONLY
def test_honest_answers_through_a_root_rotation_are_taken(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/rotation.md: the bundle holds A and B from the publish to the retire, so every
    answer keeps a root the client trusts: A+B while it holds A, B once it holds A+B. Each step
    the client trusts the bundle the one before wrote, as the agent does."""
    out = tmp_path / "svid"
    trusted = tmp_path / "first-bundle.pem"
    trusted.write_bytes(ensure_server_certificate(ctx).bundle_path.read_bytes())
    a = x509.load_pem_x509_certificates(trusted.read_bytes())

    def take() -> list[x509.Certificate]:
        tls: ServerTls = ensure_server_certificate(ctx)
        key = KeyType.EC_P256.generate()
        svid = _honest(ctx, key)
        answer = http_answer(svid_document(svid.certificate, svid.chain_pem, svid.bundle_pem))
        with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
            client = WorkloadClient(ServerUrl.parse(server.url), trusted)
            ask_with_key(monkeypatch, key, lambda: client.request("trellis-join-secret", out))
        assert (out / "svid.pem").read_bytes() == svid.certificate_pem + svid.chain_pem
        return x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())

    assert take() == a
    rotate_root(ctx, overlap=Ttl.parse("1h"))  # publish: A+B, SVIDs still under A
    a_and_b = take()
    assert len(a_and_b) == 2 and a[0] in a_and_b
    rotate_root(ctx, step=True, force=True)  # switch: SVIDs under B, "B signed by A" after it
    assert take() == a_and_b
    trusted = out / "bundle.pem"
    rotate_root(ctx, step=True, force=True)  # retire: B alone
    b = take()
    assert len(b) == 1 and b[0] in a_and_b and b[0] not in a


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
