"""The workload client authenticates the server as ``spiffe://<td>/trellis/server`` before it
sends anything: a workload whose entry lists the server's DNS name holds an SVID that chains to
the bundle and matches the host name, and posed as Trellis to harvest join tokens."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from ca.agent import Agent, AgentConfig
from ca.authority import active_issuer
from ca.config import Context
from ca.durations import Ttl
from ca.errors import InternalError, InvalidInput, Unavailable
from ca.istio import IstioParams, issue_istio_intermediate
from ca.jobs import renew_server_certificate
from ca.keys import KeyType
from ca.pem import certs_pem, private_key_pem
from ca.root_rotation import rotate_root
from ca.rotation import rotate
from ca.serverconn import ServerConnection, ServerUrl
from ca.serving import ServerTls, ensure_server_certificate
from ca.workload import WorkloadClient
from tests.ca.svidkit import SQLITE_ONLY, add_entry, enrol, join_secret
from tests.cli.test_walkthrough import TRELLIS
from tests.fakeserver import FakeServer, fake_server, http_answer
from tests.tlsfiles import loopback_server_tls, signed_leaf


@dataclass
class Impostor:
    """A workload of the trust domain with ``localhost`` in its SVID, serving TLS with it."""

    server: FakeServer
    bundle: Path
    victim_token: str


@pytest.fixture
def impostor(ctx: Context, tmp_path: Path) -> Iterator[Impostor]:
    fake = enrol(ctx, "spiffe://example.org/fake-server", dns_names=["localhost"])
    (tmp_path / "fake.pem").write_bytes(fake.full_chain_pem)
    (tmp_path / "fake.key").write_bytes(private_key_pem(fake.key))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(fake.svid.bundle_pem)
    _, token = join_secret(ctx, add_entry(ctx, "spiffe://example.org/victim"))
    answer = http_answer(b'{"detail": "teapot"}', "418 I'm a teapot")
    with fake_server(tmp_path / "fake.pem", tmp_path / "fake.key", answer=answer) as server:
        yield Impostor(server, bundle, token)


@SQLITE_ONLY
def test_a_workload_svid_is_not_the_server_and_gets_no_token(
    impostor: Impostor, tmp_path: Path
) -> None:
    client = WorkloadClient(ServerUrl.parse(impostor.server.url), impostor.bundle)
    with pytest.raises(Unavailable, match="is not Trellis") as refused:
        client.request(impostor.victim_token, tmp_path / "victim")
    assert "spiffe://example.org/fake-server" in refused.value.detail
    assert "spiffe://example.org/trellis/server" in refused.value.detail
    impostor.server.settled()
    assert impostor.server.handshakes == 1  # the chain and host name did verify
    assert impostor.server.everything == b"", "the client sent a request to the impostor"
    assert not (tmp_path / "victim").exists()


def _svid_request(impostor: Impostor, out: Path) -> subprocess.CompletedProcess[str]:
    """``trellis svid request`` of the victim's token, against the impostor."""
    return subprocess.run(
        [TRELLIS, "svid", "request", "--server", impostor.server.url,
         "--bundle", str(impostor.bundle), "--token", impostor.victim_token, "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@SQLITE_ONLY
def test_the_cli_refuses_the_impostor_in_one_line(impostor: Impostor, tmp_path: Path) -> None:
    result = _svid_request(impostor, tmp_path / "victim")
    assert result.returncode == 8, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not Trellis" in lines[0], result.stderr
    impostor.server.settled()
    assert impostor.server.everything == b""
    assert impostor.victim_token not in result.stderr


@SQLITE_ONLY
def test_renewal_and_agent_refuse_the_impostor_too(
    ctx: Context, impostor: Impostor, tmp_path: Path
) -> None:
    """A renewal proof and the agent's bundle refresh go to the same check."""
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "web")
    client = WorkloadClient(ServerUrl.parse(impostor.server.url), files.bundle)
    with pytest.raises(Unavailable, match="is not Trellis"):
        client.renew(files.directory)
    with pytest.raises(Unavailable, match="is not Trellis"):
        client.fetch_bundle()
    config = AgentConfig(
        ServerUrl.parse(impostor.server.url),
        impostor.bundle,
        tmp_path / "agent",
        token=impostor.victim_token,
    )
    with pytest.raises(Unavailable, match="is not Trellis"):
        Agent(config).run(once=True)
    impostor.server.settled()
    assert impostor.server.everything == b""


# --- a server certificate from an Istio plug-in intermediate ------------------------------------

SERVER_ID = "spiffe://example.org/trellis/server"
ISTIO_REFUSAL = "was issued by an Istio plug-in intermediate"


def _as_openssl_matches_it(name: x509.Name) -> x509.Name:
    """``name`` upper-cased, a tab for each space and a space around it: another name to
    cryptography, the same to OpenSSL, which compares names in a canonical form (ASCII case
    folded, whitespace trimmed and each run of it one space) when it looks for an issuer."""
    return x509.Name(
        [
            x509.NameAttribute(a.oid, " " + str(a.value).upper().replace(" ", "\t") + " ")
            for a in name
        ]
    )


def istio_signed_server(
    ctx: Context, directory: Path, *, issuer_spelling: bool = False
) -> tuple[Path, Path]:
    """What istiod can sign with the ``cacerts`` Trellis hands it: a certificate for Trellis's
    own server identity, with ``localhost`` (the fake server's host name) and serverAuth.
    Returned as the chain file (leaf, then the intermediate, as istiod serves it) and key."""
    intermediate = issue_istio_intermediate(ctx, IstioParams("c1"))
    key = KeyType.EC_P256.generate()
    issuer = intermediate.certificate.subject
    leaf = signed_leaf(
        _as_openssl_matches_it(issuer) if issuer_spelling else issuer,
        intermediate.key,  # type: ignore[arg-type]
        key.public_key(),
        [x509.UniformResourceIdentifier(SERVER_ID), x509.DNSName("localhost")],
        server=True,
    )
    chain, key_file = directory / "istio-server.pem", directory / "istio-server.key"
    chain.write_bytes(certs_pem([leaf, intermediate.certificate]))
    key_file.write_bytes(private_key_pem(key))
    return chain, key_file


@pytest.fixture(params=[False, True], ids=["issuer/as-signed", "issuer/openssl-equal-spelling"])
def istio_impostor(
    ctx: Context, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Impostor]:
    chain, key = istio_signed_server(ctx, tmp_path, issuer_spelling=request.param)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(active_issuer(ctx).bundle_pem)
    _, token = join_secret(ctx, add_entry(ctx, "spiffe://example.org/victim"))
    answer = http_answer(b'{"detail": "teapot"}', "418 I'm a teapot")
    with fake_server(chain, key, answer=answer) as server:
        yield Impostor(server, bundle, token)


@SQLITE_ONLY
def test_a_server_certificate_istiod_signed_gets_no_token(
    istio_impostor: Impostor, tmp_path: Path
) -> None:
    """Any CA under the trust domain's root may sign any of its SPIFFE IDs, the server's too:
    the chain verifies, the host name matches, the URI SAN is Trellis's. Also when the leaf
    spells its issuer as OpenSSL still matches it to the intermediate (the handshake counts
    it): the name is read as OpenSSL reads it."""
    client = WorkloadClient(ServerUrl.parse(istio_impostor.server.url), istio_impostor.bundle)
    with pytest.raises(Unavailable, match=ISTIO_REFUSAL) as refused:
        client.request(istio_impostor.victim_token, tmp_path / "victim")
    assert "is not Trellis" in refused.value.detail
    assert "nothing was sent to it" in refused.value.detail
    istio_impostor.server.settled()
    assert istio_impostor.server.handshakes == 1  # chain, host name and identity all held
    assert istio_impostor.server.everything == b"", "the client sent a request to istiod's leaf"
    assert not (tmp_path / "victim").exists()


@SQLITE_ONLY
def test_svid_request_and_the_agent_refuse_it_in_one_line(
    ctx: Context, istio_impostor: Impostor, tmp_path: Path
) -> None:
    result = _svid_request(istio_impostor, tmp_path / "victim")
    assert result.returncode == 8, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ISTIO_REFUSAL in lines[0], result.stderr
    assert istio_impostor.victim_token not in result.stderr
    assert not (tmp_path / "victim").exists()

    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "web")
    client = WorkloadClient(ServerUrl.parse(istio_impostor.server.url), files.bundle)
    with pytest.raises(Unavailable, match=ISTIO_REFUSAL):
        client.renew(files.directory)
    config = AgentConfig(
        ServerUrl.parse(istio_impostor.server.url),
        istio_impostor.bundle,
        tmp_path / "agent",
        token=istio_impostor.victim_token,
    )
    with pytest.raises(Unavailable, match=ISTIO_REFUSAL):
        Agent(config).run(once=True)
    istio_impostor.server.settled()
    assert istio_impostor.server.everything == b""


