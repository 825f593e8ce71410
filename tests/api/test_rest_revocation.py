"""Revocation over REST: CRLs and CA certificates (public), OCSP (POST and GET), revoking by
SPIFFE ID, disabling entries, and the emergency switch of the intermediate.

Flows whose outcome lives in the store (who revoked, disabled entries, the emergency) run on
SQLite and PostgreSQL; byte-format checks run on SQLite only.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import urllib.parse
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ca import audit
from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context
from ca.crl import CRL_LIFETIME
from tests.api.restkit import Rest, Svid, assert_problem, bearer, make_csr
from tests.ca.svidkit import SQLITE_ONLY
from tests.ca.test_ocsp import request_der
from tests.certassert import ExpectedUrls, assert_is_crl, assert_is_svid_leaf
from tests.conftest import TRUST_DOMAIN

WEB = "spiffe://example.org/web"
OCSP_RESPONSE = "application/ocsp-response"


def leaf_of(body: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(body["certificate"].encode())


def issuer_of(body: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificates(body["chain"].encode())[0]


def issue(rest: Rest, spiffe_id: str, count: int) -> list[Svid]:
    token = rest.join_token(rest.create_entry(spiffe_id), uses=count)
    svids = []
    for _ in range(count):
        key, csr_pem = make_csr()
        response = rest.request_svid(token, csr_pem)
        assert response.status_code == 200, response.text
        svids.append(Svid(key, response.json()))
    return svids


def get_crl(rest: Rest, selector: str = "intermediate") -> x509.CertificateRevocationList:
    response = rest.client.get(f"/v1/crl/mesh/{selector}.crl")
    assert response.status_code == 200, response.text
    return x509.load_der_x509_crl(response.content)


def ocsp_post(rest: Rest, der: bytes) -> ocsp.OCSPResponse:
    response = rest.client.post(
        "/v1/ocsp", content=der, headers={"Content-Type": "application/ocsp-request"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == OCSP_RESPONSE
    assert response.headers["cache-control"] == "no-store"
    return ocsp.load_der_ocsp_response(response.content)


def ocsp_get(rest: Rest, encoded: str) -> ocsp.OCSPResponse:
    response = rest.client.get(f"/v1/ocsp/{encoded}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == OCSP_RESPONSE
    return ocsp.load_der_ocsp_response(response.content)


def admin_token_id(rest: Rest) -> str:
    response = rest.client.get("/v1/tokens", headers=rest.admin)
    assert response.status_code == 200, response.text
    (admin,) = [t for t in response.json() if t["kind"] == "admin"]
    return str(admin["id"])


# --- CRLs and CA certificates ----------------------------------------------------------------


@SQLITE_ONLY
def test_crls_are_served_as_der_and_pem_without_authentication(
    rest: Rest, ctx: Context, clock: FixedClock
) -> None:
    issuer = active_issuer(ctx)
    response = rest.client.get("/v1/crl/mesh/intermediate.crl")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkix-crl"
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["etag"] == crl_etag(1, response.content)
    crl = x509.load_der_x509_crl(response.content)
    assert_is_crl(
        crl, issuer=issuer.certificate, number=1, signed_at=clock.now(), lifetime=CRL_LIFETIME
    )

    as_pem = rest.client.get("/v1/crl/mesh/intermediate.pem")
    assert as_pem.status_code == 200
    assert as_pem.headers["etag"] == crl_etag(1, as_pem.content)
    assert as_pem.headers["content-type"].startswith("application/x-pem-file")
    assert as_pem.text.startswith("-----BEGIN X509 CRL-----")
    assert x509.load_pem_x509_crl(as_pem.content) == crl

    serial = format(issuer.certificate.serial_number, "x").upper()
    assert rest.client.get(f"/v1/crl/mesh/{serial}.crl").content == response.content
    assert_is_crl(get_crl(rest, "root"), issuer=issuer.roots[0], number=1)

    (svid,) = issue(rest, WEB, 1)
    revoked = rest.client.post(
        f"/v1/certificates/{svid.serial}/revoke", json={"reason": "keyCompromise"},
        headers=rest.admin,
    )  # fmt: skip
    assert revoked.status_code == 200, revoked.text
    after = rest.client.get("/v1/crl/mesh/intermediate.crl")
    assert after.headers["etag"] == crl_etag(2, after.content)
    crl = x509.load_der_x509_crl(after.content)
    assert_is_crl(crl, issuer=issuer.certificate, number=2)
    assert [entry.serial_number for entry in crl] == [int(svid.serial, 16)]


def crl_etag(number: int, body: bytes) -> str:
    return f'"crl-{number}-{hashlib.sha256(body).hexdigest()[:16]}"'


@SQLITE_ONLY
@pytest.mark.parametrize("form", ["crl", "pem"])
def test_a_crl_is_revalidated_with_if_none_match(rest: Rest, form: str) -> None:
    """RFC 9110 §13.1.2: a client holding the current CRL gets 304, with the tag and the cache
    headers and no body; once a revocation changes it, the old tag gets the new CRL."""
    path = f"/v1/crl/mesh/intermediate.{form}"
    first = rest.client.get(path)
    etag = first.headers["etag"]
    for if_none_match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        for method in ("GET", "HEAD"):
            again = rest.client.request(method, path, headers={"If-None-Match": if_none_match})
            assert again.status_code == 304, (method, if_none_match)
            assert again.content == b""
            assert again.headers["etag"] == etag
            assert again.headers["cache-control"] == "public, max-age=300"
    assert rest.client.get(path, headers={"If-None-Match": '"other"'}).content == first.content

    (svid,) = issue(rest, WEB, 1)
    revoked = rest.client.post(
        f"/v1/certificates/{svid.serial}/revoke", json={}, headers=rest.admin
    )
    assert revoked.status_code == 200, revoked.text
    changed = rest.client.get(path, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag and changed.content != first.content


@SQLITE_ONLY
@pytest.mark.parametrize("path", ["/v1/crl/mesh/intermediate.crl", "/v1/bundle.jwks"])
def test_if_none_match_on_several_lines_is_one_list(rest: Rest, path: str) -> None:
    """Regression: only the first ``If-None-Match`` line was read, so a client whose current
    tag was on the second got the whole body again. RFC 9110 §5.3: the lines are one list."""
    etag = rest.client.get(path).headers["etag"]
    for lines in (['"other"', etag], ['"other", "more"', f"W/{etag}"]):
        headers = [("If-None-Match", line) for line in lines]
        again = rest.client.get(path, headers=headers)
        assert again.status_code == 304, lines
        assert again.headers["etag"] == etag
    stale = rest.client.get(path, headers=[("If-None-Match", '"a"'), ("If-None-Match", '"b"')])
    assert stale.status_code == 200 and stale.headers["etag"] == etag


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("path", "same_bytes"),
    [
        ("/v1/crl/mesh/root.crl", True),
        ("/v1/crl/mesh/intermediate.pem", True),
        ("/v1/ca/mesh/root.crt", True),
        ("/v1/bundle", True),
        ("/v1/bundle.jwks", True),
        ("/v1/bundles", True),
        ("/healthz", True),
        ("/readyz", True),
        ("/v1/ocsp/MAo=", False),  # signed anew for each request
        ("/metrics", False),
        ("/v1/crl/other/root.crl", True),  # a problem answer: its headers, no body
    ],
)
def test_every_public_get_answers_head(rest: Rest, path: str, same_bytes: bool) -> None:
    """RFC 9110 §9.1: HEAD is GET without the body, status and headers alike."""
    got = rest.client.get(path)
    head = rest.client.head(path)
    assert head.status_code == got.status_code, head.text
    assert head.content == b""
    names = ["content-type", "etag", "cache-control"]
    names += ["content-length"] if same_bytes else []
    for name in names:
        assert head.headers.get(name) == got.headers.get(name), name
    assert head.headers["x-request-id"]


@SQLITE_ONLY
def test_a_405_names_head_where_get_is_allowed(rest: Rest) -> None:
    response = rest.client.put("/v1/crl/mesh/root.crl")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, HEAD"
    assert rest.client.head("/v1/ocsp").status_code == 405  # POST only: no GET to answer as


@SQLITE_ONLY
def test_a_new_ca_s_first_crl_has_another_etag(rest: Rest, ctx: Context) -> None:
    """``root`` names whichever root is current: the tag of a different CRL must differ (RFC
    9110 §8.8.3). The new root of ``init --force`` bears the old one's name and so goes on with
    its CRL numbers (RFC 5280 §5.2.3)."""
    before = rest.client.get("/v1/crl/mesh/root.crl")
    init_authority(ctx, AuthorityParams(TRUST_DOMAIN, force=True))
    after = rest.client.get("/v1/crl/mesh/root.crl")
    assert after.status_code == 200 and after.content != before.content
    assert after.headers["etag"] == crl_etag(2, after.content) != before.headers["etag"]


@SQLITE_ONLY
def test_ca_certificates_are_served_as_der(rest: Rest, ctx: Context) -> None:
    issuer = active_issuer(ctx)
    for selector, cert in (
        ("intermediate", issuer.certificate),
        ("root", issuer.roots[0]),
        (format(issuer.roots[0].serial_number, "x"), issuer.roots[0]),
    ):
        response = rest.client.get(f"/v1/ca/mesh/{selector}.crt")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/pkix-cert"
        assert x509.load_der_x509_certificate(response.content) == cert


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/v1/crl/mesh/abcdef0123.crl", "no CA"),
        ("/v1/crl/mesh/abcdef0123.pem", "no CA"),
        ("/v1/ca/mesh/abcdef0123.crt", "no CA"),
        ("/v1/crl/other/root.crl", "no authority named 'other'"),
        ("/v1/ca/other/intermediate.crt", "no authority named 'other'"),
    ],
)
def test_an_unknown_ca_is_a_404_problem(rest: Rest, path: str, said: str) -> None:
    assert said in assert_problem(rest.client.get(path), 404)["detail"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    "path",
    [
        "/v1/crl/mesh/nonsense.crl",
        "/v1/crl/mesh/zz.crl",
        "/v1/crl/mesh/ROOT.crl",
        "/v1/crl/mesh/00.crl",
        f"/v1/crl/mesh/{'a' * 65}.pem",
        "/v1/ca/mesh/zz.crt",
        "/v1/ca/mesh/Intermediate.crt",
    ],
)
def test_a_ca_selector_that_is_neither_a_name_nor_hex_is_a_400(rest: Rest, path: str) -> None:
    """Regression: some values got pydantic's 'invalid-request' with the path's regex, others
    (00) Trellis's own: one parser decides, one message."""
    problem = assert_problem(rest.client.get(path), 400)
    assert problem["code"] == "invalid-input"
    assert problem["detail"].endswith(": root, intermediate or a CA serial in hex"), problem


