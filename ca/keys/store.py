"""Every configured key backend, by name. A CA row names the backend its key lives in, so an
instance can hold file-backed and Vault-backed authorities side by side."""

from __future__ import annotations

from collections.abc import Mapping

from ca.errors import InvalidInput, Unavailable
from ca.keys.backend import KeyBackend, KeyHandle, Signer
from ca.keys.types import KeyType

__all__ = ["KNOWN_BACKENDS", "KeyStore", "check_backend_name"]

# What a CA row or a request may name; whether each is configured is the server's business.
KNOWN_BACKENDS = ("file", "vault")


def check_backend_name(name: str) -> None:
    if name not in KNOWN_BACKENDS:
        raise InvalidInput(f"unknown key backend {name[:40]!r}: {' or '.join(KNOWN_BACKENDS)}")


class KeyStore:
    def __init__(self, backends: Mapping[str, KeyBackend], default: str = "file") -> None:
        if default not in backends:
            raise InvalidInput(f"key backend {default!r} is not configured")
        self._backends = dict(backends)
        self.default = default

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._backends)

    def backend(self, name: str | None = None) -> KeyBackend:
        name = name or self.default
        try:
            return self._backends[name]
        except KeyError:
            check_backend_name(name)  # an unknown one is the caller's mistake, not our state
            hint = " (set TRELLIS_VAULT_ADDR and its auth settings)" if name == "vault" else ""
            raise Unavailable(f"key backend {name!r} is not configured{hint}") from None

    def create(self, key_type: KeyType, label: str, backend: str | None = None) -> KeyHandle:
        return self.backend(backend).create(key_type, label)

    def load(self, handle: KeyHandle) -> Signer:
        return self.backend(handle.backend).load(handle)

    def destroy(self, handle: KeyHandle) -> None:
        self.backend(handle.backend).destroy(handle)

    def check(self) -> None:
        for backend in self._backends.values():
            backend.check()
