"""``cli.tlsreload.ReloadingConfig``: a worker that starts while the serving certificate is being
renewed (the key written, the certificate not yet) waits for the pair instead of exiting."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

import pytest

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
