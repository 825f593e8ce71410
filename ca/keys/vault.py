"""CA keys in Vault / OpenBao Transit, and the secrets Trellis hands out in KV v2 (docs/vault.md).

    VaultKeyBackend       the ``KeyBackend``: Transit keys (never exportable), each handle pinned
    │                     to one key version (``<name>@v<N>``); ``store_secret``/``read_secret``
    │                     (KV v2); ``diagnose`` (``trellis vault check``)
    ├── VaultConnection   one hvac client over one pooled requests session: login, renewal and
    │                     re-login, a deadline on every call, bounded retries, error mapping
    └── TransitEcKey, TransitRsaKey, TransitEd25519Key
                          cryptography private-key subclasses whose ``sign()`` calls
                          ``transit/sign``, so the certificate, CRL and OCSP builders use them as is

Every failure to reach or use Vault is ``Unavailable`` (HTTP 503, exit 8). Issuing code signs
before it writes, so an outage fails the request and records nothing.

Calls go through hvac's raw adapter rather than its helpers: the helpers validate arguments more
strictly than the server and take no per-call timeout, and one path keeps deadlines, retries,
re-login and error messages in a single place.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import shlex
import textwrap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Self
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding, PKCS1v15
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.utils import Buffer

from ca import metrics
from ca.csr import no_port_to_reach
from ca.errors import InternalError, InvalidInput, NotFound, TrellisError, Unavailable
from ca.keys.backend import KeyHandle, Signer
from ca.keys.types import KeyType, PrivateKey, PublicKey
from ca.redact import masked_url

if TYPE_CHECKING:
    import requests

    from ca.config import Settings

# hvac (and requests under it) is imported where a connection is made: every CLI command imports
# this module through the key backends, and most never talk to Vault.

__all__ = [
    "TRANSIT_TYPES",
    "CheckItem",
    "Requirement",
    "TransitEcKey",
    "TransitEd25519Key",
    "TransitRsaKey",
    "VaultAuth",
    "VaultConnection",
    "VaultKeyBackend",
    "VaultReport",
    "address_problem",
    "is_vault_path",
    "render_policy",
    "requirements",
]

TRANSIT_TYPES: dict[KeyType, str] = {
    KeyType.EC_P256: "ecdsa-p256",
    KeyType.EC_P384: "ecdsa-p384",
    KeyType.RSA_2048: "rsa-2048",
    KeyType.RSA_3072: "rsa-3072",
    KeyType.RSA_4096: "rsa-4096",
    KeyType.ED25519: "ed25519",
}
_HASH_NAMES = {
    "sha224": "sha2-224",
    "sha256": "sha2-256",
    "sha384": "sha2-384",
    "sha512": "sha2-512",
}
_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,127})(@v(?P<version>[1-9][0-9]{0,8}))?$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_CAPABILITY = {"GET": "read", "POST": "update", "PUT": "update", "DELETE": "delete"}
# 429: rate limited; 502-504: a standby without a leader, a restarting node, a proxy in front.
# Not 500: Vault answers it for what its engine refuses for good (Transit's "requested version
# for signing is less than the minimum encryption key version"), and asking again changes nothing.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_ATTEMPTS = 3
_BACKOFF = 0.1  # seconds, doubled per attempt, never past the call's deadline
AUTH_METHODS = ("token", "approle", "kubernetes")
log = logging.getLogger("trellis.keys")


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise Unavailable(f"cannot read the Vault {what} file {path}: {error.strerror}") from None
    except ValueError:  # not UTF-8
        raise Unavailable(f"the Vault {what} file {path} is not text") from None
    if not value:
        raise Unavailable(f"the Vault {what} file {path} is empty")
    return value


@dataclass(frozen=True, slots=True)
class VaultAuth:
    """How Trellis logs in. ``token``: a fixed token, or a file an agent keeps current (re-read
    whenever Vault rejects the token); ``approle`` and ``kubernetes``: a login that is repeated
    whenever the token can no longer be renewed or is rejected. Secret files are read at login
    time, so rotated secret IDs and projected service-account tokens are picked up."""

    method: str = "token"
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_file: Path | None = None
    kubernetes_role: str | None = None
    kubernetes_token_file: Path | None = None
    kubernetes_mount: str = "kubernetes"
    approle_mount: str = "approle"

    def __post_init__(self) -> None:
        needs = {
            "token": (
                "TRELLIS_VAULT_TOKEN or TRELLIS_VAULT_TOKEN_FILE",
                self.token or self.token_file,
            ),
            "approle": (
                "TRELLIS_VAULT_ROLE_ID and TRELLIS_VAULT_SECRET_ID_FILE",
                self.role_id and self.secret_id_file,
            ),
            "kubernetes": (
                "TRELLIS_VAULT_KUBERNETES_ROLE",
                self.kubernetes_role and self.kubernetes_token_file,
            ),
        }
        if self.token is not None and self.token_file is not None:
            # Which one is meant? The file used to win, silently.
            raise InvalidInput(
                "TRELLIS_VAULT_TOKEN and TRELLIS_VAULT_TOKEN_FILE are both set: give one"
            )
        for what, mount in (("Kubernetes", self.kubernetes_mount), ("AppRole", self.approle_mount)):
            _mount(mount, f"{what} auth")
        if self.method not in needs:
            raise InvalidInput(
                f"unknown Vault auth method {self.method[:32]!r}: use {', '.join(AUTH_METHODS)}"
            )
        what, present = needs[self.method]
        if not present:
            raise InvalidInput(f"Vault auth method {self.method} needs {what}")

    @property
    def renewable_by_login(self) -> bool:
        """Whether a rejected or expiring token can be replaced without an operator."""
        return self.method != "token" or self.token_file is not None

    def login_request(self) -> tuple[str, dict[str, str]] | None:
        """The login call for AppRole and Kubernetes; ``None`` for the token method."""
        if self.method == "approle":
            assert self.role_id is not None and self.secret_id_file is not None
            secret_id = _read_secret_file(self.secret_id_file, "AppRole secret ID")
            return f"auth/{self.approle_mount}/login", {
                "role_id": self.role_id,
                "secret_id": secret_id,
            }
        if self.method == "kubernetes":
            assert self.kubernetes_role is not None and self.kubernetes_token_file is not None
            jwt = _read_secret_file(self.kubernetes_token_file, "service-account token")
            return f"auth/{self.kubernetes_mount}/login", {"role": self.kubernetes_role, "jwt": jwt}
        return None

    def static_token(self) -> str:
        if self.token_file is not None:
            token = _read_secret_file(self.token_file, "token")
            # It goes into a header, which carries printable ASCII only (Vault's tokens are).
            if not (token.isascii() and token.isprintable() and " " not in token):
                raise Unavailable(f"the Vault token file {self.token_file} holds no Vault token")
            return token
        assert self.token is not None
        return self.token


class VaultConnection:
    """One authenticated, pooled connection to Vault, safe to share between threads.

    Every ``call`` finishes within ``timeout`` seconds, retries and re-login included, or raises
    ``Unavailable``. The token is renewed once half its TTL has passed and replaced by a new
    login when renewal is refused, falls short, or Vault stops accepting it.
    """

    def __init__(
        self,
        address: str,
        auth: VaultAuth,
        *,
        timeout: float = 10.0,
        ca_cert: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        namespace: str | None = None,
    ) -> None:
        # How messages and ``trellis vault check`` name it: a user:password@ in it masked.
        self.shown = masked_url(address.rstrip("/"))[0]
        problem = address_problem(address)
        if problem is not None:
            raise InvalidInput(f"Vault address {self.shown[:64]!r}: {problem}")
        if timeout <= 0:
            raise InvalidInput("the Vault timeout must be positive")
        if (client_cert is None) != (client_key is None):
            raise InvalidInput("a Vault client certificate needs its key, and the key its cert")
        if namespace and not is_vault_path(namespace):
            raise InvalidInput(f"invalid Vault namespace {namespace[:40]!r}")
        self.address = address.rstrip("/")
        self.timeout = timeout
        self.auth = auth
        # Sent by ``_send`` rather than by hvac, which puts it on every request: ``sys/health``
        # is a root-namespace path that OpenBao refuses inside a namespace.
        self.namespace = namespace or None
        import hvac

        # One hvac client, so one requests Session and one TLS connection pool for every call.
        self._client = hvac.Client(
            url=self.address,
            verify=str(ca_cert) if ca_cert else True,
            cert=(str(client_cert), str(client_key)) if client_cert and client_key else None,
            timeout=timeout,
            adapter=hvac.adapters.RawAdapter,
        )
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renewable = False
        self._login_ttl = 0.0
        self._renew_at: float | None = None

    def close(self) -> None:
        self._client.adapter.close()

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, object] | None = None,
        *,
        capability: str | None = None,
        authenticated: bool = True,
        missing_ok: bool = False,
        namespaced: bool = True,
    ) -> dict[str, Any]:
        """``method`` on ``/v1/<path>``: the decoded answer, or a ``TrellisError``.

        A 403 is either a dead token (expired, revoked: log in again and retry once) or a
        capability the policy lacks (``capability`` names it in the error; default by method).
        A 404 is ``NotFound`` only where the caller asks for a thing that may be absent
        (``missing_ok``: a key or secret by name); anywhere else it means the mount or namespace
        Trellis is configured with is not there, which is Vault's state, not the caller's
        mistake: ``Unavailable``.
        """
        status, data = self._answer(
            method, path, body, authenticated=authenticated, namespaced=namespaced
        )
        if status < 300:
            return data
        if status == 404 and missing_ok:
            raise NotFound(f"{path} does not exist in Vault at {self.shown}")
        raise self._failure(method, path, status, data, capability)

    def call_unless_denied(
        self, method: str, path: str, body: Mapping[str, object] | None = None
    ) -> dict[str, Any] | None:
        """``call``, except that the token's policy refusing the request (403 from a live token)
        is ``None`` instead of an error: for requests a policy may deny on purpose (the shipped
        one denies deleting keys, ``VaultKeyBackend.destroy``). Vault unreachable, sealed, or
        rejecting the token is still the error it is."""
        status, data = self._answer(method, path, body)
        if status < 300:
            return data
        if status == 403:
            return None
        raise self._failure(method, path, status, data, None)

    def _answer(
        self,
        method: str,
        path: str,
        body: Mapping[str, object] | None,
        *,
        authenticated: bool = True,
        namespaced: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON body), after one new login and retry if a 403 came from a dead token."""
        deadline = time.monotonic() + self.timeout
        if authenticated:
            self._ensure_token(deadline)
        token = self._token
        status, data = self._send(method, path, body, deadline, namespaced=namespaced)
        if status == 403 and authenticated and not self._token_alive(deadline):
            self._replace_dead_token(token, deadline)
            status, data = self._send(method, path, body, deadline, namespaced=namespaced)
        return status, data

    def permits(self, method: str, path: str, body: Mapping[str, object] | None = None) -> bool:
        """Whether Vault's ACL lets the token make this request: anything but a 403. Only for
        requests that change nothing when allowed (``diagnose`` asks them of a key that does
        not exist): Vault checks the policy, parameters included, before the engine runs."""
        deadline = time.monotonic() + self.timeout
        self._ensure_token(deadline)
        status, _ = self._send(method, path, body, deadline)
        return status != 403

    def token_info(self) -> dict[str, Any]:
        """``auth/token/lookup-self`` of the current token, logging in first if needed."""
        data: dict[str, Any] = self.call("GET", "auth/token/lookup-self").get("data") or {}
        return data

    def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, object] | None,
        deadline: float,
        *,
        namespaced: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        """One request with bounded retries and backoff: (status, JSON body) or ``Unavailable``."""
        import requests

        headers = {"X-Vault-Namespace": self.namespace} if self.namespace and namespaced else {}
        failure: TrellisError | None = None
        for attempt in range(_ATTEMPTS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                response = self._client.adapter.request(
                    method,
                    f"/v1/{path}",
                    json=body,
                    headers=headers,
                    raise_exception=False,
                    # Connect and read each get what is left: a connect timeout shorter than
                    # that gave up with time to spare, and a retry would ask the same address.
                    timeout=remaining,
                )
            except requests.Timeout:
                break  # the deadline is spent: a hanging Vault must not hang the caller
            except requests.RequestException as error:
                failure = Unavailable(f"cannot reach Vault at {self.shown}: {_reason(error)}")
            else:
                status, data = int(response.status_code), _json(response)
                if status not in _RETRY_STATUSES or attempt == _ATTEMPTS - 1:
                    return status, data
                failure = self._failure(method, path, status, data, None)
            time.sleep(max(0.0, min(_BACKOFF * 2**attempt, deadline - time.monotonic())))
        metrics.VAULT_ERRORS.labels(path.split("/", 1)[0]).inc()
        # Every deadline is the call's start plus ``timeout``: this is how long it waited.
        waited = round(time.monotonic() - (deadline - self.timeout), 1)
        raise failure or Unavailable(
            f"Vault at {self.shown} did not answer {method} {path} within {waited:g} s"
        )

    def _failure(
        self, method: str, path: str, status: int, data: dict[str, Any], capability: str | None
    ) -> TrellisError:
        reasons = "; ".join(" ".join(str(e).split()) for e in data.get("errors") or [] if e)
        metrics.VAULT_ERRORS.labels(path.split("/", 1)[0]).inc()
        if status == 404:
            where = f" (namespace {self.namespace})" if self.namespace else ""
            return Unavailable(
                f"{path} does not exist in Vault at {self.shown}{where}: is the mount or "
                "namespace Trellis is configured with there? (run 'trellis vault check')"
            )
        if status == 403:
            needed = capability or _CAPABILITY.get(method, method.lower())
            return Unavailable(
                f"Vault denied {needed!r} on {path}: the token's policy lacks that capability "
                "(run 'trellis vault check'; see deploy/vault/trellis-policy.hcl)"
            )
        if status == 503 and ("sealed" in reasons or data.get("sealed")):
            return Unavailable(f"Vault at {self.shown} is sealed: unseal it")
        if status == 501 and data.get("initialized") is False:
            return Unavailable(f"Vault at {self.shown} is not initialised")
        return Unavailable(
            f"Vault refused {method} {path} (HTTP {status}): {reasons or 'no reason given'}"
        )

    # -- tokens: login, renewal at half-life, re-login when the token dies ---------------

    def _ensure_token(self, deadline: float) -> None:
        with self._lock:
            if self._token is None:
                self._login(deadline)
            elif self._renew_at is not None and time.monotonic() >= self._renew_at:
                self._renew(deadline)

    def _use(self, token: str, ttl: float, renewable: bool, *, login: bool) -> None:
        self._token = token
        self._client.adapter.token = token
        self._renewable = renewable
        if login:
            self._login_ttl = ttl
        # Half-life, as Vault Agent does. A token without a TTL (root, periodic 0) needs nothing;
        # one that can be neither renewed nor replaced is left to expire.
        can_refresh = renewable or self.auth.renewable_by_login
        self._renew_at = time.monotonic() + ttl / 2 if ttl > 0 and can_refresh else None

    def _login(self, deadline: float) -> None:
        self._token = None
        request = self.auth.login_request()
        if request is None:
            token = self.auth.static_token()
            self._client.adapter.token = token
            status, data = self._send("GET", "auth/token/lookup-self", None, deadline)
            if status == 403:
                raise Unavailable(
                    f"Vault at {self.shown} rejected Trellis's token: it is expired, revoked or "
                    "mistyped (or its policy lacks 'read' on auth/token/lookup-self)"
                )
            if status >= 300:
                raise self._failure("GET", "auth/token/lookup-self", status, data, None)
            info = data.get("data") or {}
            self._use(token, float(info.get("ttl") or 0), bool(info.get("renewable")), login=True)
            return
        path, body = request
        self._client.adapter.token = None
        status, data = self._send("POST", path, body, deadline)
        auth = data.get("auth") or {}
        if status >= 300 or not auth.get("client_token"):
            reasons = "; ".join(str(e) for e in data.get("errors") or []) or f"HTTP {status}"
            raise Unavailable(f"Vault {self.auth.method} login at {path} failed: {reasons}")
        ttl, renewable = float(auth.get("lease_duration") or 0), bool(auth.get("renewable"))
        self._use(str(auth["client_token"]), ttl, renewable, login=True)

    def _renew(self, deadline: float) -> None:
        assert self._token is not None
        if self._renewable:
            status, data = self._send("POST", "auth/token/renew-self", {}, deadline)
            ttl = float((data.get("auth") or {}).get("lease_duration") or 0)
            # A renewal cut short by the token's max TTL: log in again while the token still works.
            if status < 300 and (ttl >= self._login_ttl / 2 or not self.auth.renewable_by_login):
                self._use(self._token, ttl, True, login=False)
                return
        if self.auth.renewable_by_login:
            self._login(deadline)
        else:
            self._renew_at = None

    def _token_alive(self, deadline: float) -> bool:
        status, _ = self._send("GET", "auth/token/lookup-self", None, deadline)
        return status != 403

    def _replace_dead_token(self, token: str | None, deadline: float) -> None:
        if not self.auth.renewable_by_login:
            raise Unavailable(
                f"Vault at {self.shown} no longer accepts Trellis's token (expired or revoked): "
                "configure a new one, or use TRELLIS_VAULT_TOKEN_FILE, AppRole or Kubernetes auth"
            )
        with self._lock:
            if self._token == token:  # unless another thread has logged in meanwhile
                self._login(deadline)


def _json(response: requests.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        value = response.json()
    except ValueError:
        return {"errors": [response.text[:200]]}
    return value if isinstance(value, dict) else {}


_REASONS = {
    "Connection refused": "connection refused",
    "Name or service not known": "unknown host name",
    "CERTIFICATE_VERIFY_FAILED": "certificate verify failed (is TRELLIS_VAULT_CA_CERT right?)",
    "certificate required": "Vault requires a client certificate (TRELLIS_VAULT_CLIENT_CERT)",
}


def _reason(error: requests.RequestException) -> str:
    import requests

    text = str(error)
    for marker, reason in _REASONS.items():
        if marker in text:
            return reason
    return (
        "TLS handshake failed"
        if isinstance(error, requests.exceptions.SSLError)
        else type(error).__name__
    )


# -- keys whose private half stays in Transit ------------------------------------------------


def _digest(data: Buffer, algorithm: object, name: str) -> tuple[bytes, str]:
    """Hash locally and send only the digest (``prehashed``): the TBS bytes never leave."""
    if not isinstance(algorithm, hashes.HashAlgorithm) or algorithm.name not in _HASH_NAMES:
        raise InternalError(f"Transit key {name} cannot sign with {algorithm!r}")
    digest = hashes.Hash(algorithm)
    digest.update(bytes(data))
    return digest.finalize(), _HASH_NAMES[algorithm.name]


class _Transit:
    """The one call a Transit-backed key makes: sign with a pinned version, then check it."""

    def __init__(self, connection: VaultConnection, mount: str) -> None:
        self.connection = connection
        self.mount = mount

    def sign(
        self, name: str, version: int, body: dict[str, object], check: Callable[[bytes], None]
    ) -> bytes:
        data = self.connection.call(
            "POST", f"{self.mount}/sign/{name}", {**body, "key_version": version}
        )
        value = str((data.get("data") or {}).get("signature", ""))
        prefix = f"vault:v{version}:"
        if not value.startswith(prefix):
            raise InternalError(f"Transit answered for another version of {name} than v{version}")
        signature = base64.b64decode(value[len(prefix) :])
        try:
            check(signature)  # never hand out a signature the CA certificate would not verify
        except InvalidSignature:
            # The pinned public key is the CA certificate's (``KeyStore.load``): Transit now
            # holds another key under this name. The key store is unusable, not Trellis wrong.
            raise Unavailable(
                f"Transit key {name}@v{version} returned a signature that does not verify "
                "against its CA certificate: the key was replaced in Transit"
            ) from None
        return signature


class _Pinned:
    """What every Transit-backed key shares: a name, a pinned version, nothing exportable.

    A base of the cryptography classes below, so its methods fill their abstract slots."""

    def __init__(self, transit: _Transit, name: str, version: int) -> None:
        self._transit, self._name, self._version = transit, name, version

    def _refuse(self, what: str) -> NoReturn:
        raise InternalError(
            f"CA key {self._name} lives in Vault Transit and is not exportable: "
            f"{what} is not available"
        )

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._refuse("private_bytes()")

    def private_numbers(self) -> NoReturn:
        self._refuse("private_numbers()")

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name}@v{self._version}>"


class TransitEcKey(_Pinned, ec.EllipticCurvePrivateKey):
    """ECDSA: the digest is signed, the signature comes back DER-encoded (``asn1``)."""

    def __init__(
        self, transit: _Transit, name: str, version: int, public: ec.EllipticCurvePublicKey
    ) -> None:
        super().__init__(transit, name, version)
        self._public = public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        algorithm = signature_algorithm.algorithm
        digest, hash_name = _digest(data, algorithm, self._name)
        body: dict[str, object] = {
            "input": base64.b64encode(digest).decode(),
            "prehashed": True,
            "hash_algorithm": hash_name,
            "marshaling_algorithm": "asn1",  # X.509 wants DER; Transit's other choice is JWS r||s
        }
        prehashed = ec.ECDSA(utils.Prehashed(algorithm))  # type: ignore[arg-type]
        return self._transit.sign(
            self._name,
            self._version,
            body,
            lambda signature: self._public.verify(signature, digest, prehashed),
        )

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._refuse("ECDH")


class TransitRsaKey(_Pinned, rsa.RSAPrivateKey):
    """RSA: PKCS#1 v1.5 over the digest, as X.509 uses (Transit's default would be PSS)."""

    def __init__(
        self, transit: _Transit, name: str, version: int, public: rsa.RSAPublicKey
    ) -> None:
        super().__init__(transit, name, version)
        self._public = public

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        if not isinstance(padding, PKCS1v15):
            raise InternalError(f"Transit key {self._name} signs with PKCS#1 v1.5 only")
        digest, hash_name = _digest(data, algorithm, self._name)
        body: dict[str, object] = {
            "input": base64.b64encode(digest).decode(),
            "prehashed": True,
            "hash_algorithm": hash_name,
            "signature_algorithm": "pkcs1v15",
        }
        prehashed = utils.Prehashed(algorithm)  # type: ignore[arg-type]
        return self._transit.sign(
            self._name,
            self._version,
            body,
            lambda signature: self._public.verify(signature, digest, PKCS1v15(), prehashed),
        )

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        self._refuse("decrypt()")


class TransitEd25519Key(_Pinned, ed25519.Ed25519PrivateKey):
    """Ed25519: pure EdDSA signs the message itself, so the whole input goes to Transit."""

    def __init__(
        self, transit: _Transit, name: str, version: int, public: ed25519.Ed25519PublicKey
    ) -> None:
        super().__init__(transit, name, version)
        self._public = public

    def sign(self, data: Buffer) -> bytes:
        message = bytes(data)
        return self._transit.sign(
            self._name,
            self._version,
            {"input": base64.b64encode(message).decode()},
            lambda signature: self._public.verify(signature, message),
        )

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def private_bytes_raw(self) -> bytes:
        self._refuse("private_bytes_raw()")


def _public_key(key_type: KeyType, text: object, name: str) -> PublicKey:
    try:
        if key_type is KeyType.ED25519:
            public: object = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(str(text)))
        else:
            public = serialization.load_pem_public_key(str(text).encode())
    except ValueError:
        raise Unavailable(f"Transit returned no usable public key for {name}") from None
    if not isinstance(public, PublicKey) or KeyType.of(public) is not key_type:
        raise Unavailable(f"Transit key {name} is not of type {key_type.value}")
    return public


