"""/openapi.json says which strings the server takes: the enums and patterns of the values ``ca``
parses. A schemathesis run found requests the document called valid and the server refused
(``key_type: "x"``, ``ttl: "soon"``, a consumer named ``""``): clients and fuzzers could not know
the rules. The server's 400s stay as they were (``api.schemas.wire`` enforces nothing); the
document must name every value the parser takes, and nothing it refuses where JSON Schema can say
so. Each expected enum is the parser's own answer over its ``Enum``, so the two cannot drift."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from api.schemas.wire import CA_SELECTOR, CONSUMER_NAME, DURATION, SERIAL, TRUST_DOMAIN, VPN_NAME
from api.schemas.wire import optional as or_empty
from ca import gateway, openvpn
from ca.certs import CertStatus
from ca.durations import Ttl
from ca.errors import TrellisError
from ca.federation import Profile
from ca.identity import TrustDomain
from ca.keys import KeyType
from ca.keys.store import KNOWN_BACKENDS, check_backend_name
from ca.revocation import RevocationReason
from ca.serial import Serial

# The document does not depend on the database.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _takes(parse: Callable[[str], object], value: str) -> bool:
    try:
        parse(value)
    except TrellisError:
        return False
    return True


def _taken(parse: Callable[[str], object], candidates: Iterable[str]) -> set[str]:
    return {value for value in candidates if _takes(parse, value)}


def _gateway_init(value: str) -> object:
    return gateway.GatewayParams(key_type=KeyType.parse(value), root_key_type=KeyType.parse(value))


def _pkcs12_key(value: str) -> object:
    return gateway.CertRequest(
        consumer=gateway.ConsumerName("acme"),
        requested_by="test",
        pkcs12_password=b"p" * gateway.MIN_P12_PASSWORD,
        key_type=KeyType.parse(value),
    )


def _ca_selector(value: str) -> object:
    """``ca.cas.find_ca``'s reading of the ``ca`` path segment."""
    return value if value in ("root", "intermediate") else Serial.parse(value)


KEY_TYPES = _taken(KeyType.parse, (k.value for k in KeyType))
GATEWAY_KEY_TYPES = _taken(_gateway_init, (k.value for k in KeyType))
PKCS12_KEY_TYPES = _taken(_pkcs12_key, (k.value for k in KeyType))
BACKENDS = _taken(check_backend_name, [*KNOWN_BACKENDS, "memory", "kms"])
TLS_CRYPT = _taken(openvpn.TlsCrypt.parse, (t.value for t in openvpn.TlsCrypt))
PROTO = _taken(openvpn.Proto.parse, (p.value for p in openvpn.Proto))
PROFILES = _taken(Profile.parse, (p.value for p in Profile))
FORMATS = _taken(gateway.TruststoreFormat.parse, (f.value for f in gateway.TruststoreFormat))
REASONS = _taken(RevocationReason.parse, [*(r.value for r in RevocationReason), "removeFromCRL"])
STATUSES = _taken(CertStatus.parse, (s.value for s in CertStatus))

# (where, the values the parser takes, whether "" is taken as the default)
ENUMS: list[tuple[str, set[str], bool]] = [
    ("GatewayInit.key_type", GATEWAY_KEY_TYPES, True),
    ("GatewayInit.root_key_type", GATEWAY_KEY_TYPES, True),
    ("GatewayInit.key_backend", BACKENDS, True),
    ("Pkcs12Options.key_type", PKCS12_KEY_TYPES, True),
    ("OpenVpnInit.key_type", KEY_TYPES, True),
    ("OpenVpnInit.root_key_type", KEY_TYPES, True),
    ("OpenVpnInit.key_backend", BACKENDS, True),
    ("ServerCertRequest.key_type", KEY_TYPES, False),
    ("ClientCreate.key_type", KEY_TYPES, False),
    ("ClientRenew.key_type", KEY_TYPES, False),
    ("ClientCreate.tls_crypt", TLS_CRYPT, False),
    ("ClientRenew.tls_crypt", TLS_CRYPT, True),
    ("OpenVpnConfigure.proto", PROTO, True),
    ("FederationCreate.profile", PROFILES, False),
    ("RevokeRequest.reason", REASONS, False),
    ("IntermediateRevokeRequest.reason", REASONS, False),
    ("IdentityRevokeRequest.reason", REASONS, False),
    ("ClientRevoke.reason", REASONS, False),
    ("POST /v1/authorities/{authority}/revoke-intermediate reason", REASONS, False),
    ("GET /v1/gateway/truststore/{format} format", FORMATS, False),
    ("GET /v1/certificates status", STATUSES, True),
]