def assert_reaches(tls: ServerTls, bundle: Path) -> None:
    """A client trusting ``bundle`` takes the server presenting ``tls`` for Trellis: the
    request, credential and all, reaches it."""
    with fake_server(
        tls.cert_path, tls.key_path, answer=http_answer(b"{}", "418 Teapot")
    ) as server:
        client = WorkloadClient(ServerUrl.parse(server.url), bundle)
        with pytest.raises(Unavailable, match=r"server refused \(418\)"):
            client.request("trellis-join-secret", bundle.parent / "never")
        server.settled()
    assert b"Authorization: Bearer trellis-join-secret" in server.everything


@SQLITE_ONLY
def test_the_serving_certificate_stays_accepted_through_rotations(
    ctx: Context, tmp_path: Path
) -> None:
    """The Istio check against the issuers Trellis's serving certificate has, stage by stage:
    the mesh intermediate, its successor, and after a root switch the new root's intermediate
    with "B signed by A" after it, for a client that still trusts only the first bundle and
    for one that trusts the current one."""
    first = tmp_path / "first-bundle.pem"
    tls = ensure_server_certificate(ctx)
    shutil.copyfile(tls.bundle_path, first)
    assert_reaches(tls, first)

    rotate(ctx, force=True)  # an intermediate rotation: prepare, then activate
    rotate(ctx, force=True)
    assert ensure_server_certificate(ctx).issued is not None
    assert_reaches(tls, first)

    rotate_root(ctx, overlap=Ttl.parse("1h"))  # publish: the bundle holds A and B
    renew_server_certificate(ctx)
    assert_reaches(tls, first)
    assert_reaches(tls, tls.bundle_path)

    rotate_root(ctx, step=True, force=True)  # switch: the serving certificate is under B
    assert ensure_server_certificate(ctx).issued is not None
    assert_reaches(tls, first)
    assert_reaches(tls, tls.bundle_path)


