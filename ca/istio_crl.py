"""``ca-crl.pem`` for Istio plug-in CA intermediates.

istiod accepts an optional ``ca-crl.pem`` next to ``ca-cert.pem`` and distributes it to the
proxies; when present it must hold a CRL for every CA in the chain (istiod refuses a partial
set). Trellis's chain is the cluster's intermediate and the root above it, so the file holds:

1. the intermediate's own CRL: empty (istiod signs workload certificates and Trellis never
   learns of them, so it cannot list any), signed with the intermediate's key at issue time —
   the only moment Trellis holds that key — and valid until the intermediate itself expires;
2. the root's current CRL (``ca.crl``), which lists the intermediate once it is revoked and is
   re-signed on every revocation and every day; the ``istio-intermediates`` job puts a changed
   one into the output without needing the intermediate's key.

The intermediate's CRL comes first, like ``cert-chain.pem`` (leaf-most first).
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.crl import Crl, build_crl
from ca.keys import KeyType, PrivateKey
from ca.profiles import BACKDATE

__all__ = ["CRL_FILE", "crl_bundle", "intermediate_crl"]

CRL_FILE = "ca-crl.pem"


def intermediate_crl(
    cert: x509.Certificate, key: PrivateKey, key_type: KeyType, now: dt.datetime
) -> bytes:
    """The intermediate's empty CRL (PEM), nextUpdate = the intermediate's notAfter and
    thisUpdate its notBefore (``now`` backdated, as ``ca.crl.refresh_crl`` does: a proxy whose
    clock lags must not find it "not yet valid").

    RFC 5280 §5.2.3 wants CRL numbers to increase per CRL issuer; every renewal of a cluster's
    intermediate has the same subject (a new key), so the number is the issue time in seconds,
    which only grows from one renewal to the next.
    """
    der = build_crl(
        cert,
        key,
        key_type.signature_hash(),
        number=int(now.timestamp()),
        this_update=max(now - BACKDATE, cert.not_valid_before_utc),
        next_update=cert.not_valid_after_utc,
    )
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def crl_bundle(intermediate_pem: bytes, root: Crl) -> bytes:
    """The content of ``ca-crl.pem``: a CRL for each CA of the chain, the intermediate's first."""
    return intermediate_pem + root.pem
