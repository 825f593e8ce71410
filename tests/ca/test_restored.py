"""``restored.json``: which keys outside the data dir a restored instance inherited, and the key
store leaving those alone (tests/vault/test_vault_cli.py runs the whole story on OpenBao)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from ca.keys import KeyHandle, KeyType
from ca.keys.backend import Signer
from ca.keys.store import KeyStore, SharedKeys
from ca.restored import MARKER, ActsOn, marker, shared_keys


class _Recording:
    """A backend that only records what it is asked to destroy."""

    def __init__(self) -> None:
        self.destroyed: list[str] = []

    def create(self, key_type: KeyType, label: str) -> KeyHandle:
        raise NotImplementedError

    def load(self, handle: KeyHandle) -> Signer:
        raise NotImplementedError

    def destroy(self, handle: KeyHandle) -> None:
        self.destroyed.append(handle.ref)

    def check(self, keys: Sequence[object] = ()) -> None:
        return None


def _handle(backend: str, ref: str) -> KeyHandle:
    return KeyHandle(backend, ref, KeyType.EC_P256)


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        pytest.param(None, set(), id="ok/not-restored"),
        pytest.param(
            marker(Path("b.tgz"), dt.datetime(2026, 1, 1, tzinfo=dt.UTC), ActsOn(("old@v1",))),
            {"old@v1"},
            id="ok/restored",
        ),
        pytest.param(b"{not json", {"old@v1", "new@v1"}, id="broken/every-key-kept"),
        pytest.param(
            b'{"inherited_vault_keys": "old@v1"}', {"old@v1", "new@v1"}, id="broken/shape"
        ),
    ],
)
def test_a_restored_instance_destroys_only_keys_outside_the_data_dir_it_made(
    content: bytes | None, kept: set[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if content is not None:
        (tmp_path / MARKER).write_bytes(content)
    vault, files = _Recording(), _Recording()
    store = KeyStore({"file": files, "vault": vault}, shared=shared_keys(tmp_path))  # type: ignore[dict-item]
    with caplog.at_level(logging.WARNING):
        for ref in ("old@v1", "new@v1"):
            store.destroy(_handle("vault", ref))
            store.destroy(_handle("file", ref))  # a key file is this instance's own copy
    assert files.destroyed == ["old@v1", "new@v1"]
    assert set(vault.destroyed) == {"old@v1", "new@v1"} - kept
    left = [r.getMessage() for r in caplog.records if "is left in place" in r.getMessage()]
    assert [message.split()[2] for message in left] == sorted(kept, reverse=True)


def test_shared_keys_are_never_file_keys() -> None:
    every = SharedKeys(every=True)
    assert _handle("vault", "x@v1") in every and _handle("file", "x") not in every
