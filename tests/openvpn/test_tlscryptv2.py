"""tls-crypt-v2 keys (OpenVPN doc/tls-crypt-v2.txt): round trips, tampering, limits, and known
answers from keys the real ``openvpn --genkey`` wrote (stored in data/, and made afresh when the
binary is installed)."""

from __future__ import annotations

import base64
import datetime as dt
import struct
import subprocess
from pathlib import Path

import pytest

from ca.errors import InvalidInput
from ca.tlscryptv2 import (
    CLIENT_KEY_LEN,
    MAX_METADATA_LEN,
    ClientKey,
    Metadata,
    MetadataType,
    ServerKey,
    StaticKey,
    new_client_key,
    unwrap_client_key,
    wrap_client_key,
)
from tests.openvpn.vpnkit import DATA, openvpn_binary

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_round_trip_with_timestamp() -> None:
    server = ServerKey.generate()
    client = new_client_key(server, Metadata.timestamp(NOW))
    again = ClientKey.from_pem(client.pem)
    assert again == client
    unwrapped = unwrap_client_key(server, again)
    assert unwrapped.kc == client.kc
    assert unwrapped.metadata.type is MetadataType.TIMESTAMP
    assert unwrapped.metadata.created_at == NOW


def test_wkc_layout_and_length_field() -> None:
    """T (32) || ciphertext of Kc || metadata || len, len = uint16 BE of all of WKc."""
    server = ServerKey.generate()
    client = new_client_key(server, Metadata.timestamp(NOW))
    assert len(client.kc) == CLIENT_KEY_LEN
    assert len(client.wkc) == 32 + 256 + 9 + 2
    assert struct.unpack(">H", client.wkc[-2:])[0] == len(client.wkc)
    # the ciphertext really is encrypted: Kc does not appear in WKc
    assert client.kc[:32] not in client.wkc


def test_wrapping_is_deterministic_siv() -> None:
    """The IV is the tag: the same Kc and metadata under one server key give the same WKc."""
    server = ServerKey.generate()
    kc = bytes(range(256))
    first = wrap_client_key(server, kc, Metadata.user(b"x"))
    assert wrap_client_key(server, kc, Metadata.user(b"x")) == first
    assert wrap_client_key(server, kc, Metadata.user(b"y")).wkc != first.wkc


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda w: bytes([w[0] ^ 1]) + w[1:], id="tag"),
        pytest.param(lambda w: w[:40] + bytes([w[40] ^ 1]) + w[41:], id="ciphertext"),
        pytest.param(lambda w: w[:-2] + struct.pack(">H", len(w) - 1), id="length"),
    ],
)
def test_tampered_wkc_does_not_unwrap(mutate: object) -> None:
    server = ServerKey.generate()
    client = new_client_key(server, Metadata.timestamp(NOW))
    tampered = ClientKey(client.kc, mutate(client.wkc))  # type: ignore[operator]
    with pytest.raises(InvalidInput):
        unwrap_client_key(server, tampered)


def test_another_server_key_does_not_unwrap() -> None:
    client = new_client_key(ServerKey.generate(), Metadata.timestamp(NOW))
    with pytest.raises(InvalidInput, match="tag does not verify"):
        unwrap_client_key(ServerKey.generate(), client)


