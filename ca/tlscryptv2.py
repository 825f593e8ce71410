"""OpenVPN control-channel keys: tls-crypt-v2 server and client keys, and tls-crypt static keys.

tls-crypt-v2 (OpenVPN ``doc/tls-crypt-v2.txt``, checked byte for byte against the keys
``openvpn --genkey tls-crypt-v2-server`` / ``tls-crypt-v2-client`` writes):

    server key  128 bytes = struct key {cipher[64], hmac[64]}:
                Ke = bytes 0..31 (AES-256-CTR), Ka = bytes 64..95 (HMAC-SHA256)
    client key  Kc (256 random bytes) || WKc
    WKc         T || AES-256-CTR(Ke, IV = T[0:16], Kc || metadata) || len
    len         uint16 big-endian: the length of all of WKc (32 + 256 + len(metadata) + 2)
    T           HMAC-SHA256(Ka, len || Kc || metadata)
    metadata    type byte || payload: 0x01 TIMESTAMP (8-byte big-endian unix time, what openvpn
                writes by default) or 0x00 USER (free-form); at most 734 bytes with the type byte

Both are PEM-armoured with ``-----BEGIN OpenVPN tls-crypt-v2 server key-----`` /
``... client key-----`` and base64 lines of 64 characters. Only ``cryptography`` is used.

The server key and the shared static key are held like CA keys (``SecretVault``): in the
authority's key backend when it can hold raw secrets (the Vault backend's KV v2 store), otherwise
sealed in a 0600 file under ``<data dir>/secrets``, encrypted with the passphrase the file key
backend uses (``TRELLIS_KEY_PASSPHRASE`` or the generated ``key-passphrase`` file, read when a
secret is first sealed or opened: ``ca.keys.file.KeyPassphrase``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hmac
import logging
import os
import re
import secrets
import struct
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ca.config import Context
from ca.errors import InvalidInput, NotFound, Unavailable
from ca.files import private_file, write_private

__all__ = [
    "CLIENT_KEY_LEN",
    "MAX_METADATA_LEN",
    "SERVER_KEY_LEN",
    "STATIC_KEY_LEN",
    "ClientKey",
    "Metadata",
    "MetadataType",
    "SecretVault",
    "ServerKey",
    "StaticKey",
    "Unwrapped",
    "new_client_key",
    "unwrap_client_key",
    "wrap_client_key",
]

log = logging.getLogger("trellis.openvpn")

SERVER_KEY_LEN = 128
CLIENT_KEY_LEN = 256
TAG_LEN = 32
MAX_WKC_LEN = 1024
MAX_METADATA_LEN = MAX_WKC_LEN - (CLIENT_KEY_LEN + TAG_LEN + 2)  # 734, type byte included
STATIC_KEY_LEN = 256

_SERVER_LABEL = "OpenVPN tls-crypt-v2 server key"
_CLIENT_LABEL = "OpenVPN tls-crypt-v2 client key"
_STATIC_LABEL = "OpenVPN Static key V1"


class MetadataType(enum.IntEnum):
    USER = 0x00
    TIMESTAMP = 0x01


@dataclass(frozen=True, slots=True)
class Metadata:
    """What a server learns from a client key before any TLS: a timestamp or user data."""

    type: MetadataType
    payload: bytes

    def __post_init__(self) -> None:
        if 1 + len(self.payload) > MAX_METADATA_LEN:
            raise InvalidInput(f"tls-crypt-v2 metadata is at most {MAX_METADATA_LEN - 1} bytes")
        if self.type is MetadataType.TIMESTAMP and len(self.payload) != 8:
            raise InvalidInput("tls-crypt-v2 timestamp metadata is 8 bytes")

    @classmethod
    def timestamp(cls, when: dt.datetime) -> Metadata:
        return cls(MetadataType.TIMESTAMP, struct.pack(">Q", int(when.timestamp())))

    @classmethod
    def user(cls, data: bytes) -> Metadata:
        return cls(MetadataType.USER, data)

    @classmethod
    def parse(cls, raw: bytes) -> Metadata:
        if not raw:
            raise InvalidInput("tls-crypt-v2 metadata is empty")
        try:
            kind = MetadataType(raw[0])
        except ValueError:
            # openvpn itself only writes these two; other type bytes are kept as user data
            # would be, but we refuse to guess what they mean.
            raise InvalidInput(f"unknown tls-crypt-v2 metadata type {raw[0]:#04x}") from None
        return cls(kind, raw[1:])

    @property
    def raw(self) -> bytes:
        return bytes([self.type]) + self.payload

    @property
    def created_at(self) -> dt.datetime | None:
        if self.type is not MetadataType.TIMESTAMP:
            return None
        return dt.datetime.fromtimestamp(struct.unpack(">Q", self.payload)[0], dt.UTC)


def _armour(label: str, data: bytes) -> bytes:
    text = base64.b64encode(data).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


def _unarmour(label: str, pem: bytes | str) -> bytes:
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    match = re.search(
        rf"-----BEGIN {re.escape(label)}-----\s*(.*?)\s*-----END {re.escape(label)}-----",
        text,
        re.S,
    )
    if match is None:
        raise InvalidInput(f"not a PEM '{label}'")
    try:
        return base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"the '{label}' is not valid base64") from None


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return cipher.update(data) + cipher.finalize()


@dataclass(frozen=True, slots=True)
class ServerKey:
    """The tls-crypt-v2 server key every server of a deployment shares."""

    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != SERVER_KEY_LEN:
            raise InvalidInput(f"a tls-crypt-v2 server key is {SERVER_KEY_LEN} bytes")

    @classmethod
    def generate(cls) -> ServerKey:
        return cls(os.urandom(SERVER_KEY_LEN))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> ServerKey:
        return cls(_unarmour(_SERVER_LABEL, pem))

    @property
    def pem(self) -> bytes:
        return _armour(_SERVER_LABEL, self.raw)

    @property
    def encryption_key(self) -> bytes:  # Ke: the first 256 bits of the cipher half
        return self.raw[0:32]

    @property
    def authentication_key(self) -> bytes:  # Ka: the first 256 bits of the HMAC half
        return self.raw[64:96]


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A client's tls-crypt-v2 key: its own ``Kc`` and ``WKc``, the copy only servers can read."""

    kc: bytes = field(repr=False)
    wkc: bytes

    def __post_init__(self) -> None:
        if len(self.kc) != CLIENT_KEY_LEN:
            raise InvalidInput(f"a tls-crypt-v2 client key starts with {CLIENT_KEY_LEN} bytes")
        if not TAG_LEN + CLIENT_KEY_LEN + 1 + 2 <= len(self.wkc) <= MAX_WKC_LEN:
            raise InvalidInput("the wrapped tls-crypt-v2 client key has an impossible length")

    @classmethod
    def from_pem(cls, pem: bytes | str) -> ClientKey:
        raw = _unarmour(_CLIENT_LABEL, pem)
        return cls(raw[:CLIENT_KEY_LEN], raw[CLIENT_KEY_LEN:])

    @property
    def pem(self) -> bytes:
        return _armour(_CLIENT_LABEL, self.kc + self.wkc)


