"""The little DER Trellis reads and writes by hand, where cryptography has no call for it: the
subjectPublicKey bits a key identifier or an OCSP key hash covers, and the per-certificate
fields of a leaf template (``ca.leafder``). Single-octet tags only: all that X.509 uses."""

from __future__ import annotations

__all__ = ["contents", "elements", "public_key_bits", "tlv"]


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, body: bytes) -> bytes:
    """One element: its tag, its definite length, ``body``."""
    return bytes((tag,)) + _length(len(body)) + body


def elements(body: bytes) -> list[bytes]:
    """The encoded elements one after the other in ``body`` (a constructed element's
    contents), each with its tag and length."""
    found, at = [], 0
    while at < len(body):
        start, first = at, body[at + 1]
        at += 2
        if first < 0x80:
            size = first
        else:
            size = int.from_bytes(body[at : at + (first & 0x7F)], "big")
            at += first & 0x7F
        at += size
        found.append(body[start:at])
    if at != len(body):
        raise ValueError("truncated DER")
    return found


def contents(element: bytes) -> bytes:
    """An element's contents, without its tag and length."""
    first = element[1]
    return element[2 + (first & 0x7F if first >= 0x80 else 0) :]


def public_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING's contents, its unused-bits octet dropped, from a DER
    SubjectPublicKeyInfo (SEQUENCE { AlgorithmIdentifier, BIT STRING }): what RFC 5280's key
    identifier (§4.2.1.2, method 1) and OCSP's issuerKeyHash (RFC 6960 §4.1.1) are hashes of."""
    return contents(elements(contents(spki))[1])[1:]
