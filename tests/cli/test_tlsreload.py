"""``cli.tlsreload.ReloadingConfig``: a worker that starts while the serving certificate is being
renewed (the key written, the certificate not yet) waits for the pair instead of exiting."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from cli.tlsreload import ReloadingConfig, ServingTlsUnusable
from tests.tlsfiles import loopback_server_tls


async def app(scope: object, receive: object, send: object) -> None:
    """The ASGI app is irrelevant here: only the TLS part of ``load`` is under test."""


def config(cert: Path, key: Path) -> ReloadingConfig:
    return ReloadingConfig(app, ssl_certfile=str(cert), ssl_keyfile=str(key), log_config=None)


def test_a_mismatched_pair_is_waited_for_until_the_certificate_catches_up(tmp_path: Path) -> None:
    _, old_cert, _ = loopback_server_tls(tmp_path / "old")
    _, new_cert, new_key = loopback_server_tls(tmp_path / "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    key.write_bytes(new_key.read_bytes())  # the renewal wrote the new key...
    cert.write_bytes(old_cert.read_bytes())  # ...and not yet the new certificate
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)

    writer = threading.Timer(0.3, lambda: cert.write_bytes(new_cert.read_bytes()))
    writer.start()
    loaded = config(cert, key)
    loaded.load()
    writer.join()
    assert loaded.loaded and loaded.ssl is not None


def test_a_pair_that_never_matches_still_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cli.tlsreload.LOAD_ATTEMPTS", 3)
    _, old_cert, _ = loopback_server_tls(tmp_path / "old")
    _, _, new_key = loopback_server_tls(tmp_path / "new")
    with pytest.raises(ServingTlsUnusable) as failed:
        config(old_cert, new_key).load()
    assert failed.value.detail == (
        f"cannot load the serving certificate: the key {new_key} does not match the"
        f" certificate {old_cert}"
    )


def test_a_key_that_is_not_there_is_named(tmp_path: Path) -> None:
    """ssl said "No such file or directory", naming neither file: a single 'trellis serve'
    printed it as its one line, and a worker of 'serve --workers N' died of it again and
    again (cli.supervisor)."""
    _, cert, key = loopback_server_tls(tmp_path)
    key.unlink()
    with pytest.raises(ServingTlsUnusable) as failed:
        config(cert, key).load()
    assert failed.value.detail == (
        f"cannot load the serving certificate: {key}: No such file or directory"
    )


class Handshakes:
    """A loopback TLS server on ``context``: each connection is one handshake, then closed."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            with (
                connection,
                contextlib.suppress(OSError),
                self.context.wrap_socket(connection, server_side=True) as tls,
            ):
                tls.recv(1)

    def peer(self, ca: Path) -> x509.Certificate:
        """The certificate the server presents to a client trusting ``ca``."""
        client = ssl.create_default_context(cafile=str(ca))
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def close(self) -> None:
        self.listener.close()


def _changed(path: Path, content: bytes) -> None:
    """``content`` written as a renewal writes it (a rename), with a new modification time."""
    staged = path.with_suffix(".tmp")
    staged.write_bytes(content)
    later = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(staged, ns=(later, later))
    staged.replace(path)


def test_a_mismatched_certificate_on_disk_leaves_the_old_pair_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher loaded a changed certificate into the live context itself: one that did not
    match the key left the context with no usable key, and every handshake failed until a new
    pair was issued (docs/operations.md: "the old pair goes on serving")."""
    monkeypatch.setattr("cli.tlsreload.WATCH_SECONDS", 0.05)
    monkeypatch.setattr("cli.tlsreload.LOAD_ATTEMPTS", 3)
    ca, served_cert, served_key = loopback_server_tls(tmp_path / "served")
    other_ca, other_cert, other_key = loopback_server_tls(tmp_path / "other", ca_name="other CA")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(served_cert.read_bytes())
    key.write_bytes(served_key.read_bytes())
    old = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    loaded = config(cert, key)
    loaded.load()
    assert loaded.ssl is not None
    server = Handshakes(loaded.ssl)
    try:
        assert server.peer(ca) == old
        with caplog.at_level(logging.WARNING, logger="trellis.serve"):
            _changed(cert, other_cert.read_bytes())
            deadline = time.monotonic() + 5
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.02)
        assert [r.getMessage() for r in caplog.records] == [
            "cannot reload the serving certificate: the key"
            f" {key} does not match the certificate {cert}"
        ]
        time.sleep(0.2)  # more rounds of the watcher: the same change is not tried again
        assert len(caplog.records) == 1
        assert server.peer(ca) == old

        # The next write, the key that goes with it (as an operator's fix), loads the pair.
        _changed(key, other_key.read_bytes())
        new = x509.load_pem_x509_certificates(other_cert.read_bytes())[0]
        either = tmp_path / "either.pem"
        either.write_bytes(ca.read_bytes() + other_ca.read_bytes())
        deadline = time.monotonic() + 5
        while server.peer(either) != new:
            assert time.monotonic() < deadline, "the good pair was not loaded"
            time.sleep(0.02)
    finally:
        server.close()


def _client(ca: Path, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    client = ssl.create_default_context(cafile=str(ca))
    client.minimum_version = client.maximum_version = version
    if ciphers is not None:
        client.set_ciphers(ciphers)
    return client


def _handshake(port: int, client: ssl.SSLContext) -> tuple[str, str, int]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
    assert cipher is not None
    return cipher


@pytest.mark.parametrize(
    ("version", "ciphers", "agreed"),
    [
        (ssl.TLSVersion.TLSv1_3, None, "TLS_AES_256_GCM_SHA384"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        (
            ssl.TLSVersion.TLSv1_2,
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256", None),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384", None),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA", None),
    ],
    ids=[
        "ok/tls1.3",
        "ok/tls1.2/aes-gcm",
        "ok/tls1.2/chacha20-poly1305",
        "refused/tls1.2/aes128-cbc-sha256",
        "refused/tls1.2/aes256-cbc-sha384",
        "refused/tls1.2/aes128-cbc-sha1",
    ],
)
def test_tls_1_2_offers_only_aead_suites(
    tmp_path: Path, version: ssl.TLSVersion, ciphers: str | None, agreed: str | None
) -> None:
    """Mozilla's "intermediate" configuration and RFC 9325 §4.2: TLS 1.2 with forward-secret
    AEAD suites only. uvicorn's default ("TLSv1") accepted the CBC ones, which sslyze listed."""
    ca, cert, key = loopback_server_tls(tmp_path)
    loaded = config(cert, key)
    loaded.load()
    assert loaded.ssl is not None
    assert loaded.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
    server = Handshakes(loaded.ssl)
    try:
        client = _client(ca, version, ciphers)
        if agreed is None:
            with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
                _handshake(server.port, client)
        else:
            assert _handshake(server.port, client)[0] == agreed
    finally:
        server.close()