def wrap_client_key(server: ServerKey, kc: bytes, metadata: Metadata) -> ClientKey:
    """``WKc = T || AES-256-CTR(Ke, T[0:16], Kc || metadata) || len`` (doc/tls-crypt-v2.txt)."""
    if len(kc) != CLIENT_KEY_LEN:
        raise InvalidInput(f"Kc is {CLIENT_KEY_LEN} bytes")
    plaintext = kc + metadata.raw
    length = struct.pack(">H", TAG_LEN + len(plaintext) + 2)
    tag = hmac.new(server.authentication_key, length + plaintext, sha256).digest()
    wkc = tag + _ctr(server.encryption_key, tag[:16], plaintext) + length
    return ClientKey(kc, wkc)


def new_client_key(server: ServerKey, metadata: Metadata) -> ClientKey:
    return wrap_client_key(server, os.urandom(CLIENT_KEY_LEN), metadata)


@dataclass(frozen=True, slots=True)
class Unwrapped:
    kc: bytes = field(repr=False)
    metadata: Metadata


def unwrap_client_key(server: ServerKey, key: ClientKey) -> Unwrapped:
    """What an OpenVPN server does with the WKc a client sends: check the length field, decrypt,
    verify the tag in constant time, and check the Kc inside is the client's."""
    wkc = key.wkc
    (length,) = struct.unpack(">H", wkc[-2:])
    if length != len(wkc):
        raise InvalidInput("the WKc length field does not match its size")
    tag, ciphertext = wkc[:TAG_LEN], wkc[TAG_LEN:-2]
    plaintext = _ctr(server.encryption_key, tag[:16], ciphertext)
    expected = hmac.new(server.authentication_key, wkc[-2:] + plaintext, sha256).digest()
    if not hmac.compare_digest(expected, tag):
        raise InvalidInput("the WKc tag does not verify: another server key, or altered")
    if not hmac.compare_digest(plaintext[:CLIENT_KEY_LEN], key.kc):
        raise InvalidInput("the wrapped Kc is not the client's Kc")
    return Unwrapped(plaintext[:CLIENT_KEY_LEN], Metadata.parse(plaintext[CLIENT_KEY_LEN:]))