@SQLITE_ONLY
@pytest.mark.parametrize(
    "path", ["/v1/crl/MESH/root.crl", "/v1/crl/Mesh/root.pem", "/v1/ca/MESH/root.crt"]
)
def test_an_authority_name_in_another_case_names_no_authority(rest: Rest, path: str) -> None:
    """An authority name that does not exist is 404 (docs/api.md), in capitals too (it was
    400 with the pattern of a name); the admin routes with {authority} alike."""
    authority = path.split("/")[3]
    problem = assert_problem(rest.client.get(path), 404)
    assert problem["detail"] == f"no authority named {authority!r}"
    assert_problem(rest.client.get(f"/v1/authorities/{authority}", headers=rest.admin), 404)


@SQLITE_ONLY
def test_a_status_filter_that_is_no_status_is_named(rest: Rest) -> None:
    response = rest.client.get("/v1/certificates", params={"status": "bogus"}, headers=rest.admin)
    problem = assert_problem(response, 400)
    assert problem["detail"] == "invalid status 'bogus': active, revoked or expired"


@SQLITE_ONLY
@pytest.mark.parametrize("selector", ["root-and-more", "abc-xyz", "my-intermediate"])
def test_a_selector_with_a_valid_prefix_or_suffix_is_still_a_400(rest: Rest, selector: str) -> None:
    """Regression: the pattern '^[0-9a-fA-F:]+|root|intermediate$' anchored only its first and
    last alternatives, so these reached the database lookup (404) instead of validation."""
    assert_problem(rest.client.get(f"/v1/crl/mesh/{selector}.crl"), 400)