@SQLITE_ONLY
def test_the_real_server_identity_is_accepted(ctx: Context, tmp_path: Path) -> None:
    """The control: the same harness with Trellis's serving certificate receives the request,
    credential and all, so the refusals above are the identity check's doing."""
    tls = ensure_server_certificate(ctx)
    answer = http_answer(b'{"detail": "teapot"}', "418 I'm a teapot")
    with fake_server(tls.cert_path, tls.key_path, answer=answer) as server:
        client = WorkloadClient(ServerUrl.parse(server.url), tls.bundle_path)
        with pytest.raises(Unavailable, match="teapot"):
            client.request("trellis-join-secret", tmp_path / "out")
    assert b"Authorization: Bearer trellis-join-secret" in server.everything


def test_a_bundle_without_a_spiffe_root_is_refused(tmp_path: Path) -> None:
    ca, _chain, _key = loopback_server_tls(tmp_path)
    with pytest.raises(InvalidInput, match="not a Trellis bundle"):
        WorkloadClient(ServerUrl.parse("https://localhost:1"), ca)


@SQLITE_ONLY
def test_a_credential_http_client_refuses_is_a_typed_error_that_does_not_repeat_it(
    ctx: Context, tmp_path: Path
) -> None:
    """http.client refuses a header value with a newline (or outside Latin-1) by raising in
    the worker thread: that ended the thread with a traceback quoting the header, token and
    all, and left the caller no answer and no failure, for an ``assert`` to stop on. It is
    ``InvalidInput`` now, naming the exception's type only, and nothing reached the server."""
    tls = ensure_server_certificate(ctx)
    secret = "trellis-join-S3CRETS3CRETS3CRET"
    with fake_server(tls.cert_path, tls.key_path, answer=http_answer(b"{}")) as server:
        client = WorkloadClient(ServerUrl.parse(server.url), tls.bundle_path)
        for credential, kind in ((f"{secret}\n", "ValueError"), (f"{secret}\u2028", "Unicode")):
            with pytest.raises(InvalidInput, match=kind) as refused:
                client.request(credential, tmp_path / "out")
            assert "S3CRET" not in refused.value.detail
        server.settled()
    assert b"S3CRET" not in server.everything
    assert not (tmp_path / "out").exists()


@SQLITE_ONLY
def test_any_other_exception_while_sending_is_an_internal_error(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else the worker meets becomes a typed error for the caller, its message left
    out (it may quote the request), instead of a lost thread and a bare ``assert``."""
    tls = ensure_server_certificate(ctx)

    def broken(self: ServerConnection, tls: object) -> None:
        raise RuntimeError("Bearer trellis-join-S3CRET")

    monkeypatch.setattr(ServerConnection, "authenticate", broken)
    with fake_server(tls.cert_path, tls.key_path, answer=http_answer(b"{}")) as server:
        connection = ServerConnection(ServerUrl.parse(server.url), tls.bundle_path, "bundle")
        with pytest.raises(InternalError, match="RuntimeError") as failed:
            connection.exchange("GET", "/v1/bundle")
        server.settled()
    assert "S3CRET" not in failed.value.detail