@dataclass(frozen=True, slots=True)
class StaticKey:
    """A 2048-bit ``tls-crypt`` (or ``tls-auth``) static key, shared by a server and all its
    ``--tls-crypt shared`` clients: the format ``openvpn --genkey tls-crypt`` writes."""

    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != STATIC_KEY_LEN:
            raise InvalidInput(f"an OpenVPN static key is {STATIC_KEY_LEN} bytes")

    @classmethod
    def generate(cls) -> StaticKey:
        return cls(os.urandom(STATIC_KEY_LEN))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> StaticKey:
        text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
        match = re.search(
            rf"-----BEGIN {_STATIC_LABEL}-----\s*([0-9a-fA-F\s]*?)\s*-----END {_STATIC_LABEL}-----",
            text,
        )
        if match is None:
            raise InvalidInput(f"not an '{_STATIC_LABEL}'")
        return cls(bytes.fromhex("".join(match.group(1).split())))

    @property
    def pem(self) -> bytes:
        hexed = self.raw.hex()
        lines = [hexed[i : i + 32] for i in range(0, len(hexed), 32)]
        return "\n".join(
            [
                "#",
                "# 2048 bit OpenVPN static key",
                "#",
                f"-----BEGIN {_STATIC_LABEL}-----",
                *lines,
                f"-----END {_STATIC_LABEL}-----",
                "",
            ]
        ).encode()


# -- where the keys are held ----------------------------------------------------------------


@runtime_checkable
class _RawSecrets(Protocol):
    """A key backend that can also keep raw secrets (``ca.keys.vault.VaultKeyBackend``)."""

    def store_secret(self, path: str, data: bytes) -> None: ...

    def read_secret(self, path: str) -> bytes: ...


_SEALED = "TRELLIS SEALED SECRET"
_SEAL_VERSION = 1
_REF = re.compile(r"^[a-z0-9][a-z0-9/-]{0,200}$")


