"""What ``/openapi.json`` says a string must look like, for the strings ``ca`` parses.

pydantic enforces none of it (``Documented`` only writes the schema): the ``ca`` parser
named beside each type judges the value, with its own message, as a 400 problem, the one the
CLI gives for the same input (docs/api.md). The schema only lets clients and fuzzers know the
rule. Each is the parser's rule where JSON Schema can say it, else the closest one that refuses
nothing the parser takes: a document stricter than the server would call good requests bad.

The enums list the canonical spellings; the parsers also take them in any case with spaces
around (``KeyType.parse``), which an enum cannot say and a client has no reason to send.
``Empty`` variants are for the fields where ``""`` means the default, as an absent field does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from ca.keys import KeyType
from ca.keys.store import KNOWN_BACKENDS
from ca.revocation import RevocationReason

__all__ = [
    "CA_SELECTOR",
    "CONSUMER_NAME",
    "DURATION",
    "SERIAL",
    "TRUST_DOMAIN",
    "VPN_NAME",
    "CaSelectorText",
    "Documented",
    "Duration",
    "DurationOrEmpty",
    "KeyBackendOrEmpty",
    "KeyTypeName",
    "KeyTypeOrEmpty",
    "ReasonName",
    "SerialOrEmpty",
    "SerialText",
    "TrustDomainText",
    "one_of",
    "optional",
    "string_schema",
]


class Documented:
    """``Annotated`` metadata adding ``keywords`` to the JSON Schema pydantic makes for the
    type; unlike ``WithJsonSchema``, the bounds a ``Field``, ``Query`` or ``Path`` sets (such
    as ``maxLength``) stay."""

    __slots__ = ("keywords",)

    def __init__(self, keywords: dict[str, Any]) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(
        self, core: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(core), **self.keywords}


def string_schema(**keywords: Any) -> Documented:
    return Documented(keywords)


def one_of(values: Iterable[str], *, empty: bool = False) -> Documented:
    return string_schema(enum=([""] if empty else []) + list(values))


def optional(pattern: str) -> str:
    """``pattern``, or the empty string (the default)."""
    return f"^({pattern.removeprefix('^').removesuffix('$')})?$"


# ``Ttl.parse``: strip(), then [1-9][0-9]{0,9} and one unit, at most 100y (``_MAX_SECONDS``):
# the digits allowed per unit are those of 100y in it (3153600000s, 52560000m, 876000h,
# 36500d, 100y), so only values of that many digits over the bound pass the pattern.
DURATION = (
    r"^\s*([1-9][0-9]{0,9}s|[1-9][0-9]{0,7}m|[1-9][0-9]{0,5}h|[1-9][0-9]{0,4}d"
    r"|[1-9][0-9]{0,2}y)\s*$"
)

# ``Serial.parse``: strip(), lower(), one "0x" taken off, every ':' dropped, then 1 to 40 hex
# digits (zero and values of 2**159 and more pass the pattern, refused after).
SERIAL = r"^\s*(0[xX])?:*([0-9a-fA-F]:*){1,40}\s*$"
# ``ca.cas.find_ca``: the active ``root`` or ``intermediate`` (exactly so), or a serial.
CA_SELECTOR = rf"^(root|intermediate|{SERIAL[1:-1]})$"
# ``gateway.ConsumerName``: fullmatch of the same expression.
CONSUMER_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# ``openvpn.VpnName``: ``openvpn._NAME``, matched in full.
VPN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
# ``TrustDomain.parse`` in one path segment, which cannot hold the '/' of ``spiffe://``: the
# SPIFFE-ID §2.1 characters, upper case tolerated, at most 255 (``MAX_TRUST_DOMAIN_BYTES``).
TRUST_DOMAIN = r"^[A-Za-z0-9._-]{1,255}$"

Duration = Annotated[str, string_schema(pattern=DURATION)]
DurationOrEmpty = Annotated[str, string_schema(pattern=optional(DURATION))]
SerialText = Annotated[str, string_schema(pattern=SERIAL)]
SerialOrEmpty = Annotated[str, string_schema(pattern=optional(SERIAL))]
CaSelectorText = Annotated[str, string_schema(pattern=CA_SELECTOR)]
TrustDomainText = Annotated[str, string_schema(pattern=TRUST_DOMAIN)]

KeyTypeName = Annotated[str, one_of(k.value for k in KeyType)]
KeyTypeOrEmpty = Annotated[str, one_of((k.value for k in KeyType), empty=True)]
# ``check_backend_name``, on the name given or else the configured default (TRELLIS_KEY_BACKEND).
KeyBackendOrEmpty = Annotated[str, one_of(KNOWN_BACKENDS, empty=True)]
# ``RevocationReason.parse`` refuses certificateHold (and removeFromCRL, not a member).
ReasonName = Annotated[
    str,
    one_of(r.value for r in RevocationReason if r is not RevocationReason.CERTIFICATE_HOLD),
]