# -- what Trellis needs from Vault: the policy and ``trellis vault check`` --------------------


Parameter = tuple[str, tuple[str | bool, ...]]
# What a create may ask for, and what config may never turn on (docs/vault.md, "The policy").
_KEY_PARAMETERS: tuple[Parameter, ...] = (
    ("type", tuple(TRANSIT_TYPES.values())),
    ("exportable", (False,)),
    ("allow_plaintext_backup", (False,)),
)


@dataclass(frozen=True, slots=True)
class Requirement:
    """Capabilities Trellis needs on one policy path, and why. ``allowed``: the request fields
    (and their values) the policy lets through there (``allowed_parameters``), where the path
    rule alone would grant more than Trellis needs."""

    path: str
    capabilities: tuple[str, ...]
    why: str
    allowed: tuple[Parameter, ...] = ()

    @property
    def probe(self) -> str:
        """A concrete path the glob covers, for ``sys/capabilities-self``."""
        return self.path.replace("*", "probe")


@dataclass(frozen=True, slots=True)
class CheckItem:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class VaultReport:
    address: str  # as shown: a password in it masked (``ca.redact``)
    items: tuple[CheckItem, ...]
    missing: tuple[Requirement, ...]  # only the capabilities that are missing
    policy: str  # the whole policy Trellis needs, as HCL

    @property
    def ok(self) -> bool:
        return all(item.ok for item in self.items) and not self.missing


