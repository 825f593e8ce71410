"""Every configured key backend, by name. A CA row names the backend its key lives in, so an
instance can hold file-backed and Vault-backed authorities side by side."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.errors import InvalidInput, NotFound, Unavailable
from ca.keys.backend import KeyBackend, KeyHandle, Signer
from ca.keys.file import ON_EVERY_REPLICA, FileKeyBackend
from ca.keys.types import KeyType

__all__ = [
    "KNOWN_BACKENDS",
    "KeyStore",
    "SharedKeys",
    "check_backend_name",
    "unconfigured_backend",
]

log = logging.getLogger("trellis.keys")

# What a CA row or a request may name; whether each is configured is the server's business.
KNOWN_BACKENDS = ("file", "vault")


def check_backend_name(name: str) -> None:
    if name not in KNOWN_BACKENDS:
        raise InvalidInput(f"unknown key backend {name[:40]!r}: {' or '.join(KNOWN_BACKENDS)}")


def unconfigured_backend(name: str) -> InvalidInput:
    """An init asking for new keys in a backend this instance has no settings for: the
    operator's (or the REST caller's) mistake, which no retry mends, named with what to set."""
    if name == "vault":
        return InvalidInput(
            "the vault key backend needs TRELLIS_VAULT_ADDR and its auth settings"
            " (TRELLIS_VAULT_TOKEN, or TRELLIS_VAULT_AUTH_METHOD and its own: docs/vault.md)"
        )
    return InvalidInput(f"key backend {name!r} is not configured")


@dataclass(frozen=True, slots=True)
class SharedKeys:
    """Keys outside the data dir that another instance may sign with too: an instance restored
    from a backup inherited them from the one the backup was taken of (``ca.restored``). A key
    file is the instance's own copy and never shared."""

    refs: frozenset[str] = frozenset()
    every: bool = False  # which is not known: every key outside the data dir

    def __contains__(self, handle: object) -> bool:
        if not isinstance(handle, KeyHandle) or handle.backend == "file":
            return False
        return self.every or handle.ref in self.refs


class KeyStore:
    def __init__(
        self,
        backends: Mapping[str, KeyBackend],
        default: str = "file",
        shared: SharedKeys = SharedKeys(),
    ) -> None:
        if default not in backends:
            raise InvalidInput(f"key backend {default!r} is not configured")
        self._backends = dict(backends)
        self.default = default
        self.shared = shared

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

    def new_keys_backend(self, name: str | None = None) -> str:
        """The backend new CA keys go to (``name``, else the default), if it is configured.
        One that is not is the caller's choice to mend (400, exit 2), whereas ``backend`` finds
        an existing key's backend gone: this server's damage (503, exit 8)."""
        name = name or self.default
        check_backend_name(name)
        if name not in self._backends:
            raise unconfigured_backend(name)
        return name

    def create(self, key_type: KeyType, label: str, backend: str | None = None) -> KeyHandle:
        return self.backend(backend).create(key_type, label)

    def load(
        self, handle: KeyHandle, *, certified: CertificatePublicKeyTypes | None = None
    ) -> Signer:
        """Unlock a key the CA needs. ``certified``: the public key of the certificate the key
        signs as; a key that is not its private half (a Transit key deleted and re-created
        under its name, a key file from another instance) is refused here, before anything is
        signed with it, because its signatures would verify against itself and against no
        certificate. A missing key is this server's damage, not the caller's: ``Unavailable``
        (503, exit 8), and where it was looked for (a path on this server) goes to the log
        only."""
        backend = self.backend(handle.backend)
        try:
            signer = backend.load(handle)
        except NotFound as error:
            # INFO: a server logs it (the path is for its operators, not its clients); a CLI
            # command, which logs nothing below WARNING, says it once, in its error line.
            log.info("%s", error.detail)
            hint = f" ({ON_EVERY_REPLICA})" if isinstance(backend, FileKeyBackend) else ""
            raise Unavailable(
                f"CA key {handle.ref} is missing from the {handle.backend} key store{hint}"
            ) from None
        if certified is not None and signer.public_key() != certified:
            raise Unavailable(
                f"CA key {handle.ref} in the {handle.backend} key store is not the key of its CA "
                "certificate (replaced, or restored from another instance): nothing is signed "
                "with it"
            )
        return signer

    def destroy(self, handle: KeyHandle) -> None:
        """Destroy a key no CA of this instance uses any more, unless another instance may still
        sign with it (``shared``): that one is left, with a warning that says why and gives no
        command to delete it, since deleting it would take the other instance's CA away."""
        if handle in self.shared:
            log.warning(
                "%s key %s is left in place: this instance was restored from a backup, and the"
                " instance the backup was taken of may still sign with it; delete it only once"
                " no instance uses it",
                handle.backend,
                handle.ref,
            )
            return
        self.backend(handle.backend).destroy(handle)

    def check(self, keys: Sequence[tuple[KeyHandle, CertificatePublicKeyTypes]] = ()) -> None:
        """Every configured backend can sign now, each with the ``keys`` it holds (for
        ``/readyz``). Failures are ``Unavailable``, and name no path on this server."""
        for handle, _ in keys:
            self.backend(handle.backend)  # a key in a backend that is not configured
        for name, backend in self._backends.items():
            backend.check([key for key in keys if key[0].backend == name])
