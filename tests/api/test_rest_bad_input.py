"""Bad input at the boundary: each refusal is the right 4xx problem and writes nothing (no
certificate row, the join token keeps its use)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api.app import create_app
from api.limits import MAX_BODY
from ca.clock import FixedClock
from ca.config import Context
from ca.renewal import make_proof
from tests.api.restkit import Rest, assert_problem, bearer, make_csr, tamper_signature
from tests.ca.svidkit import UNREADABLE_CSRS, openssl_rsa_pss_csr, unreadable_csr
from tests.rotation.rotkit import ca_rows
from tests.selfsigned import self_signed


def _certificate_pem() -> str:
    cert, _ = self_signed("not a csr")
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _email_san_csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name("web@example.org")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _csr_body(csr_pem: str, **fields: Any) -> dict[str, Any]:
    return {"csr": csr_pem, **fields}


GOOD = "spiffe://example.org/web"

# (case, status, problem code, builder of the JSON body). Built lazily: keys cost time.
SVID_REFUSALS: list[tuple[str, int, str, Callable[[], Any]]] = [
    ("csr/not-pem", 400, "invalid-csr", lambda: _csr_body("hello")),
    ("csr/empty", 400, "invalid-csr", lambda: _csr_body("")),
    (
        "csr/truncated",
        400,
        "invalid-csr",
        lambda: _csr_body(make_csr()[1].replace("\n", "", 3)[:200]),
    ),
    ("csr/a-certificate", 400, "invalid-csr", lambda: _csr_body(_certificate_pem())),
    # Only the first of these was read: a second CSR, or a certificate after it, was ignored.
    ("csr/two-requests", 400, "invalid-csr", lambda: _csr_body(make_csr()[1] + make_csr()[1])),
    ("csr/then-a-cert", 400, "invalid-csr", lambda: _csr_body(make_csr()[1] + _certificate_pem())),
    ("csr/bad-signature", 400, "invalid-csr", lambda: _csr_body(tamper_signature(make_csr()[1]))),
    (
        "csr/rsa-1024",
        400,
        "invalid-csr",
        lambda: _csr_body(
            make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))[1]
        ),
    ),
    (
        "csr/rsa-exponent-3",
        400,
        "invalid-csr",
        lambda: _csr_body(make_csr(rsa.generate_private_key(public_exponent=3, key_size=2048))[1]),
    ),
    (
        "csr/p521",
        400,
        "invalid-csr",
        lambda: _csr_body(make_csr(ec.generate_private_key(ec.SECP521R1()))[1]),
    ),
    (
        "san/other-spiffe-id",
        400,
        "policy-violation",
        lambda: _csr_body(make_csr(uris=["spiffe://example.org/admin"])[1]),
    ),
    (
        "san/foreign-trust-domain",
        400,
        "policy-violation",
        lambda: _csr_body(make_csr(uris=["spiffe://other.org/web"])[1]),
    ),
    (
        "san/two-uris",
        400,
        "policy-violation",
        lambda: _csr_body(make_csr(uris=[GOOD, "spiffe://example.org/other"])[1]),
    ),
    (
        "san/invalid-spiffe-id",
        400,
        "invalid-spiffe-id",
        lambda: _csr_body(make_csr(uris=["spiffe://example.org/web/"])[1]),
    ),
    (
        "san/dns-not-in-entry",
        400,
        "policy-violation",
        lambda: _csr_body(make_csr(dns_names=["evil.example.org"])[1]),
    ),
    ("san/email", 400, "policy-violation", lambda: _csr_body(_email_san_csr())),
    ("ttl/above-max", 400, "policy-violation", lambda: _csr_body(make_csr()[1], ttl="25h")),
    ("ttl/syntax", 400, "invalid-input", lambda: _csr_body(make_csr()[1], ttl="1 hour")),
    ("ttl/negative", 400, "invalid-input", lambda: _csr_body(make_csr()[1], ttl="-1h")),
    ("ttl/zero", 400, "invalid-input", lambda: _csr_body(make_csr()[1], ttl="0s")),
    ("ttl/overflow", 400, "invalid-input", lambda: _csr_body(make_csr()[1], ttl="9999999999y")),
    ("json/unknown-field", 400, "invalid-request", lambda: _csr_body(make_csr()[1], dns=["x"])),
    ("json/missing-csr", 400, "invalid-request", lambda: {"ttl": "1h"}),
    ("json/csr-not-string", 400, "invalid-request", lambda: {"csr": 42}),
    ("json/not-an-object", 400, "invalid-request", lambda: [make_csr()[1]]),
    ("json/csr-over-60000", 400, "invalid-request", lambda: _csr_body("A" * 60_001)),
]


def test_svid_refusals_write_nothing_and_keep_the_token(rest: Rest) -> None:
    token = rest.join_token(rest.create_entry(GOOD, dns_names=["web.example.org"]))
    for case, status, code, body in SVID_REFUSALS:
        response = rest.client.post("/v1/svid", json=body(), headers=bearer(token))
        assert response.status_code == status, (case, response.text)
        assert assert_problem(response, status)["code"] == code, case
    malformed = [
        ("json/syntax", b'{"csr": '),
        ("json/empty-body", b""),
        ("json/not-utf-8", b'\xff\xfe{"csr":1}'),
        ("json/lone-byte", b'"\xff"'),
        ("json/nested-too-deep", b"[" * 5000 + b"]" * 5000),
    ]
    for case, raw in malformed:
        response = rest.client.post(
            "/v1/svid",
            content=raw,
            headers=bearer(token) | {"Content-Type": "application/json"},
        )
        assert response.status_code == 400, (case, response.text)
        assert assert_problem(response, 400)["code"] == "invalid-request", case
        renewal = rest.client.post(  # the same reading, before any proof is looked at
            "/v1/svid/renew", content=raw, headers={"Content-Type": "application/json"}
        )
        assert renewal.status_code in (400, 401), (case, renewal.text)
        problem = assert_problem(renewal, renewal.status_code)
        if renewal.status_code == 400:
            assert problem["code"] == "invalid-request", case

    assert rest.certificate_count() == 0
    (token_row,) = [
        t for t in rest.client.get("/v1/tokens", headers=rest.admin).json() if t["kind"] == "join"
    ]
    assert token_row["uses_remaining"] == 1
    # Still usable; used once, it is spent.
    assert rest.request_svid(token, make_csr()[1]).status_code == 200
    assert_problem(rest.request_svid(token, make_csr()[1]), 401)
    assert rest.certificate_count() == 1


def test_a_body_fastapi_cannot_read_is_invalid_request(rest: Rest) -> None:
    """Regression: JSON nested past the parser's recursion limit was 400 with code
    ``http-error`` and FastAPI's message as its title on the routes FastAPI reads, where
    docs/api.md promises ``invalid-request`` for a body that does not parse."""
    for path in ("/v1/entries", "/v1/tokens", "/v1/revocations"):
        for case, raw in [
            ("json/nested-too-deep", b"[" * 30_000 + b"]" * 30_000),
            ("json/nested-objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
            ("json/syntax", b'{"spiffe_id": '),
        ]:
            response = rest.client.post(
                path, content=raw, headers=rest.admin | {"Content-Type": "application/json"}
            )
            problem = assert_problem(response, 400)
            got = (problem["code"], problem["title"])
            assert got == ("invalid-request", "Invalid request"), (path, case, problem)


def test_svid_keys_trellis_must_not_certify_are_refused_naming_the_accepted_ones(
    rest: Rest, tmp_path: Path
) -> None:
    """Regression: an RSA key of a size that is no KeyType (2056 bits) was certified, but
    ``svid renew`` and the agent renew into a fresh key of the SVID's KeyType and failed on it;
    an RSA-PSS-only key was certified as plain rsaEncryption with keyEncipherment, dropping the
    PSS-only restriction its holder asked for (RFC 4055 §1.2). Both are 400s that name what is
    accepted, at bootstrap and at renewal, and write nothing."""
    svid = rest.enrol("spiffe://example.org/renewing")
    token = rest.join_token(rest.create_entry(GOOD))
    odd = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=2056))[1]
    cases = [
        ("rsa-2056", odd, "RSA key of 2056 bits", "2048, 3072 or 4096"),
        ("rsa-pss", openssl_rsa_pss_csr(tmp_path).decode(), "RSA-PSS", "rsaEncryption"),
    ]
    for case, csr, refused, accepted in cases:
        der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
        proof = make_proof(
            svid.certificate, svid.key, hashlib.sha256(der).digest(), rest.clock.now()
        )
        for path, credential in (("/v1/svid", token), ("/v1/svid/renew", proof)):
            response = rest.client.post(path, json={"csr": csr}, headers=bearer(credential))
            problem = assert_problem(response, 400)
            assert problem["code"] == "invalid-csr", (case, path, problem)
            assert refused in problem["detail"] and accepted in problem["detail"], (case, path)
    assert rest.certificate_count() == 1  # the enrolled SVID only
    assert rest.request_svid(token, make_csr()[1]).status_code == 200  # the token kept its use


def _unsigned_proof(serial: str) -> str:
    """A JWT with ``alg: none`` naming ``serial``: what anyone can send, holding no key."""
    parts = [{"alg": "none", "typ": "trellis-renew+jwt"}, {"sub": serial}]
    encoded = [base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=") for p in parts]
    return (b".".join(encoded) + b".").decode()


@pytest.mark.parametrize("case", UNREADABLE_CSRS, ids=UNREADABLE_CSRS)
def test_csrs_cryptography_refuses_with_its_own_errors_are_invalid_csr(
    rest: Rest, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """Regression: a CSR whose version is not v1, or that holds two subjectAltName extensions
    or an x400Address/ediPartyName SAN, was HTTP 500 with an "unhandled error" traceback in the
    log: cryptography refuses them with exceptions that are not ValueErrors. Anyone could
    fill the log through /v1/svid/renew with a proof signed by nobody. It is bad input: a
    proof that does not verify is 401 whatever the CSR, a join token or a genuine proof gets
    400 ``invalid-csr``, and nothing is written or spent."""
    svid = rest.enrol(GOOD)
    token = rest.join_token(rest.create_entry("spiffe://example.org/other"))
    csr = unreadable_csr(tmp_path, case).decode()
    # The proofs bind the DER, read from the PEM's base64: cryptography will not load them all.
    digest = hashlib.sha256(base64.b64decode("".join(csr.splitlines()[1:-1]))).digest()
    genuine = make_proof(svid.certificate, svid.key, digest, rest.clock.now())
    nobody = ec.generate_private_key(ec.SECP256R1())
    forged = make_proof(svid.certificate, nobody, digest, rest.clock.now())
    with caplog.at_level(logging.ERROR):
        for proof in (_unsigned_proof(svid.serial), forged):
            response = rest.client.post("/v1/svid/renew", json={"csr": csr}, headers=bearer(proof))
            assert assert_problem(response, 401)["code"] == "unauthenticated", case
        for path, credential in (("/v1/svid", token), ("/v1/svid/renew", genuine)):
            response = rest.client.post(path, json={"csr": csr}, headers=bearer(credential))
            problem = assert_problem(response, 400)
            assert problem["code"] == "invalid-csr", (path, problem)
            expected = "not a valid PEM" if case == "csr/version-5" else "cannot be parsed"
            assert expected in problem["detail"], (path, problem)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert rest.certificate_count() == 1  # the enrolled SVID only
    tokens = rest.client.get("/v1/tokens", headers=rest.admin).json()
    uses = sorted(t["uses_remaining"] for t in tokens if t["kind"] == "join")
    assert uses == [0, 1]  # the enrolment's, and this one's, unspent
    assert rest.request_svid(token, make_csr()[1]).status_code == 200
    assert rest.renew(svid, make_csr()[1]).status_code == 200


def test_expired_join_token_is_401(rest: Rest, clock: FixedClock) -> None:
    token = rest.join_token(rest.create_entry())
    clock.advance(dt.timedelta(hours=1))

    body = assert_problem(rest.request_svid(token, make_csr()[1]), 401)
    assert "expired" in body["detail"]
    assert rest.certificate_count() == 0


def _big_svid_body(size: int) -> bytes:
    body = json.dumps({"csr": "A" * size}).encode()
    assert len(body) > MAX_BODY
    return body


def test_oversized_bodies_are_413_problems(rest: Rest) -> None:
    token = rest.join_token(rest.create_entry())
    big = _big_svid_body(MAX_BODY)
    json_headers = {"Content-Type": "application/json"}

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    attempts = [
        ("content-length/svid", "/v1/svid", big, bearer(token)),
        ("content-length/admin", "/v1/entries", big, rest.admin),
        ("content-length/unauthenticated", "/v1/entries", big, {}),
        ("chunked/svid", "/v1/svid", chunks(), bearer(token)),
    ]
    for case, path, content, headers in attempts:
        response = rest.client.post(path, content=content, headers=headers | json_headers)
        assert response.status_code == 413, (case, response.text)
        problem = assert_problem(response, 413)
        assert problem["code"] == "payload-too-large"
        # Rendered as every other problem is (api.problems), with the request id docs/api.md
        # says every problem body repeats (it had none, and other JSON spacing).
        assert problem["request_id"] == response.headers["x-request-id"], case
        assert response.content == json.dumps(problem, separators=(",", ":")).encode(), case
        if case.startswith("chunked"):
            assert "content-length" not in response.request.headers

    # Exactly 64 KiB passes the limit (and then fails validation: the CSR field is too long).
    overhead = len(json.dumps({"csr": ""}).encode())
    at_limit = json.dumps({"csr": "A" * (MAX_BODY - overhead)}).encode()
    assert len(at_limit) == MAX_BODY
    response = rest.client.post("/v1/svid", content=at_limit, headers=bearer(token) | json_headers)
    assert assert_problem(response, 400)["code"] == "invalid-request"

    assert rest.certificate_count() == 0
    assert len(rest.client.get("/v1/entries", headers=rest.admin).json()) == 1
    assert rest.request_svid(token, make_csr()[1]).status_code == 200


def test_streamed_body_over_the_limit_gets_exactly_one_response(ctx: Context) -> None:
    """Raw ASGI, several chunks and no Content-Length: the middleware answers 413 once and drops
    whatever the application tries to send after being told the client went away."""
    app = create_app(ctx)
    chunk = b"x" * 20_000
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": True} for _ in range(5)
    ]
    incoming[-1]["more_body"] = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/svid",
        "raw_path": b"/v1/svid",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]

    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [413]
    (body,) = [m for m in sent if m["type"] == "http.response.body"]
    assert json.loads(body["body"])["status"] == 413
    assert json.loads(body["body"])["request_id"]
    assert len(incoming) == 1  # stopped reading at the first chunk past the limit


def test_token_requests_take_no_look_alike_values(rest: Rest) -> None:
    """ "admin": "yes" (or 1) was read as true and minted an admin token; "uses": "2" as 2."""
    entry = rest.create_entry(GOOD)
    before = rest.client.get("/v1/tokens", headers=rest.admin).json()
    for body in (
        {"admin": "yes"},
        {"admin": 1},
        {"admin": "true"},
        {"entry_id": entry, "uses": "2"},
        {"entry_id": entry, "uses": True},
        {"entry_id": entry, "uses": 2.0},
    ):
        response = rest.client.post("/v1/tokens", json=body, headers=rest.admin)
        assert_problem(response, 400)
    assert rest.client.get("/v1/tokens", headers=rest.admin).json() == before
    made = rest.client.post("/v1/tokens", json={"admin": True}, headers=rest.admin)
    assert made.status_code == 201 and made.json()["kind"] == "admin", made.text


def test_an_entry_id_is_read_the_same_way_everywhere(rest: Rest) -> None:
    """An entry found as GET /v1/entries/{ID in upper case} gets a token by that id too."""
    entry = rest.create_entry(GOOD)
    upper = entry.upper()
    assert rest.client.get(f"/v1/entries/{upper}", headers=rest.admin).status_code == 200
    token = rest.client.post("/v1/tokens", json={"entry_id": upper}, headers=rest.admin)
    assert token.status_code == 201, token.text
    assert token.json()["entry_id"] == entry
    assert rest.request_svid(token.json()["token"], make_csr()[1]).status_code == 200
    missing = rest.client.post("/v1/tokens", json={"entry_id": "not-an-id"}, headers=rest.admin)
    assert_problem(missing, 404)


def test_a_value_its_pattern_refuses_is_named_without_the_pattern(rest: Rest) -> None:
    """The patterns left on parameters (the OpenVPN authority of ``?authority=``) are the
    server's business: the detail named the regex, as pydantic words it. (A gateway consumer's
    name in the path, the example here before, is judged by ``ConsumerName`` now.)"""
    response = rest.client.get("/v1/openvpn?authority=Not%20A%20Name", headers=rest.admin)
    problem = assert_problem(response, 400)
    assert problem["detail"] == "query.authority: 'Not A Name' is not a valid value"


def test_rotate_reads_its_body_as_revoke_intermediate_does(rest: Rest, ctx: Context) -> None:
    """Regression: the body was ignored, so {"force": true} answered 200 [] having done
    nothing, and JSON that does not parse was 200. It is read like revoke-intermediate's: an
    optional {"force": bool}, unknown fields, non-booleans and bad JSON refused (400), changing
    nothing; ?force= stays for callers without a body, but not beside one."""
    path = "/v1/authorities/mesh/rotate"
    json_type = {**rest.admin, "content-type": "application/json"}
    refused: list[dict[str, Any]] = [
        {"content": b"{nope", "headers": json_type},
        {"content": b"{nope", "headers": rest.admin},  # curl -d: form-encoded
        {"json": {"force": True, "bogus": 1}, "headers": rest.admin},
        {"json": {"force": "yes"}, "headers": rest.admin},
        {"json": [True], "headers": rest.admin},
        {"json": {"force": True}, "params": {"force": "true"}, "headers": rest.admin},
    ]
    for request in refused:
        assert_problem(rest.client.post(path, **request), 400)
    assert [row.state for row in ca_rows(ctx)] == ["active"], "a refused request rotated"

    prepared = rest.client.post(path, json={"force": True}, headers=rest.admin)
    assert prepared.status_code == 200, prepared.text
    assert [t["event"] for t in prepared.json()] == ["prepared"]
    activated = rest.client.post(path, json={}, params={"force": "true"}, headers=rest.admin)
    assert sorted(t["event"] for t in activated.json()) == ["activated", "retired"]
    for nothing_due in ({"json": {}}, {"json": {"force": False}}, {}):
        answer = rest.client.post(path, headers=rest.admin, **nothing_due)
        assert answer.status_code == 200 and answer.json() == [], answer.text


def test_a_query_boolean_is_true_or_false_given_once(rest: Rest, ctx: Context) -> None:
    """Regression: ``?force=`` took whatever pydantic's bool takes (yes, 1, TRUE, on), so each
    forced a rotation while the body's {"force": "yes"} or {"force": 1} is 400; and of
    ``?force=false&force=true`` the last won, forcing. docs/api.md promises ``?force=true``.
    Every query parameter an operation reads is given once at most (the emergency switch's
    ``reason`` too), so what a proxy logged is what was done."""
    path = "/v1/authorities/mesh/rotate"
    for query in ("force=yes", "force=1", "force=TRUE", "force=True", "force=on", "force="):
        problem = assert_problem(rest.client.post(f"{path}?{query}", headers=rest.admin), 400)
        assert problem["detail"] == "query.force: give true or false", (query, problem)
    for query in ("force=false&force=true", "force=true&force=true"):
        problem = assert_problem(rest.client.post(f"{path}?{query}", headers=rest.admin), 400)
        assert problem["detail"] == "query parameter 'force' is given 2 times: give it once"
    twice = "/v1/authorities/mesh/revoke-intermediate?reason=superseded&reason=keyCompromise"
    assert (
        "given 2 times"
        in assert_problem(rest.client.post(twice, headers=rest.admin), 400)["detail"]
    )
    assert [row.state for row in ca_rows(ctx)] == ["active"], "a refused request changed the CA"

    nothing = rest.client.post(f"{path}?force=false", headers=rest.admin)
    assert nothing.status_code == 200 and nothing.json() == [], nothing.text
    prepared = rest.client.post(f"{path}?force=true", headers=rest.admin)
    assert [t["event"] for t in prepared.json()] == ["prepared"], prepared.text
