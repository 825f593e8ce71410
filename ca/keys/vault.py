"""Vault / OpenBao Transit key backend (placeholder until the Vault issue lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ca.errors import Unavailable
from ca.keys.backend import KeyHandle, Signer
from ca.keys.types import KeyType

if TYPE_CHECKING:
    from ca.config import Settings

__all__ = ["VaultKeyBackend"]


class VaultKeyBackend:
    name = "vault"

    def create(self, key_type: KeyType, label: str) -> KeyHandle:
        raise Unavailable("the vault key backend is not available in this version")

    def load(self, handle: KeyHandle) -> Signer:
        raise Unavailable("the vault key backend is not available in this version")

    def destroy(self, handle: KeyHandle) -> None:
        raise Unavailable("the vault key backend is not available in this version")

    def check(self) -> None:
        raise Unavailable("the vault key backend is not available in this version")

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultKeyBackend:
        raise Unavailable("the vault key backend is not available in this version")
