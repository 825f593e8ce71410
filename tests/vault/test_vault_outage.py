"""OpenBao hangs, stops, comes back sealed, then unsealed, under one running context.

The server keeps its state in a file store (not dev mode, which is in-memory), so the restarted
server holds the same Transit keys. Issuance is asked for in every phase, directly and over REST:
while Vault cannot sign, both fail as ``Unavailable`` / 503 within ``vault_timeout`` and nothing
is recorded (no certificate row, the join token not spent); once it is back, the same context,
never rebuilt, issues again under the same CA.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.certs import CertStatus, get_certificate, revoke_certificate
from ca.clock import FixedClock
from ca.config import Context, build_context
from ca.errors import Unavailable
from ca.grants import join_grant
from ca.issue import issue_svid
from ca.keys import KeyType
from ca.keys.vault import VaultAuth, VaultConnection, VaultKeyBackend
from ca.revocation import RevocationReason
from ca.serial import Serial
from tests.api.restkit import assert_problem, bearer
from tests.ca.svidkit import add_entry, count_rows, join_secret, make_csr, new_key, uses_remaining
from tests.conftest import TRUST_DOMAIN
from tests.vault.conftest import close, vault_settings
from tests.vault.openbao import OpenBao

TIMEOUT = 2.0  # vault_timeout for this test: the bound every failure must come back within
SLACK = 2.0  # process scheduling, the lookup before a retry, the REST round trip


@pytest.fixture
def outage_ctx(persistent_openbao: OpenBao, tmp_path: Path, clock: FixedClock) -> Iterator[Context]:
    settings = vault_settings(tmp_path, persistent_openbao, vault_timeout=TIMEOUT)
    # The file backend's check() wants its directory even when every key is in Vault; without
    # it /readyz is 503 on a Vault-only instance whatever Vault does (reported, not ours to fix).
    (settings.data_dir / "keys").mkdir(parents=True, mode=0o700)
    ctx = build_context(settings, clock=clock)
    init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
    yield ctx
    close(ctx)


class Attempt:
    """One workload asking for an SVID: a fresh entry, join token and CSR."""

    def __init__(self, ctx: Context, client: TestClient, label: str) -> None:
        self.ctx, self.client = ctx, client
        self.spiffe_id = f"spiffe://{TRUST_DOMAIN.name}/{label}"
        self.token_id, self.secret = join_secret(ctx, add_entry(ctx, self.spiffe_id))
        self.csr = make_csr(new_key(KeyType.EC_P256), uris=[self.spiffe_id])

    def fails(self, reason: str) -> None:
        rows = count_rows(self.ctx, "certificate")
        started = time.monotonic()
        with pytest.raises(Unavailable, match=reason):
            issue_svid(self.ctx, join_grant(self.ctx, self.secret), self.csr)
        assert time.monotonic() - started < TIMEOUT + SLACK
        started = time.monotonic()
        response = self.client.post(
            "/v1/svid", json={"csr": self.csr.decode()}, headers=bearer(self.secret)
        )
        assert time.monotonic() - started < TIMEOUT + SLACK
        body = assert_problem(response, 503)
        assert reason.split(".*")[0] in body["detail"], body
        assert count_rows(self.ctx, "certificate") == rows  # nothing half-recorded
        assert uses_remaining(self.ctx, self.token_id) == 1  # the join token is not spent

    def succeeds(self) -> Serial:
        response = self.client.post(
            "/v1/svid", json={"csr": self.csr.decode()}, headers=bearer(self.secret)
        )
        assert response.status_code == 200, response.text
        bundle = active_issuer(self.ctx).bundle_pem.decode()
        assert response.json()["bundle"] == bundle  # the same CA as before the outage
        return Serial.parse(response.json()["serial"])


def test_issuance_fails_fast_while_vault_is_down_and_resumes_after(
    outage_ctx: Context, persistent_openbao: OpenBao
) -> None:
    server = persistent_openbao
    client = TestClient(create_app(outage_ctx), raise_server_exceptions=False)
    before = Attempt(outage_ctx, client, "before").succeeds()

    hung = Attempt(outage_ctx, client, "hung")
    server.pause()  # accepts connections, answers nothing
    try:
        hung.fails(f"did not answer POST transit/sign/.* within {TIMEOUT:g} s")
    finally:
        server.resume()

    stopped = Attempt(outage_ctx, client, "stopped")
    server.stop()
    stopped.fails("cannot reach Vault at .*: connection refused")
    # A revocation re-signs the CRL in its own transaction: no signature, no revocation.
    with pytest.raises(Unavailable, match="connection refused"):
        revoke_certificate(outage_ctx, before, RevocationReason.KEY_COMPROMISE, "test")
    assert get_certificate(outage_ctx, before).status is CertStatus.ACTIVE
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and "Vault" in not_ready.json()["detail"]["keys"]

    server.start_sealed()
    stopped.fails("is sealed: unseal it")
    backend = outage_ctx.keys.backend("vault")
    assert isinstance(backend, VaultKeyBackend)
    connectivity = backend.diagnose().items[0]
    assert connectivity.name == "connectivity" and not connectivity.ok
    assert "sealed" in connectivity.detail

    server.unseal()
    # The very requests that failed now succeed, with the context built before the outage.
    hung.succeeds()
    stopped.succeeds()
    revoke_certificate(outage_ctx, before, RevocationReason.KEY_COMPROMISE, "test")
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_a_vault_that_accepts_no_connection_fails_at_the_deadline_saying_so() -> None:
    """A paused Vault whose listen queue is full lets no connection through (the second
    request to a hung server): the connect wait, capped at 5 s, used to end the call then,
    half a 10 s deadline unused, with a message that claimed the whole deadline. It now waits
    for the deadline, and the message says how long it waited."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    queued: list[socket.socket] = []
    try:
        while True:  # fill the listen queue: the next connect gets no answer at all
            client = socket.socket()
            client.settimeout(0.3)
            try:
                client.connect(listener.getsockname())
            except OSError:
                client.close()
                break
            queued.append(client)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        connection = VaultConnection(address, VaultAuth(token="t"), timeout=6.0)
        started = time.monotonic()
        with pytest.raises(Unavailable) as failure:
            connection.call("GET", "auth/token/lookup-self")
        waited = time.monotonic() - started
        connection.close()
    finally:
        for client in queued:
            client.close()
        listener.close()
    assert 5.9 <= waited < 6.0 + SLACK
    assert failure.value.detail == (
        f"Vault at {address} did not answer GET auth/token/lookup-self within 6 s"
    )
