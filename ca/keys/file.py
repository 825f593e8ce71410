"""CA keys as encrypted PKCS#8 files, mode 0600, under ``<data dir>/keys``.

The passphrase comes from ``TRELLIS_KEY_PASSPHRASE`` or, when unset, a generated 0600 file beside
the keys: good enough for a single node whose disk is protected, and the reason the Vault backend
exists for everyone else. It is read when a file key or a sealed secret is first used
(``KeyPassphrase``), so an instance whose keys all live in Vault runs without one.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.errors import InvalidInput, NotFound, Unavailable
from ca.files import data_directory, private_file, write_private
from ca.keys.backend import KeyHandle, Signer
from ca.keys.types import KeyType, PrivateKey

__all__ = ["ON_EVERY_REPLICA", "FileKeyBackend", "KeyPassphrase", "load_or_create_passphrase"]

# Said with every key file found missing: most often a key made at run time on another replica
# that keeps a key directory of its own (the next intermediate, prepared by the rotation job).
ON_EVERY_REPLICA = (
    "every replica needs every CA key file: docs/deploy.md#per-replica-key-directories-split-the-ca"
)

_REF = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")


MIN_PASSPHRASE = 12  # bytes


def load_or_create_passphrase(path: Path) -> bytes:
    """Read the key-encryption passphrase file, creating it (0600, 256 random bits) if absent.

    A file that is there but cannot be read, or holds no usable passphrase (emptied, cut
    short), is damage to this server's data, not a setting to correct: ``Unavailable`` (exit 8)
    naming the file. It is never replaced: a new passphrase would open none of the keys."""
    try:
        value = private_file(path).read_bytes().strip()
    except FileNotFoundError:
        value = secrets.token_urlsafe(32).encode()
        write_private(path, value + b"\n")
        return value
    except OSError as error:
        raise Unavailable(
            f"cannot read the key passphrase file {path}: {error.strerror}",
            public="the key passphrase file cannot be read",
        ) from None
    if len(value) < MIN_PASSPHRASE:
        raise Unavailable(
            f"the key passphrase file {path} is empty or shorter than {MIN_PASSPHRASE}"
            " characters: put back the passphrase the CA keys were encrypted with, or set"
            " TRELLIS_KEY_PASSPHRASE",
            public="the key passphrase file holds no usable passphrase",
        )
    return value


class KeyPassphrase:
    """The passphrase of the file key backend and of sealed secrets (``ca.tlscryptv2``), read
    when first needed and then kept for the process.

    Only what encrypts or decrypts with it asks for it: a file key created or loaded, a secret
    sealed or opened. An instance whose CA keys and secrets all live in Vault never does, and
    needs neither ``TRELLIS_KEY_PASSPHRASE`` nor a usable ``key-passphrase`` file. A failure
    (``Unavailable`` naming the file) is not kept: the next use reads the file again, so a
    passphrase put back is picked up without a restart.
    """

    def __init__(self, data_dir: Path, given: bytes | None = None) -> None:
        """``given``: ``TRELLIS_KEY_PASSPHRASE``, a setting, checked here (``InvalidInput``);
        without it, ``<data_dir>/key-passphrase``, generated when first needed if nothing
        encrypted with an earlier one is there."""
        if given is not None and len(given) < MIN_PASSPHRASE:
            raise InvalidInput(f"the key passphrase must be at least {MIN_PASSPHRASE} characters")
        self.file = data_dir / "key-passphrase"
        self._encrypted = (("CA keys", data_dir / "keys"), ("sealed secrets", data_dir / "secrets"))
        self._value = given
        self._lock = threading.Lock()  # one passphrase generated, even by concurrent first uses

    @classmethod
    def fixed(cls, value: bytes) -> KeyPassphrase:
        return cls(Path(), value)

    def get(self) -> bytes:
        with self._lock:
            if self._value is None:
                self._value = self._read()
            return self._value

    def check(self) -> None:
        """What ``get`` would refuse, refused now, without generating a missing file: the file
        backend's commands stop at their start on a passphrase that cannot be had, but one that
        writes no file key and seals nothing (``init --key-backend vault``, ``entry list``)
        leaves no ``key-passphrase`` behind, for nothing encrypted with it."""
        with self._lock:
            if self._value is None and self.file.exists():
                self._value = load_or_create_passphrase(self.file)
            elif self._value is None:
                self._refuse_over_encrypted()

    def _read(self) -> bytes:
        if not self.file.exists():
            self._refuse_over_encrypted()
        return load_or_create_passphrase(self.file)

    def _refuse_over_encrypted(self) -> None:
        for what, directory in self._encrypted:
            if directory.is_dir() and any(directory.iterdir()):
                # A new random passphrase would open none of them (a restored data dir).
                raise Unavailable(
                    f"the {what} in {directory} are encrypted, and {self.file} is missing:"
                    " put it back, or set TRELLIS_KEY_PASSPHRASE",
                    public=f"the {what} are encrypted, and the key passphrase file is missing",
                )


class FileKeyBackend:
    name = "file"

    def __init__(self, directory: Path, passphrase: KeyPassphrase | bytes) -> None:
        self._dir = directory
        self._passphrase = (
            passphrase if isinstance(passphrase, KeyPassphrase) else KeyPassphrase.fixed(passphrase)
        )
        # Created up front so readiness checks pass on instances whose keys all live in Vault.
        data_directory(directory)

    def _path(self, ref: str) -> Path:
        if not _REF.match(ref):
            raise InvalidInput(f"invalid key reference {ref[:40]!r}")
        return self._dir / f"{ref}.pem"

    def create(self, key_type: KeyType, label: str) -> KeyHandle:
        passphrase = self._passphrase.get()  # before an RSA key is made for nothing
        ref = f"{re.sub(r'[^a-z0-9-]', '-', label.lower())[:60]}-{secrets.token_hex(6)}"
        key = key_type.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        write_private(self._path(ref), pem)
        return KeyHandle(self.name, ref, key_type)

    def load(self, handle: KeyHandle) -> Signer:
        try:
            data = private_file(self._path(handle.ref)).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"CA key {handle.ref} is missing from {self._dir}",
                public=f"CA key {handle.ref} is missing from the file key store",
            ) from None
        passphrase = self._passphrase.get()
        try:
            key = serialization.load_pem_private_key(data, passphrase)
        except TypeError:
            # cryptography's answer for a key that is not encrypted. Trellis writes none, so
            # the file was replaced (by ``openssl genpkey``'s output, say): the same damage as
            # a foreign key, not a fault of this code.
            raise Unavailable(
                f"CA key {handle.ref} is not encrypted with the key passphrase, as Trellis"
                " writes its keys: the file was replaced"
            ) from None
        except ValueError:
            raise Unavailable(
                f"cannot decrypt CA key {handle.ref}: wrong key passphrase?"
            ) from None
        try:
            stored: KeyType | None = KeyType.of(key)  # type: ignore[arg-type]
        except InvalidInput:  # a key Trellis never writes (P-521, Ed448, DSA): replaced too
            stored = None
        if stored is not handle.key_type:
            raise Unavailable(f"CA key {handle.ref} is not of type {handle.key_type.value}")
        private: PrivateKey = key  # type: ignore[assignment]
        return Signer(handle, private)

    def destroy(self, handle: KeyHandle) -> None:
        self._path(handle.ref).unlink(missing_ok=True)

    def check(self, keys: Sequence[tuple[KeyHandle, CertificatePublicKeyTypes]] = ()) -> None:
        """A stat per key: whether a file is still its certificate's key takes decrypting it,
        which ``KeyStore.load`` does once per process."""
        if not os.access(self._dir, os.R_OK | os.X_OK):
            raise Unavailable("the file key store's directory is not readable")
        for handle, _public in keys:
            if not os.access(self._path(handle.ref), os.R_OK):
                raise Unavailable(
                    f"CA key {handle.ref} is missing from the file key store, or unreadable"
                    f" ({ON_EVERY_REPLICA})"
                )