def requirements(
    transit: str = "transit", kv: str = "secret", prefix: str = "trellis-", *, cleanup: bool = False
) -> tuple[Requirement, ...]:
    """What Trellis's token needs. ``cleanup``: the opt-in variant whose token may also delete
    Trellis's Transit keys, for Trellis to remove the ones it made and never recorded
    (deploy/vault/trellis-policy-cleanup.hcl); a policy cannot tell those from CA keys, so that
    token can destroy every CA key, and ``diagnose`` fails it (docs/vault.md, "The policy")."""
    base = prefix.rstrip("-_") or "trellis"
    keys_why = (
        "The trailing * also matches <key>/config, /trim, /rotate and /import_version, and a "
        "policy cannot take them out again (Vault applies only the most specific rule, and no "
        "rule is more specific for a key name of Trellis's choosing): the allowed parameters "
        "below are what keeps the token from making a key exportable, trimming or importing "
        "versions, or changing which versions may sign. A rotation (no parameters) stays "
        "possible and harms nothing: every CA pins its key version."
    )
    if cleanup:
        keys = Requirement(
            f"{transit}/keys/{prefix}*",
            ("create", "read", "update", "delete"),
            "OPT-IN VARIANT: as trellis-policy.hcl, and set deletion_allowed on and delete keys, "
            "so that Trellis removes keys no CA records (made by a failed init or rotation, or "
            "replaced by init --force). A policy cannot tell those from the CA keys: this token "
            "can destroy every CA key, and "
            "'trellis vault check' fails on it. " + keys_why,
            (*_KEY_PARAMETERS, ("deletion_allowed", (True,))),
        )
    else:
        keys = Requirement(
            f"{transit}/keys/{prefix}*",
            ("create", "read", "update"),
            "create CA keys (exportable=false; a create is an update to Transit) and read their "
            "public keys; never delete one (deletion_allowed can only be false): keys no CA "
            "records (made by a failed init or rotation, or replaced by init --force) are left "
            "for an operator to delete, and Trellis names them. " + keys_why,
            (*_KEY_PARAMETERS, ("deletion_allowed", (False,))),
        )
    return (
        keys,
        Requirement(
            f"{transit}/sign/{prefix}*",
            ("update",),
            "every certificate, CRL and OCSP signature",
        ),
        Requirement(
            f"{kv}/data/{base}/*",
            ("create", "read", "update"),
            "keys Trellis hands out (KV v2)",
        ),
        Requirement(
            "auth/token/lookup-self", ("read",), "check the token (also in the default policy)"
        ),
        Requirement(
            "auth/token/renew-self", ("update",), "renew the token (also in the default policy)"
        ),
        Requirement(
            "sys/capabilities-self",
            ("update",),
            "trellis vault check and /readyz (also in the default policy)",
        ),
    )