def test_metadata_limits() -> None:
    Metadata.user(b"a" * (MAX_METADATA_LEN - 1))
    with pytest.raises(InvalidInput):
        Metadata.user(b"a" * MAX_METADATA_LEN)
    with pytest.raises(InvalidInput):
        Metadata(MetadataType.TIMESTAMP, b"short")
    biggest = new_client_key(ServerKey.generate(), Metadata.user(b"a" * (MAX_METADATA_LEN - 1)))
    assert len(biggest.wkc) == 1024  # TLS_CRYPT_V2_MAX_WKC_LEN


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("nothing here", "not a PEM", id="no-armour"),
        pytest.param(
            "-----BEGIN OpenVPN tls-crypt-v2 server key-----\n!!!\n"
            "-----END OpenVPN tls-crypt-v2 server key-----\n",
            "base64",
            id="bad-base64",
        ),
        pytest.param(
            "-----BEGIN OpenVPN tls-crypt-v2 server key-----\nAAAA\n"
            "-----END OpenVPN tls-crypt-v2 server key-----\n",
            "128 bytes",
            id="short",
        ),
    ],
)
def test_bad_server_key_pem(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        ServerKey.from_pem(text)


# -- known answers from the real openvpn --------------------------------------------------------


def _check_known_answer(server_pem: bytes, client_pem: bytes) -> Metadata:
    """Unwrap openvpn's client key with openvpn's server key using our code; re-wrapping Kc with
    the metadata found must reproduce openvpn's file byte for byte (format and armour too)."""
    server = ServerKey.from_pem(server_pem)
    assert server.pem == server_pem
    client = ClientKey.from_pem(client_pem)
    unwrapped = unwrap_client_key(server, client)
    assert wrap_client_key(server, unwrapped.kc, unwrapped.metadata).pem == client_pem
    return unwrapped.metadata


def test_known_answer_stored_openvpn_keys() -> None:
    server = (DATA / "openvpn-server.key").read_bytes()
    stamped = _check_known_answer(server, (DATA / "openvpn-client-timestamp.key").read_bytes())
    assert stamped.type is MetadataType.TIMESTAMP
    assert stamped.created_at == dt.datetime(2026, 11, 26, 3, 7, 41, tzinfo=dt.UTC)
    user = _check_known_answer(server, (DATA / "openvpn-client-user.key").read_bytes())
    assert user == Metadata.user(b"serial=0a1b;ca=trellis")
    static = (DATA / "openvpn-tls-crypt.key").read_bytes()
    assert StaticKey.from_pem(static).pem == static


@pytest.mark.skipif(openvpn_binary() is None, reason="the openvpn binary is not installed")
def test_known_answer_fresh_openvpn_keys(tmp_path: Path) -> None:
    binary = openvpn_binary()
    assert binary is not None
    server_file = tmp_path / "server.key"

    def genkey(kind: str, name: str, *extra: str, wrap: bool = False) -> bytes:
        wrapping = ["--tls-crypt-v2", str(server_file)] if wrap else []
        out = tmp_path / name
        command = [binary, *wrapping, "--genkey", kind, str(out), *extra]
        subprocess.run(command, check=True, capture_output=True, timeout=20)
        return out.read_bytes()

    server = genkey("tls-crypt-v2-server", "server.key")
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    stamped = genkey("tls-crypt-v2-client", "stamped.key", wrap=True)
    created = _check_known_answer(server, stamped).created_at
    assert created is not None and abs(created - before) < dt.timedelta(seconds=30)
    user = base64.b64encode(b"user-data").decode()
    with_user = genkey("tls-crypt-v2-client", "user.key", user, wrap=True)
    assert _check_known_answer(server, with_user) == Metadata.user(b"user-data")
    shared = genkey("tls-crypt", "shared.key")
    assert StaticKey.from_pem(shared).pem == shared


@pytest.mark.skipif(openvpn_binary() is None, reason="the openvpn binary is not installed")
def test_openvpn_reads_our_client_key_back(tmp_path: Path) -> None:
    """openvpn loads a server key we made and wraps a client key with it that we unwrap; the
    handshake tests (test_real_openvpn.py) prove it accepts our client keys on the wire."""
    binary = openvpn_binary()
    assert binary is not None
    server = ServerKey.generate()
    (tmp_path / "s.key").write_bytes(server.pem)
    command = [binary, "--tls-crypt-v2", str(tmp_path / "s.key")]
    command += ["--genkey", "tls-crypt-v2-client", str(tmp_path / "c.key")]
    subprocess.run(command, check=True, capture_output=True, timeout=20)
    unwrapped = unwrap_client_key(server, ClientKey.from_pem((tmp_path / "c.key").read_bytes()))
    assert unwrapped.metadata.type is MetadataType.TIMESTAMP
