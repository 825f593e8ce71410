"""The key-backend protocol every CA key store implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.keys.types import KeyType, PrivateKey, PublicKey

__all__ = ["KeyBackend", "KeyHandle", "Signer"]


@dataclass(frozen=True, slots=True)
class KeyHandle:
    """Where a CA key lives: the backend's name and its own opaque reference."""

    backend: str
    ref: str
    key_type: KeyType


@dataclass(frozen=True, slots=True)
class Signer:
    """A usable CA key. ``private_key`` may be a forwarding subclass (see ``ca.keys``)."""

    handle: KeyHandle
    private_key: PrivateKey

    @property
    def hash_algorithm(self) -> hashes.SHA256 | hashes.SHA384 | None:
        return self.handle.key_type.signature_hash()

    def public_key(self) -> PublicKey:
        return self.private_key.public_key()


class KeyBackend(Protocol):
    """Creates, loads and destroys CA keys. Keys never leave a backend except as ``Signer``s."""

    name: str

    def create(self, key_type: KeyType, label: str) -> KeyHandle:
        """Make a new key. ``label`` is a human hint for naming (e.g. ``mesh-root``)."""
        ...

    def load(self, handle: KeyHandle) -> Signer:
        """Unlock a key for signing; raises ``NotFound`` or ``Unavailable``."""
        ...

    def destroy(self, handle: KeyHandle) -> None:
        """Remove a key no CA records (so a failed init leaves no orphan). A backend that may
        not delete keys (Vault under the shipped policy) leaves it, with one warning naming it
        and how to delete it, and raises nothing: the operation that cleans up reports its own
        outcome."""
        ...

    def check(self, keys: Sequence[tuple[KeyHandle, CertificatePublicKeyTypes]] = ()) -> None:
        """Raise ``Unavailable`` if the backend cannot sign right now with each of ``keys`` (a
        handle and its CA certificate's public key), for ``/readyz``: cheaply, signing nothing.
        Each key must still exist and be usable; a backend that can tell a key's public half
        without unlocking it also checks that it is still the certificate's."""
        ...
