"""The closed set of errors the CA core raises.

Adapters map these classes, and only these, to transport outcomes: ``api.problems`` to RFC 9457
problem responses and ``cli.main`` to exit codes. The core never knows about either.

    TrellisError
    ├── InvalidInput            the caller sent something malformed or out of policy
    │   ├── InvalidSpiffeId     breaks a SPIFFE-ID rule (the ``reason`` names which)
    │   ├── InvalidCsr          unparseable CSR, bad signature, unsupported key
    │   └── PolicyViolation     well-formed but not allowed (TTL above max, SAN not in the entry)
    ├── AuthenticationFailed    no credential, or one that does not verify
    ├── PermissionDenied        a valid credential that may not do this
    ├── NotFound                the named object does not exist
    ├── Conflict                the object exists already, or is in the wrong state
    ├── NotInitialised          no authority yet: run ``trellis init``
    ├── Unavailable             a backend (database, key store) cannot be reached right now
    └── InternalError           Trellis caught itself about to do something wrong (a bug)
        └── AuditTampered       the audit trail was tampered with: the sealer refuses to sign it
"""

from __future__ import annotations

__all__ = [
    "AuditTampered",
    "AuthenticationFailed",
    "Conflict",
    "InternalError",
    "InvalidCsr",
    "InvalidInput",
    "InvalidSpiffeId",
    "NotFound",
    "NotInitialised",
    "PermissionDenied",
    "PolicyViolation",
    "TrellisError",
    "Unavailable",
]


class TrellisError(Exception):
    """Root of every error the core raises on purpose.

    ``code`` is a stable slug (used in problem ``type`` URIs and ``--json`` output). ``detail`` is
    one human sentence for whoever runs Trellis: the CLI's error line and the server's log. It
    may name where on this server something is (a key file, the passphrase file, a CRL file),
    because that is what its operator has to go and mend. ``public`` is what a client over HTTP
    is told instead (a problem's ``detail``, ``/readyz``): the same sentence, unless the raiser
    gives one that names none of the server's paths, nor its database's URL, which are no
    client's business and help whoever probes it. Neither ever holds key material or a token
    secret.
    """

    code = "error"
    title = "Trellis error"

    def __init__(self, detail: str, *, public: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.public = detail if public is None else public


class InvalidInput(TrellisError):
    code = "invalid-input"
    title = "Invalid input"


class InvalidSpiffeId(InvalidInput):
    code = "invalid-spiffe-id"
    title = "Invalid SPIFFE ID"

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid SPIFFE ID {value[:128]!r}: {reason}")
        self.value = value
        self.reason = reason


class InvalidCsr(InvalidInput):
    code = "invalid-csr"
    title = "Invalid certificate signing request"


class PolicyViolation(InvalidInput):
    code = "policy-violation"
    title = "Request not allowed by policy"


class AuthenticationFailed(TrellisError):
    code = "unauthenticated"
    title = "Authentication required"


class PermissionDenied(TrellisError):
    code = "forbidden"
    title = "Not allowed"


class NotFound(TrellisError):
    code = "not-found"
    title = "Not found"


class Conflict(TrellisError):
    code = "conflict"
    title = "Conflict"


class NotInitialised(TrellisError):
    code = "not-initialised"
    title = "Authority not initialised"


class Unavailable(TrellisError):
    code = "unavailable"
    title = "Backend unavailable"


class InternalError(TrellisError):
    """E.g. a certificate that fails the self-check after signing: it is never returned."""

    code = "internal"
    title = "Internal error"


class AuditTampered(InternalError):
    """Records the sealer will not chain: signing them would bless a rewritten history."""

    code = "audit-tampered"
    title = "Audit trail tampered with"