PATTERNS: list[tuple[str, str]] = [
    ("SvidRequest.ttl", or_empty(DURATION)),
    ("EntryCreate.ttl", or_empty(DURATION)),
    ("EntryCreate.max_ttl", or_empty(DURATION)),
    ("TokenCreate.ttl", or_empty(DURATION)),
    ("GatewayInit.ca_ttl", or_empty(DURATION)),
    ("GatewayInit.default_ttl", or_empty(DURATION)),
    ("GatewayInit.max_ttl", or_empty(DURATION)),
    ("CertIssueRequest.ttl", or_empty(DURATION)),
    ("OpenVpnInit.ca_ttl", DURATION),
    ("ServerCertRequest.ttl", DURATION),
    ("ClientCreate.ttl", DURATION),
    ("ClientRenew.ttl", DURATION),
    ("GET /v1/certificates expiring_within", or_empty(DURATION)),
    ("ConsumerCreate.name", CONSUMER_NAME),
    ("GET /v1/gateway/consumers/{name} name", CONSUMER_NAME),
    ("POST /v1/gateway/consumers/{name}/disable name", CONSUMER_NAME),
    ("POST /v1/gateway/consumers/{name}/certificates name", CONSUMER_NAME),
    ("GET /v1/gateway/certificates consumer", or_empty(CONSUMER_NAME)),
    ("ClientCreate.name", VPN_NAME),
    ("ServerCertRequest.cn", VPN_NAME),
    ("OpenVpnConfigure.server_cn", VPN_NAME),
    ("POST /v1/openvpn/clients/{name}/renew name", VPN_NAME),
    ("POST /v1/openvpn/clients/{name}/revoke name", VPN_NAME),
    ("GET /v1/federation/{trust_domain} trust_domain", TRUST_DOMAIN),
    ("DELETE /v1/federation/{trust_domain} trust_domain", TRUST_DOMAIN),
    ("POST /v1/federation/{trust_domain}/refresh trust_domain", TRUST_DOMAIN),
    ("GET /v1/certificates/{serial} serial", SERIAL),
    ("POST /v1/certificates/{serial}/revoke serial", SERIAL),
    ("GET /v1/gateway/certificates/{serial} serial", SERIAL),
    ("POST /v1/gateway/certificates/{serial}/revoke serial", SERIAL),
    ("GET /v1/certificates after", or_empty(SERIAL)),
    ("GET /v1/gateway/certificates after", or_empty(SERIAL)),
    ("GET /v1/ca/{authority}/{ca}.crt ca", CA_SELECTOR),
    ("GET /v1/crl/{authority}/{ca}.crl ca", CA_SELECTOR),
    ("GET /v1/crl/{authority}/{ca}.pem ca", CA_SELECTOR),
]

LONG = "a" * 63
# (pattern, the parser, values the server takes, values it refuses that the pattern refuses
# too, the characters random values are drawn from)
RULES: dict[str, tuple[Callable[[str], object], list[str], list[str], str]] = {
    "duration": (
        Ttl.parse,
        ["30s", "15m", "1h", "7d", "10y", "100y", "3153600000s", " 1h\n", "24h", "398d", "3y"],
        ["", "0s", "1w", "1.5h", "h", "1H", "-1h", "01h", "1 h", "1000y", "99999999999s"],
        "0123456789smhdyw .\t-",
    ),
    "serial": (
        Serial.parse,
        ["0a1b", "0A:1B", "0x0a1b", "0X0A1B", " 7f ", "7" + "f" * 39, Serial.generate().hex],
        ["", "zz", "0x", "0:x12", "0x0x1", "g1", "1" * 41, "1 2"],
        "0123456789abcdefgABxX: ",
    ),
    "ca": (
        _ca_selector,
        ["root", "intermediate", "0a1b", "0A:1B", "0x0a1b"],
        ["", "ROOT", "Intermediate", "nope", "zz", "root "],
        "0123456789abcfroointermediatexX: ",
    ),
    "consumer": (
        gateway.ConsumerName,
        ["acme-payments", "a", "0.x_y-z", "a" + LONG],
        ["", "-a", ".a", "_a", "A", "a" + LONG + "b", "a b", "a\n", "é"],
        "aZ09._- \né",
    ),
    "vpn": (
        openvpn.VpnName,
        ["alice", "_x", "Server.1", "a-b_c", "A" + LONG],
        ["", ".x", "-x", "a b", "A" + LONG + "b", "a\n", "a/b"],
        "aZ09._- /\n",
    ),
    "trust domain": (
        TrustDomain.parse,
        ["partner.org", "Example.ORG", "a_b-c", "a" * 255],
        ["", "a:80", "a@b", "é.org", "a" * 256, "a b"],
        "aZ09._-:@ é",
    ),
}
RULE_OF = {
    DURATION: "duration",
    SERIAL: "serial",
    CA_SELECTOR: "ca",
    CONSUMER_NAME: "consumer",
    VPN_NAME: "vpn",
    TRUST_DOMAIN: "trust domain",
}


