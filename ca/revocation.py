"""RFC 5280 §5.3.1 revocation reasons, by the names operators type."""

from __future__ import annotations

import enum

from cryptography import x509

from ca.errors import InvalidInput

__all__ = ["RevocationReason"]


class RevocationReason(enum.Enum):
    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    CERTIFICATE_HOLD = "certificateHold"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"
    AA_COMPROMISE = "aACompromise"

    @classmethod
    def parse(cls, text: str) -> RevocationReason:
        """Case-insensitive. Two RFC 5280 §5.3.1 codes are refused, each saying why:
        ``removeFromCRL`` is a delta CRL's marker, not a reason to revoke; ``certificateHold``
        says the revocation may be lifted, and no Trellis revocation can be (a revoked
        certificate stays revoked, an intermediate revoked in an emergency is replaced), so a
        CRL or OCSP answer saying so would promise relying parties what never happens. The
        member stays, to read what an older release recorded."""
        wanted = text.strip().replace("_", "").replace("-", "").lower()
        names = ", ".join(r.value for r in cls if r is not cls.CERTIFICATE_HOLD)
        if wanted == cls.CERTIFICATE_HOLD.value.lower():
            raise InvalidInput(
                "certificateHold is not a reason Trellis revokes for: it says the revocation"
                " may be lifted (RFC 5280 §5.3.1), and a Trellis revocation is permanent;"
                f" use one of {names}"
            )
        for reason in cls:
            if reason.value.lower() == wanted:
                return reason
        if wanted == "removefromcrl":  # RFC 5280 §5.3.1 code 8: a real code, so say why not
            raise InvalidInput(
                "removeFromCRL is not a reason to revoke: in a delta CRL it takes a certificate"
                f" on hold back off the list (RFC 5280 §5.3.1); use one of {names}"
            )
        raise InvalidInput(f"unknown revocation reason {text[:40]!r}: use one of {names}")

    @property
    def flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags(self.value)