def render_policy(needed: tuple[Requirement, ...]) -> str:
    lines = [
        "# The Vault / OpenBao policy Trellis's key backend needs (docs/vault.md).",
        "# `trellis vault check` prints it for the configured mounts and key prefix.",
        "# Rotating a Transit key is an operator's job: Trellis pins key versions and never does.",
    ]
    for item in needed:
        capabilities = ", ".join(f'"{c}"' for c in item.capabilities)
        lines += [
            "",
            *(f"# {line}" for line in textwrap.wrap(item.why, 96)),
            f'path "{item.path}" {{',
            f"  capabilities = [{capabilities}]",
        ]
        if item.allowed:
            lines.append("  allowed_parameters = {")
            for name, values in item.allowed:
                lines.append(f'    "{name}" = [{", ".join(_hcl(v) for v in values)}]')
            lines.append("  }")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _hcl(value: str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"'


# What Trellis's token must not be able to do with its keys (docs/vault.md, "The policy"): each
# would let a CA key leave Vault or destroy versions a CA pins. ``diagnose`` asks each of a key
# that does not exist (``{key}``): Vault's ACL, allowed_parameters included, answers 403 before
# Transit looks the key up, and a request it lets through fails on the missing key, changing
# nothing. ``sys/capabilities-self`` cannot tell: it does not weigh allowed_parameters.
Forbidden = tuple[str, str, str, dict[str, object] | None]
# The right to destroy a CA key: the opt-in clean-up policy grants it (``requirements``), for
# keys Trellis never recorded, but no policy can keep it off the CA keys.
_DELETION: tuple[Forbidden, ...] = (
    ("set deletion_allowed on keys", "POST", "keys/{key}/config", {"deletion_allowed": True}),
    ("delete keys", "DELETE", "keys/{key}", None),
)
_FORBIDDEN: tuple[Forbidden, ...] = (
    ("make keys exportable", "POST", "keys/{key}/config", {"exportable": True}),
    ("allow plaintext backups", "POST", "keys/{key}/config", {"allow_plaintext_backup": True}),
    ("raise min_encryption_version", "POST", "keys/{key}/config", {"min_encryption_version": 9}),
    ("trim key versions", "POST", "keys/{key}/trim", {"min_available_version": 9}),
    ("import key versions", "POST", "keys/{key}/import_version", {"ciphertext": "AA=="}),
    ("export keys", "GET", "export/signing-key/{key}", None),
    ("back up keys", "GET", "backup/{key}", None),
    ("export wrapped keys (BYOK)", "GET", "byok-export/{key}/{key}", None),
    *_DELETION,
)
# Settings that let a Transit key's private half leave Vault: Trellis creates its keys with
# neither (docs/vault.md, "What lives where"), so one found set was set behind its back.
_LEAKY = ("exportable", "allow_plaintext_backup")


def _leaks(info: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(f"{flag}=true" for flag in _LEAKY if info.get(flag))


def _leak_message(ref: str, leaks: Sequence[str]) -> str:
    return (
        f"CA key {ref} is {' and '.join(leaks)} in Transit, which Trellis never sets: its "
        "private key may have left Vault; treat it as compromised and replace the CA "
        "(docs/vault.md)"
    )


def _exposure(ref: str, info: Mapping[str, Any], mount: str) -> str | None:
    """Why a recorded CA key's Transit settings put it at risk, if they do: one that may have
    left Vault, or one a single DELETE destroys (Trellis sets deletion_allowed only on keys no CA
    records, just before deleting them)."""
    if leaks := _leaks(info):
        return _leak_message(ref, leaks)
    if info.get("deletion_allowed"):
        name = ref.split("@", 1)[0]
        return (
            f"CA key {ref} is deletion_allowed=true in Transit, which Trellis sets only on keys "
            "no CA records: one request can destroy it and the CA with it; set it back "
            f"(vault write {mount}/keys/{name}/config deletion_allowed=false) and find "
            "who set it (docs/vault.md)"
        )
    return None


# -- the backend -----------------------------------------------------------------------------


def _parse_ref(ref: str) -> tuple[str, int | None]:
    """``<transit key name>@v<version>``; the version is only optional for ``destroy``."""
    match = _REF.match(ref)
    if match is None:
        raise InvalidInput(f"invalid Transit key reference {ref[:40]!r} (expected <name>@v<N>)")
    return match["name"], int(match["version"]) if match["version"] else None


def is_vault_path(value: str) -> bool:
    """A mount or namespace: segments of letters, digits, ``.``, ``_`` and ``-`` (none ``.`` or
    ``..``) between slashes. It goes into request paths and the ``X-Vault-Namespace`` header,
    and into the ``vault`` commands Trellis suggests: ``../x`` would address another path, a
    newline is no header value, and a space or quote would break the command."""
    value = value.strip("/")
    return bool(value) and all(_SEGMENT.match(part) for part in value.split("/"))


def address_problem(address: str) -> str | None:
    """What makes ``address`` no Vault address (``TRELLIS_VAULT_ADDR``), or None. A port out
    of range (``:99999``), 0 or empty was taken, and every call then failed as if Vault could
    not be reached (exit 8), not as the setting it is."""
    if not re.match(r"^https?://[^/\s]+", address):
        return "must be an http(s):// URL"
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 (raises on a port that is no number or out of range)
    except ValueError:  # a port that is no number, or above 65535; an unclosed [IPv6
        return "not a URL with a port from 1 to 65535"
    if no_port_to_reach(parts):
        return "not a URL with a port from 1 to 65535"
    return None


def _mount(value: str, what: str) -> str:
    if not is_vault_path(value):
        raise InvalidInput(f"invalid Vault {what} mount {value.strip('/')[:40]!r}")
    return value.strip("/")


class VaultKeyBackend:
    """CA keys as non-exportable Transit keys; secrets for hand-out in KV v2."""

    name = "vault"

    def __init__(
        self,
        connection: VaultConnection,
        *,
        transit_mount: str = "transit",
        kv_mount: str = "secret",
        key_prefix: str = "trellis-",
    ) -> None:
        if not re.match(r"^[a-z0-9][a-z0-9_-]{0,39}$", key_prefix):
            raise InvalidInput(f"invalid Vault key prefix {key_prefix[:40]!r}")
        self.connection = connection
        self.transit_mount = _mount(transit_mount, "transit")
        self.kv_mount = _mount(kv_mount, "KV")
        self.key_prefix = key_prefix
        self.requirements = requirements(self.transit_mount, self.kv_mount, key_prefix)
        self._kv_base = key_prefix.rstrip("-_") or "trellis"
        self._transit = _Transit(connection, self.transit_mount)

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultKeyBackend:
        """Builds the client only: nothing talks to Vault until the first key operation."""
        if not settings.vault_addr:
            raise InvalidInput("TRELLIS_VAULT_ADDR is not set")
        auth = VaultAuth(
            method=settings.vault_auth_method,
            token=settings.vault_token.get_secret_value() if settings.vault_token else None,
            token_file=settings.vault_token_file,
            role_id=settings.vault_role_id,
            secret_id_file=settings.vault_secret_id_file,
            kubernetes_role=settings.vault_kubernetes_role,
            kubernetes_token_file=settings.vault_kubernetes_token_file,
            kubernetes_mount=settings.vault_kubernetes_mount,
        )
        connection = VaultConnection(
            settings.vault_addr,
            auth,
            timeout=settings.vault_timeout,
            ca_cert=settings.vault_ca_cert,
            client_cert=settings.vault_client_cert,
            client_key=settings.vault_client_key,
            namespace=settings.vault_namespace,
        )
        return cls(
            connection,
            transit_mount=settings.vault_transit_mount,
            kv_mount=settings.vault_kv_mount,
            key_prefix=settings.vault_key_prefix,
        )

    def create(self, key_type: KeyType, label: str) -> KeyHandle:
        # Another engine at the mount would take the create body as something else to keep (a
        # cubbyhole or KV v1 stores it as a secret), so the mount is checked first.
        mount = self._mount_item("transit mount", self.transit_mount, "transit")
        if not mount.ok:
            raise Unavailable(
                f"Vault cannot hold CA keys at TRELLIS_VAULT_TRANSIT_MOUNT: {mount.detail}"
            )
        name = f"{self.key_prefix}{re.sub(r'[^a-z0-9-]', '-', label.lower())[:60]}"
        name = f"{name}-{secrets.token_hex(6)}"
        wanted = TRANSIT_TYPES[key_type]
        body = {"type": wanted, "exportable": False, "allow_plaintext_backup": False}
        self.connection.call("POST", f"{self.transit_mount}/keys/{name}", body)
        info = self._key(name)
        # Transit answers 200 to a create for a name that exists: never adopt a key we did not make.
        if info.get("type") != wanted or info.get("exportable") or info.get("latest_version") != 1:
            raise Unavailable(f"Transit key {name} already existed with other settings")
        return KeyHandle(self.name, f"{name}@v1", key_type)

    def load(self, handle: KeyHandle) -> Signer:
        return self._load(handle)[0]

    def _load(self, handle: KeyHandle) -> tuple[Signer, dict[str, Any]]:
        """The signer and what Transit says of its key (``check`` looks at its settings)."""
        name, version = _parse_ref(handle.ref)
        info = self._key(name)
        if version is None:  # an unpinned handle would follow rotations: never sign with one
            raise InvalidInput(f"Transit key reference {handle.ref[:40]!r} pins no key version")
        if info.get("type") != TRANSIT_TYPES[handle.key_type]:
            raise Unavailable(f"CA key {handle.ref} is not of type {handle.key_type.value}")
        entry = (info.get("keys") or {}).get(str(version))
        if not isinstance(entry, dict) or "public_key" not in entry:
            # The key is there, its version is not: said as such, not as a missing key.
            raise Unavailable(
                f"version {version} of Transit key {name} no longer exists (trimmed with "
                "min_available_version): the CA that pins it cannot sign"
            )
        minimum = int(info.get("min_encryption_version") or 0)
        if minimum > version:
            # Transit would refuse every signature with this version (HTTP 500, for good).
            raise Unavailable(
                f"Transit key {name} signs with no version below {minimum} "
                f"(min_encryption_version), and the CA pins v{version}: set "
                f"min_encryption_version back to {version} or less"
            )
        public = _public_key(handle.key_type, entry["public_key"], handle.ref)
        key: PrivateKey
        if isinstance(public, ec.EllipticCurvePublicKey):
            key = TransitEcKey(self._transit, name, version, public)
        elif isinstance(public, rsa.RSAPublicKey):
            key = TransitRsaKey(self._transit, name, version, public)
        else:
            key = TransitEd25519Key(self._transit, name, version, public)
        return Signer(handle, key), info

    def destroy(self, handle: KeyHandle) -> None:
        """Delete a key no CA records. The shipped policy denies it (only the opt-in clean-up
        policy grants delete, docs/vault.md): then the key stays, and one warning names it and
        how to delete it by hand, so that the operation this cleans up after still reports its
        own outcome, not this refusal."""
        name, _ = _parse_ref(handle.ref)
        try:
            self._key(name)
        except NotFound:
            return
        path = f"{self.transit_mount}/keys/{name}"
        allowed = self.connection.call_unless_denied(
            "POST", f"{path}/config", {"deletion_allowed": True}
        )
        if allowed is not None and self.connection.call_unless_denied("DELETE", path) is not None:
            return
        namespace = self.connection.namespace
        namespace = f" -namespace={shlex.quote(namespace)}" if namespace else ""
        log.warning(
            "Transit key %s is left in Vault: no CA uses it, and Trellis's Vault policy does not "
            "let it delete keys; delete it by hand: vault write%s %s/config deletion_allowed=true "
            "&& vault delete%s %s",
            name,
            namespace,
            path,
            namespace,
            path,
        )

    def check(self, keys: Sequence[tuple[KeyHandle, CertificatePublicKeyTypes]] = ()) -> None:
        """One ``sys/capabilities-self`` call for the keys' sign paths (a token whose policy may
        not sign fails every signature while Vault answers everything else), then one read per
        key: it still exists, and the pinned version is still the certificate's key."""
        if not keys:
            self.connection.token_info()
            return
        paths = {
            handle.ref: f"{self.transit_mount}/sign/{_parse_ref(handle.ref)[0]}"
            for handle, _ in keys
        }
        data = self.connection.call(
            "POST", "sys/capabilities-self", {"paths": sorted(set(paths.values()))}
        )
        granted = data.get("data") or data
        for path in paths.values():
            have = set(granted.get(path) or [])
            if not have & {"update", "root", "sudo"}:
                raise Unavailable(
                    f"Vault's token may not sign with {path.rsplit('/', 1)[1]}: its policy lacks "
                    f"'update' on {path} (run 'trellis vault check')"
                )
        for handle, public in keys:
            self.check_key(handle, public)

    def check_key(self, handle: KeyHandle, public: CertificatePublicKeyTypes) -> None:
        """Raise ``Unavailable`` if the key cannot sign as its certificate (gone, its pinned
        version trimmed or below ``min_encryption_version``, or another key under its name) or
        is at risk (``_exposure``): ``/readyz`` (``check``) and ``trellis vault check``
        (``diagnose``) ask this one question, so that neither says a key is fine that the other
        refuses."""
        try:
            signer, info = self._load(handle)
        except NotFound:
            raise Unavailable(f"CA key {handle.ref} is missing from the vault key store") from None
        if signer.public_key() != public:
            raise Unavailable(f"CA key {handle.ref} is not the key of its CA certificate")
        if exposure := _exposure(handle.ref, info, self.transit_mount):
            raise Unavailable(exposure)

    def store_secret(self, path: str, data: bytes) -> None:
        """Keep ``data`` (a key Trellis hands out) at ``<kv>/data/<prefix>/<path>``, as a new
        KV v2 version."""
        body = {"data": {"value": base64.b64encode(data).decode()}}
        self.connection.call("POST", self._kv_path(path), body, capability="create/update")

    def read_secret(self, path: str) -> bytes:
        try:
            data = self.connection.call("GET", self._kv_path(path), missing_ok=True)
        except NotFound:
            raise NotFound(f"no secret {path[:80]!r} in Vault KV mount {self.kv_mount}") from None
        value = ((data.get("data") or {}).get("data") or {}).get("value")
        try:
            if isinstance(value, str):
                return base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error: not base64, so not what store_secret wrote
            pass
        raise Unavailable(f"secret {path[:80]!r} in Vault was not written by Trellis")

    def _kv_path(self, path: str) -> str:
        parts = path.split("/")
        if not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts):
            raise InvalidInput(f"invalid secret path {path[:80]!r}")
        return f"{self.kv_mount}/data/{self._kv_base}/{path}"

    def _key(self, name: str) -> dict[str, Any]:
        try:
            data = self.connection.call("GET", f"{self.transit_mount}/keys/{name}", missing_ok=True)
        except NotFound:
            raise NotFound(
                f"CA key {name} is missing from Vault Transit mount {self.transit_mount}"
            ) from None
        info: dict[str, Any] = data.get("data") or {}
        return info

    # -- trellis vault check -----------------------------------------------------------------

    def diagnose(
        self, keys: Sequence[tuple[KeyHandle, CertificatePublicKeyTypes]] = ()
    ) -> VaultReport:
        """Connectivity, login, mounts, capabilities, rights Trellis must not have, and the
        ``keys`` an instance signs with (each with its certificate's public key: ``check_key``),
        each as one item; stops at the first step later ones depend on."""
        items: list[CheckItem] = []
        policy = render_policy(self.requirements)

        def report(missing: tuple[Requirement, ...] = ()) -> VaultReport:
            return VaultReport(self.connection.shown, tuple(items), missing, policy)

        try:
            health = self.connection.call(
                "GET",
                "sys/health?standbyok=true&perfstandbyok=true",
                authenticated=False,
                namespaced=False,  # a root-namespace path: OpenBao refuses it in a namespace
            )
            items.append(
                CheckItem(
                    "connectivity",
                    True,
                    f"reachable, unsealed, version {health.get('version', '?')}",
                )
            )
            info = self.connection.token_info()
        except TrellisError as error:
            items.append(CheckItem("connectivity" if not items else "auth", False, error.detail))
            return report()
        ttl = int(info.get("ttl") or 0)
        items.append(
            CheckItem(
                "auth",
                True,
                f"{self.connection.auth.method}: token TTL {f'{ttl} s' if ttl else 'none'}"
                f"{' (renewable)' if info.get('renewable') else ''}, "
                f"policies {', '.join(info.get('policies') or []) or 'none'}",
            )
        )
        for label, mount, kind in (
            ("transit mount", self.transit_mount, "transit"),
            ("kv mount", self.kv_mount, "kv"),
        ):
            try:
                items.append(self._mount_item(label, mount, kind))
            except TrellisError as error:  # Vault gone since it answered above
                items.append(CheckItem(label, False, error.detail))
                return report()
        try:
            data = self.connection.call(
                "POST", "sys/capabilities-self", {"paths": [r.probe for r in self.requirements]}
            )
        except TrellisError as error:
            items.append(CheckItem("capabilities", False, error.detail))
            return report()
        granted = data.get("data") or data
        missing: list[Requirement] = []
        for item in self.requirements:
            have = set(granted.get(item.probe) or [])
            lacking = () if "root" in have else tuple(c for c in item.capabilities if c not in have)
            if lacking:
                missing.append(Requirement(item.path, lacking, item.why))
        detail = "; ".join(f"{', '.join(m.capabilities)} on {m.path}" for m in missing)
        items.append(
            CheckItem(
                "capabilities",
                not missing,
                f"missing {detail}" if missing else f"all {len(self.requirements)} paths granted",
            )
        )
        items.append(self._excess_item())
        if keys:
            items.append(self._keys_item(keys))
        return report(tuple(missing))

    def _excess_item(self) -> CheckItem:
        """A failure, not a warning: with any of these rights, whoever holds the token can take
        or destroy the CA keys, which the vault backend exists to prevent."""
        key = f"{self.key_prefix}check-{secrets.token_hex(6)}"  # no such key: nothing changes
        try:
            granted = [
                what
                for what, method, path, body in _FORBIDDEN
                if self.connection.permits(
                    method, f"{self.transit_mount}/{path.format(key=key)}", body
                )
            ]
            # Said, not failed: the key rule's trailing * covers <key>/rotate and no rule of a
            # policy can take it out again (docs/vault.md, "The policy"); a new version changes
            # nothing, as every CA signs with the version it pinned.
            rotates = self.connection.permits(
                "POST", f"{self.transit_mount}/keys/{key}/rotate", None
            )
        except TrellisError as error:
            return CheckItem("excess rights", False, error.detail)
        deletion = {what for what, *_ in _DELETION}
        if granted and set(granted) <= deletion:
            return CheckItem(
                "excess rights",
                False,
                f"the token may also {' and '.join(granted)} on {self.transit_mount}/: that is "
                "the right to destroy every CA key, which no policy can keep to the keys Trellis "
                "never recorded (the opt-in clean-up policy grants it; use the policy below)",
            )
        if granted:
            return CheckItem(
                "excess rights",
                False,
                f"the token may also {', '.join(granted)} on {self.transit_mount}/: Trellis "
                "needs none of it, and whoever holds the token could take or destroy the CA "
                "keys (use the policy below, and no root token)",
            )
        if rotates:
            return CheckItem(
                "excess rights",
                True,
                "the token cannot export, trim, reconfigure or delete keys; it can rotate them, "
                "which changes no CA (each signs with the key version it pinned)",
            )
        return CheckItem(
            "excess rights",
            True,
            "the token cannot export, trim, reconfigure, delete or rotate keys",
        )

    def _keys_item(self, keys: Sequence[tuple[KeyHandle, CertificatePublicKeyTypes]]) -> CheckItem:
        problems: list[str] = []
        for handle, public in keys:
            try:
                self.check_key(handle, public)
            except TrellisError as error:
                problems.append(error.detail)
        if problems:
            return CheckItem("ca keys", False, "; ".join(problems))
        return CheckItem(
            "ca keys",
            True,
            f"{len(keys)} recorded, each present, pinned, the key of its certificate, "
            "not exportable and not deletable",
        )

    def _mount_item(self, label: str, mount: str, kind: str) -> CheckItem:
        """What is mounted at ``mount``. Vault answers 403 alike for a path nothing is mounted
        at and one the token may not use; any other failure (Vault unreachable, sealed, the
        token rejected) is raised as itself: said as a mount that is not there, it sent the
        operator to the wrong setting."""
        answer = self.connection.call_unless_denied("GET", f"sys/internal/ui/mounts/{mount}")
        if answer is None:
            return CheckItem(
                label, False, f"{mount}/ is not mounted, or this token may use no path under it"
            )
        data = answer.get("data") or {}
        found = data.get("type")
        version = str((data.get("options") or {}).get("version") or "1")
        if found != kind or (kind == "kv" and version != "2"):
            shown = f"kv v{version}" if found == "kv" else found
            return CheckItem(
                label, False, f"{mount}/ is {shown}, not {'kv v2' if kind == 'kv' else kind}"
            )
        return CheckItem(label, True, f"{mount}/ ({'kv v2' if kind == 'kv' else kind})")