def _matches(pattern: str, value: str) -> bool:
    """JSON Schema's (ECMA-262's) reading: '$' is the end, not a final newline as in Python."""
    assert pattern.startswith("^") and pattern.endswith("$"), pattern
    return re.fullmatch(pattern[1:-1], value) is not None


_SPEC: dict[str, Any] = {}


@pytest.fixture
def spec(database_url: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The document as the server serves it, fetched once per process: it depends on the
    code only, and a context and an app for each of the ~70 cases took ~1 s each."""
    if not _SPEC:
        client: TestClient = request.getfixturevalue("client")
        body = client.get("/openapi.json").json()
        assert isinstance(body, dict)
        _SPEC.update(body)
    return _SPEC


def _string_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The string branch of ``T | None``."""
    branches = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    assert len(branches) == 1, schema
    return branches[0]


def _models(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Component schemas, and request bodies written inline (``/v1/svid``'s ``SvidRequest``)."""
    inline = {
        schema["title"]: schema
        for item in spec["paths"].values()
        for operation in item.values()
        for media in operation.get("requestBody", {}).get("content", {}).values()
        if "title" in (schema := media.get("schema", {})) and "properties" in schema
    }
    return {**inline, **spec["components"]["schemas"]}


def _where(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """``Model.field`` (a request body's field) or ``METHOD /path parameter``."""
    if " " not in where:
        model, field = where.split(".")
        return _string_schema(_models(spec)[model]["properties"][field])
    method, path, name = where.split(" ")
    operation = spec["paths"][path][method.lower()]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == name]
    return _string_schema(parameter["schema"])


@pytest.mark.parametrize(("where", "taken", "empty"), ENUMS, ids=[e[0] for e in ENUMS])
@sqlite_only
def test_an_enum_lists_exactly_what_the_parser_takes(
    spec: dict[str, Any], where: str, taken: set[str], empty: bool
) -> None:
    schema = _where(spec, where)
    assert set(schema["enum"]) == taken | ({""} if empty else set())
    assert len(schema["enum"]) == len(set(schema["enum"]))


def test_the_enums_leave_out_what_the_parsers_refuse() -> None:
    """Not a tautology of ``_taken``: the values each rule is known to refuse are refused."""
    assert "certificateHold" not in REASONS and "removeFromCRL" not in REASONS
    assert "keyCompromise" in REASONS and len(REASONS) == len(RevocationReason) - 1
    assert KeyType.ED25519.value in KEY_TYPES
    assert KeyType.ED25519.value not in GATEWAY_KEY_TYPES | PKCS12_KEY_TYPES
    assert {"file", "vault"} == BACKENDS
    assert {"pem", "nginx", "aws", "kong"} == FORMATS
    assert {"v2", "shared"} == TLS_CRYPT and {"udp", "tcp"} == PROTO
    assert {"https_web", "https_spiffe"} == PROFILES


@pytest.mark.parametrize(("where", "pattern"), PATTERNS, ids=[p[0] for p in PATTERNS])
@sqlite_only
def test_a_parsed_string_carries_its_pattern(
    spec: dict[str, Any], where: str, pattern: str
) -> None:
    assert _where(spec, where)["pattern"] == pattern


@pytest.mark.parametrize("pattern", list(RULE_OF), ids=list(RULE_OF.values()))
def test_a_pattern_takes_every_value_its_parser_takes(pattern: str) -> None:
    """Never stricter than the server: the known values, then random ones, each taken by the
    parser must match. The pattern refuses the listed refusals (it is as strict as it can be
    there), and "" only where ``or_empty`` says the route reads it as absent."""
    parse, taken, refused, alphabet = RULES[RULE_OF[pattern]]
    for value in taken:
        assert _takes(parse, value), value
        assert _matches(pattern, value) and _matches(or_empty(pattern), value), value
    for value in refused:
        assert not _takes(parse, value), value
        assert not _matches(pattern, value), value
    assert _matches(or_empty(pattern), "")
    draw = random.Random(pattern)
    tried = 0
    for _ in range(4000):
        value = "".join(draw.choice(alphabet) for _ in range(draw.randint(1, 8)))
        if _takes(parse, value):
            tried += 1
            assert _matches(pattern, value), value
    assert tried > 20  # the alphabet reaches values the parser takes


@pytest.mark.parametrize("pattern", [CONSUMER_NAME, VPN_NAME, TRUST_DOMAIN])
def test_a_name_pattern_is_exactly_its_parser(pattern: str) -> None:
    parse, _taken_values, _refused, alphabet = RULES[RULE_OF[pattern]]
    draw = random.Random(pattern)
    for _ in range(4000):
        value = "".join(draw.choice(alphabet) for _ in range(draw.randint(0, 6)))
        assert _matches(pattern, value) == _takes(parse, value), value


@sqlite_only
def test_every_serial_and_page_parameter_is_constrained(spec: dict[str, Any]) -> None:
    """Operations added later too: a ``serial`` or ``after`` parameter is a serial."""
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in ("serial", "after"):
                    assert SERIAL[1:-1] in _string_schema(parameter["schema"])["pattern"], (
                        method,
                        path,
                    )


@sqlite_only
def test_every_documented_example_is_valid(spec: dict[str, Any]) -> None:
    """The document's own examples are requests the server takes, so they satisfy it."""
    for name, schema in _models(spec).items():
        jsonschema.Draft202012Validator.check_schema(schema)
        for field, prop in schema.get("properties", {}).items():
            validator = jsonschema.Draft202012Validator(prop)
            for example in prop.get("examples", []):
                assert validator.is_valid(example), (name, field, example)


def _token_create(spec: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/TokenCreate", "components": spec["components"]}
    )


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"admin": True}, True),
        ({"admin": True, "ttl": "1h", "description": "ci"}, True),
        ({"admin": True, "entry_id": None}, True),
        ({}, False),
        ({"admin": False}, False),
        ({"entry_id": None}, False),
        ({"admin": True, "entry_id": "e1"}, False),
        ({"admin": True, "uses": 1}, False),
        ({"entry_id": "e1", "admin": True, "uses": 2}, False),
    ],
    ids=repr,
)
@sqlite_only
def test_token_create_is_one_kind_of_token(
    spec: dict[str, Any],
    client: TestClient,
    admin_headers: dict[str, str],
    body: dict[str, Any],
    valid: bool,
) -> None:
    """The schema's oneOf says what ``create_token`` refuses, and the server agrees."""
    assert _token_create(spec).is_valid(body) is valid
    answer = client.post("/v1/tokens", json=body, headers=admin_headers)
    assert answer.status_code == (201 if valid else 400), answer.text


@pytest.mark.parametrize(
    "body", [{"entry_id": "e1"}, {"entry_id": "e1", "uses": 3, "admin": False}], ids=repr
)
@sqlite_only
def test_a_join_token_body_is_valid(
    spec: dict[str, Any], client: TestClient, admin_headers: dict[str, str], body: dict[str, Any]
) -> None:
    assert _token_create(spec).is_valid(body)
    answer = client.post("/v1/tokens", json=body, headers=admin_headers)
    assert answer.status_code == 404, answer.text  # no such entry: the request itself is good


@sqlite_only
def test_the_empty_values_the_spec_allows_are_taken(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    """``or_empty`` claims "" is read as absent: it is, not refused."""
    answer = client.get("/v1/certificates?after=&expiring_within=&status=", headers=admin_headers)
    assert answer.status_code == 200, answer.text