# --- OCSP ------------------------------------------------------------------------------------


def _request_with_awkward_base64(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A request whose standard base64 has '+', '/' and padding: what URL-encoding is for."""
    for attempt in range(500):  # nonces of 16 to 18 octets: padding whatever the serial's length
        der = request_der(leaf, issuer, hashes.SHA256(), nonce=os.urandom(16 + attempt % 3))
        text = base64.b64encode(der).decode()
        if "+" in text and "/" in text and text.endswith("="):
            return der
    raise AssertionError("no nonce gave an awkward base64 encoding")


@SQLITE_ONLY
def test_ocsp_over_post_and_get_in_every_base64_spelling(rest: Rest, ctx: Context) -> None:
    issuer = active_issuer(ctx).certificate
    (svid,) = issue(rest, WEB, 1)
    der = _request_with_awkward_base64(svid.certificate, issuer)
    standard = base64.b64encode(der).decode()
    spellings = {
        "base64url-unpadded": base64.urlsafe_b64encode(der).decode().rstrip("="),
        "base64-url-encoded": urllib.parse.quote(standard, safe=""),  # RFC 6960 §A.1
        "base64-raw-slashes": standard.replace("+", "%2B").replace("=", "%3D"),
    }
    nonce = ocsp.load_der_ocsp_request(der).extensions.get_extension_for_class(x509.OCSPNonce)

    answers = {"post": ocsp_post(rest, der)}
    answers |= {name: ocsp_get(rest, text) for name, text in spellings.items()}
    for name, answer in answers.items():
        assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL, name
        assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD, name
        assert answer.serial_number == svid.certificate.serial_number, name
        echoed = answer.extensions.get_extension_for_class(x509.OCSPNonce)
        assert echoed.value == nonce.value, name

    response = rest.client.post(
        f"/v1/certificates/{svid.serial}/revoke", json={"reason": "superseded"}, headers=rest.admin
    )
    assert response.status_code == 200, response.text
    revoked = ocsp_get(rest, spellings["base64-url-encoded"])
    assert revoked.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert revoked.revocation_reason is x509.ReasonFlags.superseded
    assert ocsp_post(rest, der).certificate_status is ocsp.OCSPCertStatus.REVOKED


@SQLITE_ONLY
@pytest.mark.parametrize(
    "body",
    [b"", b"garbage", b"\x30\x03\x02\x01", b"\x30\x82\x23\x00" + b"\x00" * 9000],
    ids=["empty", "garbage", "truncated-der", "oversized"],
)
def test_a_malformed_ocsp_body_is_a_200_malformed_request(rest: Rest, body: bytes) -> None:
    answer = ocsp_post(rest, body)
    assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@SQLITE_ONLY
def test_a_malformed_ocsp_get_is_a_200_malformed_request(rest: Rest) -> None:
    for encoded in ("not-base64-at-all!", "AAAA", urllib.parse.quote("a b c", safe="")):
        answer = ocsp_get(rest, encoded)
        assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST, encoded


@SQLITE_ONLY
def test_an_ocsp_request_for_two_certificates_gets_an_ocsp_response(
    rest: Rest, ctx: Context
) -> None:
    """Regression: this was a 500 problem (cryptography's NotImplementedError escaped)."""
    issuer = active_issuer(ctx).certificate
    a, b = issue(rest, WEB, 2)
    one = request_der(a.certificate, issuer).hex()
    other = request_der(b.certificate, issuer).hex()
    # Both single requests are SEQUENCE{SEQUENCE{SEQUENCE{Request}}} with short lengths:
    # splice the two Request TLVs into one requestList.
    req_a, req_b = bytes.fromhex(one)[6:], bytes.fromhex(other)[6:]
    body = req_a + req_b
    tbs = b"\x30" + bytes([len(body)]) + body
    outer = b"\x30" + bytes([len(tbs)]) + tbs
    response = rest.client.post("/v1/ocsp", content=b"\x30" + bytes([len(outer)]) + outer)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == OCSP_RESPONSE
    answer = ocsp.load_der_ocsp_response(response.content)
    assert answer.response_status in (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        ocsp.OCSPResponseStatus.SUCCESSFUL,
    )


# --- revoking by SPIFFE ID -------------------------------------------------------------------


def test_revoking_a_spiffe_id_needs_an_admin_and_records_who_and_which_request(
    rest: Rest, ctx: Context
) -> None:
    svids = issue(rest, WEB, 2)
    other = issue(rest, "spiffe://example.org/db", 1)[0]
    join = rest.join_token(rest.create_entry("spiffe://example.org/joiner"))
    body = {"spiffe_id": WEB, "reason": "keyCompromise"}

    assert_problem(rest.client.post("/v1/revocations", json=body), 401)
    assert_problem(rest.client.post("/v1/revocations", json=body, headers=bearer(join)), 403)
    for bad, detail in (
        ({"spiffe_id": WEB, "reason": "because"}, "unknown revocation reason"),
        ({"spiffe_id": "https://example.org/web"}, "SPIFFE ID"),
        ({"spiffe_id": WEB, "extra": 1}, "extra"),
    ):
        response = rest.client.post("/v1/revocations", json=bad, headers=rest.admin)
        assert detail in assert_problem(response, 400)["detail"], response.text
    nobody = {"spiffe_id": "spiffe://example.org/nobody"}
    assert_problem(rest.client.post("/v1/revocations", json=nobody, headers=rest.admin), 404)
    assert all(c["status"] == "active" for c in rest.certificates())  # nothing happened yet

    response = rest.client.post(
        "/v1/revocations", json=body, headers={**rest.admin, "X-Request-ID": "incident-42"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "incident-42"
    revoked = response.json()
    assert sorted(item["serial"] for item in revoked) == sorted(s.serial for s in svids)
    actor = f"admin-token:{admin_token_id(rest)}"
    for item in revoked:
        shown = rest.client.get(f"/v1/certificates/{item['serial']}", headers=rest.admin).json()
        for record in (item, shown):
            assert record["status"] == "revoked"
            assert record["revocation_reason"] == "keyCompromise"
            assert record["revoked_by"] == actor
            assert record["revocation_request_id"] == "incident-42"
            assert record["revoked_at"] is not None
    recorded = {r.subject: r.request_id for r in audit.list_audit(ctx, event="certificate.rev")}
    assert recorded == {s.serial: "incident-42" for s in svids}
    assert {entry.serial_number for entry in get_crl(rest)} == {int(s.serial, 16) for s in svids}
    status = {c["serial"]: c["status"] for c in rest.certificates()}
    assert status[other.serial] == "active"
    # Nothing live is left for that ID.
    assert_problem(rest.client.post("/v1/revocations", json=body, headers=rest.admin), 404)


@SQLITE_ONLY
def test_a_single_revocation_records_its_request_id_and_invalidity_date(
    rest: Rest, ctx: Context
) -> None:
    a, b = issue(rest, WEB, 2)
    compromised = rest.clock.now().replace(microsecond=0) - dt.timedelta(seconds=10)
    local = compromised.astimezone(dt.timezone(dt.timedelta(hours=2)))
    response = rest.client.post(
        f"/v1/certificates/{a.serial}/revoke",
        json={"reason": "keyCompromise", "invalidity_date": local.isoformat()},
        headers={**rest.admin, "X-Request-ID": "req.a:1"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req.a:1"
    shown = rest.client.get(f"/v1/certificates/{a.serial}", headers=rest.admin).json()
    assert shown["revocation_request_id"] == "req.a:1"
    assert shown["invalidity_date"] == compromised.strftime("%Y-%m-%dT%H:%M:%SZ")
    (entry,) = list(get_crl(rest))
    invalidity = entry.extensions.get_extension_for_class(x509.InvalidityDate).value
    assert invalidity.invalidity_date_utc == compromised

    # A request id that is not sane is replaced; the generated one is echoed and recorded.
    response = rest.client.post(
        f"/v1/certificates/{b.serial}/revoke",
        json={},
        headers={**rest.admin, "X-Request-ID": "has spaces; and more"},
    )
    assert response.status_code == 200, response.text
    generated = response.headers["x-request-id"]
    assert generated != "has spaces; and more"
    shown = rest.client.get(f"/v1/certificates/{b.serial}", headers=rest.admin).json()
    assert shown["revocation_request_id"] == generated
    assert shown["invalidity_date"] is None
    recorded = {r.subject: r.request_id for r in audit.list_audit(ctx, event="certificate.rev")}
    assert recorded == {a.serial: "req.a:1", b.serial: generated}


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("invalidity_date", "said"),
    [
        # Regression: a zone-less time reached the store, which refuses naive datetimes: 500.
        ("2025-06-01T12:00:00", "invalidity_date"),
        # RFC 5280 5.3.2: the date the key was, or may have been, compromised.
        ("2999-01-01T00:00:00Z", "in the future"),
        # ... of this certificate's key: not before the certificate was valid.
        ("0001-01-01T00:00:00Z", "before the certificate was valid"),
    ],
    ids=["without-a-zone", "in-the-future", "before-not-before"],
)
def test_a_bad_invalidity_date_is_a_400_and_revokes_nothing(
    rest: Rest, invalidity_date: str, said: str
) -> None:
    (svid,) = issue(rest, WEB, 1)
    response = rest.client.post(
        f"/v1/certificates/{svid.serial}/revoke",
        json={"reason": "keyCompromise", "invalidity_date": invalidity_date},
        headers=rest.admin,
    )
    assert said in assert_problem(response, 400)["detail"]
    shown = rest.client.get(f"/v1/certificates/{svid.serial}", headers=rest.admin).json()
    assert shown["status"] == "active" and shown["invalidity_date"] is None
    assert list(get_crl(rest)) == []


# --- disabled entries ------------------------------------------------------------------------


def test_a_disabled_entry_gets_no_join_and_no_renewal_until_enabled(
    rest: Rest, clock: FixedClock
) -> None:
    entry_id = rest.create_entry(WEB)
    token = rest.join_token(entry_id, uses=3)
    key, csr_pem = make_csr()
    first = rest.request_svid(token, csr_pem)
    assert first.status_code == 200, first.text
    svid = Svid(key, first.json())

    assert_problem(rest.client.post(f"/v1/entries/{entry_id}/disable"), 401)
    assert_problem(rest.client.post(f"/v1/entries/{entry_id}/disable", headers=bearer(token)), 403)
    disabled = rest.client.post(f"/v1/entries/{entry_id}/disable", headers=rest.admin)
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False
    disabled_at = disabled.json()["disabled_at"]
    assert dt.datetime.fromisoformat(disabled_at) == clock.now()
    clock.advance(dt.timedelta(minutes=1))
    again = rest.client.post(f"/v1/entries/{entry_id}/disable", headers=rest.admin).json()
    assert again["disabled_at"] == disabled_at  # disabling twice keeps the first time
    shown = rest.client.get(f"/v1/entries/{entry_id}", headers=rest.admin).json()
    assert (shown["enabled"], shown["disabled_at"]) == (False, disabled_at)

    count = rest.certificate_count()
    assert "disabled" in assert_problem(rest.request_svid(token, make_csr()[1]), 403)["detail"]
    _key, renew_csr = make_csr()
    assert "disabled" in assert_problem(rest.renew(svid, renew_csr), 403)["detail"]
    assert rest.certificate_count() == count
    (listed,) = [t for t in rest.client.get("/v1/tokens", headers=rest.admin).json()
                 if t["entry_id"] == entry_id]  # fmt: skip
    assert listed["uses_remaining"] == 2  # the refused join spent nothing

    enabled = rest.client.post(f"/v1/entries/{entry_id}/enable", headers=rest.admin)
    assert enabled.status_code == 200, enabled.text
    assert (enabled.json()["enabled"], enabled.json()["disabled_at"]) == (True, None)
    assert rest.request_svid(token, make_csr()[1]).status_code == 200
    _key, renew_csr = make_csr()
    assert rest.renew(svid, renew_csr).status_code == 200

    missing = "00000000-0000-0000-0000-000000000000"
    assert_problem(rest.client.post(f"/v1/entries/{missing}/disable", headers=rest.admin), 404)
    assert_problem(rest.client.post(f"/v1/entries/{missing}/enable", headers=rest.admin), 404)


# --- the emergency switch --------------------------------------------------------------------


def test_the_emergency_switch_keeps_the_service_answering(rest: Rest, ctx: Context) -> None:
    svids = issue(rest, WEB, 2)
    old = issuer_of(svids[0].body)
    bundle = rest.client.get("/v1/bundle").text
    path = "/v1/authorities/mesh/revoke-intermediate"
    join = rest.join_token(rest.create_entry("spiffe://example.org/joiner"))

    assert_problem(rest.client.post(path), 401)
    assert_problem(rest.client.post(path, headers=bearer(join)), 403)
    assert_problem(rest.client.post(path, params={"reason": "oops"}, headers=rest.admin), 400)
    assert active_issuer(ctx).certificate == old  # none of those changed anything

    response = rest.client.post(path, headers=rest.admin)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["revoked_serial"] == format(old.serial_number, "x")
    assert result["new_serial"] != result["revoked_serial"]
    assert sorted(i["serial"] for i in result["to_reissue"]) == sorted(s.serial for s in svids)
    assert all(i["status"] == "active" for i in result["to_reissue"])

    # The service keeps answering: issuance (from the new intermediate), the unchanged bundle,
    # the root CRL listing the old intermediate, OCSP on the old one, readiness.
    fresh = rest.request_svid(join, make_csr()[1])
    assert fresh.status_code == 200, fresh.text
    new = issuer_of(fresh.json())
    assert format(new.serial_number, "x") == result["new_serial"]
    assert_is_svid_leaf(leaf_of(fresh.json()), spiffe_id="spiffe://example.org/joiner", issuer=new)
    assert rest.client.get("/v1/bundle").text == bundle
    assert [e.serial_number for e in get_crl(rest, "root")] == [old.serial_number]
    root = x509.load_pem_x509_certificate(bundle.encode())
    answer = ocsp_post(rest, request_der(old, root))
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert rest.client.get("/readyz").status_code == 200

    # A workload on the to-reissue list renews with its current key onto the new intermediate.
    _key, csr_pem = make_csr()
    renewed = rest.renew(svids[0], csr_pem)
    assert renewed.status_code == 200, renewed.text
    assert issuer_of(renewed.json()) == new


@SQLITE_ONLY
def test_the_emergency_switch_records_who_asked_and_the_request_id(
    rest: Rest, ctx: Context
) -> None:
    """Regression: the audit trail said actor "emergency" and no request id, whoever asked."""
    response = rest.client.post(
        "/v1/authorities/mesh/revoke-intermediate",
        params={"reason": "keyCompromise"},
        headers={**rest.admin, "X-Request-ID": "probe-emergency-1"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    records = {r.event: r for r in audit.list_audit(ctx, event="ca.") if r.event != "ca.created"}
    assert set(records) == {"ca.revoked", "ca.activated"}
    actor = f"admin-token:{admin_token_id(rest)}"
    for event, serial in (("ca.revoked", "revoked_serial"), ("ca.activated", "new_serial")):
        record = records[event]
        assert (record.actor, record.request_id) == (actor, "probe-emergency-1")
        assert record.subject.endswith(result[serial])
        assert record.detail["emergency"] is True
        assert record.detail["reason"] == "keyCompromise"


@SQLITE_ONLY
def test_the_emergency_switch_of_an_unknown_authority_is_a_404(rest: Rest) -> None:
    """Regression: this was NotInitialised, a retryable 503, though the route documents 404."""
    response = rest.client.post("/v1/authorities/nope/revoke-intermediate", headers=rest.admin)
    assert_problem(response, 404)


@SQLITE_ONLY
def test_the_emergency_switch_reads_its_body_and_refuses_what_it_does_not_know(
    rest: Rest, ctx: Context
) -> None:
    """Regression: the body was ignored, so {"reason": "keyCompromise", "bogus": 1} revoked the
    intermediate (for good) as cACompromise. The body is read like every revocation's."""
    path = "/v1/authorities/mesh/revoke-intermediate"
    old = active_issuer(ctx).certificate
    for body, params in (
        ({"reason": "keyCompromise", "bogus": 1}, {}),
        ({"reason": "oops"}, {}),
        ({"reason": "keyCompromise"}, {"reason": "keyCompromise"}),
    ):
        response = rest.client.post(path, json=body, params=params, headers=rest.admin)
        assert_problem(response, 400)
        assert active_issuer(ctx).certificate == old  # nothing changed
    response = rest.client.post(path, json={"reason": "keyCompromise"}, headers=rest.admin)
    assert response.status_code == 200, response.text
    (record,) = audit.list_audit(ctx, event="ca.revoked")
    assert record.detail["reason"] == "keyCompromise"
    again = rest.client.post(path, json={}, headers=rest.admin)  # the default reason
    assert again.status_code == 200, again.text
    reasons = sorted(r.detail["reason"] for r in audit.list_audit(ctx, event="ca.revoked"))
    assert reasons == ["cACompromise", "keyCompromise"]


@SQLITE_ONLY
def test_the_emergency_switch_refuses_an_empty_reason_and_certificate_hold(
    rest: Rest, ctx: Context
) -> None:
    """Regression: ``?reason=`` (empty) revoked the intermediate, for good, as cACompromise,
    while the body's ``""`` and the CLI's ``--reason ""`` were refused; and certificateHold, the
    one reason RFC 5280 §5.3.1 makes reversible, was accepted for a revocation nothing undoes.
    Each is refused as the CLI refuses it (tests/cli/test_walkthrough.py), and nothing changes."""
    path = "/v1/authorities/mesh/revoke-intermediate"
    old = active_issuer(ctx).certificate
    hold = "certificateHold is not a reason Trellis revokes for"
    for request, said in (
        ({"params": {"reason": ""}}, "unknown revocation reason ''"),
        ({"json": {"reason": ""}}, "unknown revocation reason ''"),
        ({"params": {"reason": "certificateHold"}}, hold),
        ({"json": {"reason": "certificate-hold"}}, hold),
    ):
        response = rest.client.post(path, headers=rest.admin, **request)
        assert said in assert_problem(response, 400)["detail"], request
    assert active_issuer(ctx).certificate == old
    assert audit.list_audit(ctx, event="ca.revoked") == []


@SQLITE_ONLY
def test_a_ca_serial_may_be_written_with_0x_and_colons(rest: Rest, ctx: Context) -> None:
    """Regression: ``0x<serial>`` was a 400, though serials are accepted "with or without
    colons or 0x" everywhere else."""
    serial = format(active_issuer(ctx).certificate.serial_number, "X")
    colons = ":".join(serial[i : i + 2] for i in range(0, len(serial), 2))
    expected = rest.client.get("/v1/crl/mesh/intermediate.crl").content
    for written in (f"0x{serial}", f"0X{serial.lower()}", colons):
        response = rest.client.get(f"/v1/crl/mesh/{written}.crl")
        assert response.status_code == 200, response.text
        assert response.content == expected
        assert rest.client.get(f"/v1/ca/mesh/{written}.crt").status_code == 200
    assert_problem(rest.client.get("/v1/crl/mesh/0x.crl"), 400)


@SQLITE_ONLY
def test_revoking_under_an_intermediate_revoked_without_its_key(
    rest: Rest, ctx: Context, clock: FixedClock
) -> None:
    """Regression: 503, the SVID stayed active and renewable. It is revoked, saying that its
    issuer's CRL was not re-signed; that issuer's last CRL is served until it expires."""
    one, two = issue(rest, WEB, 2)
    old = issuer_of(one.body)
    last = rest.client.get(f"/v1/crl/mesh/{old.serial_number:x}.crl")
    keys = ctx.settings.data_dir / "keys"
    for path in keys.iterdir():  # the intermediate's key: the one file the root key is not
        if "intermediate" in path.name:
            path.unlink()
    ctx.cache.clear()
    emergency = rest.client.post("/v1/authorities/mesh/revoke-intermediate", headers=rest.admin)
    assert emergency.status_code == 200, emergency.text
    assert emergency.json()["final_crl_skipped"]

    revoked = rest.client.post(
        f"/v1/certificates/{one.serial}/revoke", json={"reason": "keyCompromise"},
        headers=rest.admin,
    )  # fmt: skip
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    assert "missing from the file key store" in revoked.json()["crl_skipped"]
    by_id = rest.client.post("/v1/revocations", json={"spiffe_id": WEB}, headers=rest.admin)
    assert by_id.status_code == 200, by_id.text
    assert [(c["serial"], c["status"]) for c in by_id.json()] == [(two.serial, "revoked")]
    assert by_id.json()[0]["crl_skipped"] == revoked.json()["crl_skipped"]
    renewed = rest.renew(one, make_csr()[1])
    assert_problem(renewed, 401)

    clock.advance(CRL_LIFETIME / 2)  # due for re-signing, still valid
    served = rest.client.get(f"/v1/crl/mesh/{old.serial_number:x}.crl")
    assert served.status_code == 200, served.text
    assert served.content == last.content


# --- revocation pointers resolve against this API --------------------------------------------


@SQLITE_ONLY
def test_the_urls_in_issued_certificates_resolve_here(rest: Rest, ctx: Context) -> None:
    ctx.settings.public_url = "https://trellis.example.test"
    (svid,) = issue(rest, WEB, 1)
    issuer = issuer_of(svid.body)
    serial = format(issuer.serial_number, "x")
    base = "https://trellis.example.test"
    urls = ExpectedUrls(
        crl=f"{base}/v1/crl/mesh/{serial}.crl",
        ocsp=f"{base}/v1/ocsp",
        ca_issuers=f"{base}/v1/ca/mesh/{serial}.crt",
    )
    assert_is_svid_leaf(svid.certificate, spiffe_id=WEB, issuer=issuer, urls=urls)

    crl = rest.client.get(urls.crl.removeprefix(base))
    assert_is_crl(x509.load_der_x509_crl(crl.content), issuer=issuer)
    ca_cert = rest.client.get(urls.ca_issuers.removeprefix(base))
    assert x509.load_der_x509_certificate(ca_cert.content) == issuer
    der = request_der(svid.certificate, issuer)
    response = rest.client.post(urls.ocsp.removeprefix(base), content=der)
    answer = ocsp.load_der_ocsp_response(response.content)
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answer.certificates[0].public_bytes(serialization.Encoding.DER)