@dataclass(frozen=True, slots=True)
class SecretVault:
    """Keeps raw key material (not signing keys) beside an authority's CA keys.

    ``store`` is ``file`` (sealed files) or the name of a key backend that holds raw secrets.
    References are unique per secret, so replacing one (``init --force``) never overwrites the
    secret a running deployment still uses before the replacement has committed.
    """

    ctx: Context
    store: str

    @classmethod
    def for_backend(cls, ctx: Context, backend: str) -> SecretVault:
        if backend != "file" and isinstance(ctx.keys.backend(backend), _RawSecrets):
            return cls(ctx, backend)
        return cls(ctx, "file")

    def put(self, label: str, data: bytes) -> str:
        ref = f"{label}-{secrets.token_hex(6)}"
        if not _REF.fullmatch(ref):
            raise InvalidInput(f"invalid secret label {label[:40]!r}")
        if self.store == "file":
            write_private(self._path(ref), self._seal(ref, data))
        else:
            self._remote().store_secret(ref, data)
        return ref

    def get(self, ref: str, *, length: int) -> bytes:
        """The secret ``ref``, which is ``length`` bytes. Every secret is written by ``put``
        and referenced by a row of this server's database, so one that is missing, does not
        open, or is not ``length`` bytes (a sealed file emptied or truncated, a KV value written
        by hand) is this server's damage, never the caller's mistake: ``Unavailable`` (503,
        exit 8), before anything is issued with it. Where it was looked for goes to the log
        only, as for CA keys (``KeyStore.load``)."""
        cache_key = ("secret", self.store, ref)
        cached = self.ctx.cache.get(cache_key)
        if isinstance(cached, bytes):
            return cached
        try:
            if self.store == "file":
                data = self._open(ref, private_file(self._path(ref)).read_bytes())
            else:
                data = self._remote().read_secret(ref)
        except (FileNotFoundError, NotFound) as error:
            log.info("secret %s is missing: %s", ref, error)
            raise Unavailable(
                f"secret {ref} is missing from the {self.store} secret store"
            ) from None
        except OSError as error:  # a directory in its place, unreadable: not the caller's
            log.info("secret %s cannot be read: %s", ref, error)
            raise Unavailable(f"secret {ref} cannot be read: {error.strerror}") from None
        if len(data) != length:
            raise Unavailable(
                f"secret {ref} in the {self.store} secret store is {len(data)} bytes, not"
                f" {length}: it was not written by Trellis"
            )
        self.ctx.cache[cache_key] = data
        return data

    def destroy(self, ref: str) -> None:
        """Sealed files are removed; Vault KV versions are left for the operator to purge."""
        self.ctx.cache.pop(("secret", self.store, ref), None)
        if self.store == "file":
            self._path(ref).unlink(missing_ok=True)

    def _remote(self) -> _RawSecrets:
        backend = self.ctx.keys.backend(self.store)
        if not isinstance(backend, _RawSecrets):
            raise Unavailable(f"key backend {self.store!r} cannot hold secrets")
        return backend

    def _path(self, ref: str) -> Path:
        if not _REF.fullmatch(ref) or "/" in ref:
            raise InvalidInput(f"invalid secret reference {ref[:40]!r}")
        return self.ctx.settings.data_dir / "secrets" / f"{ref}.sealed"

    def _key(self, salt: bytes) -> bytes:
        passphrase = self.ctx.passphrase.get()
        return Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(passphrase)

    def _seal(self, ref: str, data: bytes) -> bytes:
        # The reference is bound as associated data: a sealed file renamed to stand in for
        # another secret does not open.
        salt, nonce = os.urandom(16), os.urandom(12)
        sealed = AESGCM(self._key(salt)).encrypt(nonce, data, ref.encode())
        return _armour(_SEALED, bytes([_SEAL_VERSION]) + salt + nonce + sealed)

    def _open(self, ref: str, pem: bytes) -> bytes:
        try:
            raw = _unarmour(_SEALED, pem)
        except InvalidInput:  # empty, truncated or overwritten: not what _seal wrote
            raw = b""
        if len(raw) < 1 + 16 + 12 + 16 or raw[0] != _SEAL_VERSION:
            raise Unavailable(f"secret {ref} is not a sealed Trellis secret (damaged)")
        salt, nonce, sealed = raw[1:17], raw[17:29], raw[29:]
        try:
            return AESGCM(self._key(salt)).decrypt(nonce, sealed, ref.encode())
        except InvalidTag:
            raise Unavailable(f"cannot decrypt secret {ref}: wrong key passphrase?") from None
