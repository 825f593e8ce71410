"""Key types and the key-backend seam.

Issuing code holds a ``Signer``: a cryptography private-key object plus what it needs to know to
use it. For the file backend that object is the real key; a remote backend (Vault Transit) hands
out a subclass whose ``sign()`` forwards the digest, so cryptography's certificate, CRL and OCSP
builders work unchanged and issuing code never learns which backend it has.
"""

from ca.keys.backend import KeyBackend, KeyHandle, Signer
from ca.keys.types import (
    KeyType,
    PrivateKey,
    PublicKey,
    RefusedSignatureAlgorithm,
    check_public_key,
    verify_signed,
)

__all__ = [
    "KeyBackend",
    "KeyHandle",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "RefusedSignatureAlgorithm",
    "Signer",
    "check_public_key",
    "verify_signed",
]
