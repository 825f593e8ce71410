"""``/v1/gateway``: the REST adapter over ``ca.gateway``, its problem responses and OpenAPI."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from fastapi.testclient import TestClient

from api.app import create_app
from ca import gateway
from ca.audit import list_audit
from ca.certs import get_certificate
from ca.clock import FixedClock
from ca.config import Context
from ca.errors import InvalidInput
from ca.openvpn import InitParams, init_openvpn
from ca.serial import Serial
from ca.tokens import create_admin_token
from tests.api.restkit import assert_problem
from tests.ca.svidkit import unreadable_csr
from tests.gateway.gwkit import partner_csr


class Api:
    def __init__(self, client: TestClient, token: str, ctx: Context, token_id: str) -> None:
        self.client = client
        self.ctx = ctx
        self.token_id = token_id
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(f"/v1/gateway{path}", headers=self.headers, **kwargs)

    def post(
        self, path: str, body: dict[str, Any] | None = None, request_id: str | None = None
    ) -> httpx.Response:
        headers = (
            self.headers if request_id is None else {**self.headers, "X-Request-ID": request_id}
        )
        return self.client.post(f"/v1/gateway{path}", json=body or {}, headers=headers)

    def issue(self, name: str = "acme", **body: Any) -> httpx.Response:
        if "csr" not in body and "pkcs12" not in body:
            body["csr"] = partner_csr()[1].decode()
        return self.post(f"/consumers/{name}/certificates", body)


def _api(ctx: Context) -> Iterator[Api]:
    info, token = create_admin_token(ctx, "tests/gateway")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        yield Api(client, token, ctx, str(info.id))


@pytest.fixture
def api(lite_ctx: Context) -> Iterator[Api]:
    """SQLite, no gateway authority yet: the tests initialise it over REST."""
    yield from _api(lite_ctx)


@pytest.fixture
def api_gw(gw_lite: Context) -> Iterator[Api]:
    yield from _api(gw_lite)


@pytest.fixture
def api_both(gw: Context) -> Iterator[Api]:
    """SQLite and PostgreSQL, gateway initialised, consumer ``acme``."""
    yield from _api(gw)


def test_onboarding_over_rest(api: Api) -> None:
    assert assert_problem(api.get(""), 503)["code"] == "not-initialised"
    # a backend no Trellis has, or one this server has no settings for, is the caller's mistake
    # (400: no retry mends it; docs/api.md)
    unknown = assert_problem(api.post("/init", {"key_backend": "s3"}), 400)
    assert "unknown key backend" in unknown["detail"]
    unconfigured = assert_problem(api.post("/init", {"key_backend": "vault"}), 400)
    assert "TRELLIS_VAULT_ADDR" in unconfigured["detail"]
    assert assert_problem(api.get(""), 503)["code"] == "not-initialised"  # nothing was made
    created = api.post("/init", {"default_ttl": "30d", "max_ttl": "90d"})
    assert created.status_code == 201, created.text
    # who initialised it is recorded (it was "init" on the CAs, and no gateway record at all)
    records = [r for r in list_audit(api.ctx) if r.event in ("ca.created", "gateway.initialised")]
    assert sorted(r.event for r in records) == ["ca.created", "ca.created", "gateway.initialised"]
    assert {r.actor for r in records} == {f"admin-token:{api.token_id}"}
    body = created.json()
    assert (body["authority"], body["default_ttl"], body["max_ttl"]) == ("gateway", "30d", "90d")
    assert api.get("").json() == body
    assert_problem(api.post("/init", {}), 409)
    assert_problem(api.post("/init", {"key_type": "ed25519"}), 400)
    assert_problem(api.post("/init", {"surprise": 1}), 400)

    consumer = api.post("/consumers", {"name": "acme", "contact": "api@acme.example"})
    assert consumer.status_code == 201
    assert consumer.json() | {"created_at": None} == {
        "name": "acme",
        "contact": "api@acme.example",
        "enabled": True,
        "created_at": None,
        "disabled_at": None,
        "live_certificates": 0,
    }
    assert_problem(api.post("/consumers", {"name": "acme"}), 409)
    assert (
        "consumer name" in assert_problem(api.post("/consumers", {"name": "ACME"}), 400)["detail"]
    )

    issued = api.issue(ttl="7d")
    assert issued.status_code == 201, issued.text
    cert = issued.json()
    assert set(cert) == {
        "serial", "consumer", "status", "delivery", "not_before", "not_after",
        "fingerprint_sha256", "x5t#S256", "requested_by", "revoked_at", "revocation_reason",
        "certificate", "chain", "pkcs12", "clamped",
    }  # fmt: skip
    assert (cert["consumer"], cert["status"], cert["delivery"], cert["pkcs12"]) == (
        "acme", "active", "csr", None,
    )  # fmt: skip
    assert cert["requested_by"].startswith("admin-token:")
    leaf = x509.load_pem_x509_certificate(cert["certificate"].encode())
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 7
    shown = api.get(f"/certificates/{cert['serial']}").json()
    assert shown == cert | {"chain": None, "clamped": False}
    assert_problem(api.issue(ttl="91d"), 400)


def test_pkcs12_is_returned_once(api_gw: Api) -> None:
    response = api_gw.issue(pkcs12={"password": "correct horse battery", "legacy": True})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["delivery"] == "pkcs12-legacy"
    bundle = pkcs12.load_pkcs12(base64.b64decode(body["pkcs12"]), b"correct horse battery")
    assert bundle.cert is not None
    assert bundle.cert.certificate == x509.load_pem_x509_certificate(body["certificate"].encode())
    assert api_gw.get(f"/certificates/{body['serial']}").json()["pkcs12"] is None
    short = api_gw.issue(pkcs12={"password": "short"})
    assert "password" in assert_problem(short, 400)["detail"]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"csr": "not a csr"}, 400, "not a valid PEM"),
        ({}, 400, "give a CSR or a PKCS#12 password"),
        ({"csr": "x", "pkcs12": {"password": "correct horse battery"}}, 400, "not both"),
        ({"csr": "x" * 60_001}, 400, "csr"),
        ({"csr": "x", "extra": True}, 400, "extra"),
    ],
    ids=[
        "fail/garbage-csr",
        "fail/nothing",
        "fail/both",
        "fail/csr-too-long",
        "fail/unknown-field",
    ],
)
def test_bad_issue_requests_are_400(
    api_gw: Api, body: dict[str, Any], status: int, text: str
) -> None:
    response = api_gw.post("/consumers/acme/certificates", body)
    assert text in assert_problem(response, status)["detail"]
    assert api_gw.get("/certificates").json() == []


def test_consumer_rules_over_rest(api_both: Api) -> None:
    """On both databases: 409 for a third live certificate, 403 once disabled, 404 unknown."""
    api = api_both
    first, second = api.issue(), api.issue()
    assert first.status_code == second.status_code == 201
    third = assert_problem(api.issue(), 409)
    assert "2 valid certificates" in third["detail"]
    live = api.get("/certificates", params={"consumer": "acme", "live": True}).json()
    assert {c["serial"] for c in live} == {first.json()["serial"], second.json()["serial"]}

    revoked = api.post(
        f"/certificates/{first.json()['serial']}/revoke",
        {"reason": "keyCompromise", "invalidity_date": api.ctx.clock.now().isoformat()},
        request_id="gw-revoke-1",
    )
    assert revoked.status_code == 200, revoked.text
    assert (revoked.json()["status"], revoked.json()["rewritten"]) == ("revoked", [])
    assert revoked.json()["revocation_reason"] == "keyCompromise"
    row = get_certificate(api.ctx, Serial.parse(first.json()["serial"]))
    assert row.revocation_request_id == "gw-revoke-1"
    (record,) = list_audit(api.ctx, event="certificate.revoked")
    assert (record.subject, record.request_id) == (first.json()["serial"], "gw-revoke-1")
    crl = x509.load_pem_x509_crl(api.get("/truststore/nginx").json()["files"]["crl.pem"].encode())
    entry = crl.get_revoked_certificate_by_serial_number(int(first.json()["serial"], 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.InvalidityDate).value.invalidity_date_utc

    assert_problem(api.post(f"/certificates/{first.json()['serial']}/revoke", {}), 409)
    assert api.issue().status_code == 201

    disabled = api.post("/consumers/acme/disable")
    assert disabled.json()["enabled"] is False and disabled.json()["live_certificates"] == 2
    assert assert_problem(api.issue(), 403)["code"] == "forbidden"
    assert_problem(api.issue("globex"), 404)
    assert_problem(api.post("/consumers/globex/disable"), 404)
    assert_problem(api.get("/certificates/abcdef"), 404)
    assert_problem(api.get("/consumers/Not_Valid"), 400)


def test_truststores_and_snippet_over_rest(api_gw: Api) -> None:
    nginx = api_gw.get("/truststore/nginx").json()
    assert nginx["format"] == "nginx" and set(nginx["files"]) == {"client-ca.pem", "crl.pem"}
    assert nginx["files"]["crl.pem"].count("BEGIN X509 CRL") == 2
    for format in ("pem", "aws"):
        files = api_gw.get(f"/truststore/{format}").json()["files"]
        assert len(x509.load_pem_x509_certificates(files["truststore.pem"].encode())) == 2
    assert "README.txt" in api_gw.get("/truststore/kong").json()["files"]
    assert_problem(api_gw.get("/truststore/jks"), 400)

    snippet = api_gw.get("/nginx-snippet", params={"upstream": "http://10.0.0.5:8080"})
    assert snippet.status_code == 200 and snippet.headers["content-type"].startswith("text/plain")
    assert "proxy_pass http://10.0.0.5:8080;" in snippet.text
    assert_problem(api_gw.get("/nginx-snippet", params={"server_name": "a;b"}), 400)
    for bad in ({"listen": "99999"}, {"listen": "0"}, {"truststore": ""}, {"server_name": ""}):
        assert_problem(api_gw.get("/nginx-snippet", params=bad), 400)


def test_every_gateway_route_needs_the_admin_token(api_gw: Api) -> None:
    spec = api_gw.client.get("/openapi.json").json()
    paths = {p: item for p, item in spec["paths"].items() if p.startswith("/v1/gateway")}
    assert len(paths) == 11
    for path, item in paths.items():
        for method, operation in item.items():
            assert operation.get("security"), (method, path)
            for code in ("401", "403"):
                assert "application/problem+json" in operation["responses"][code]["content"]
            url = (
                path.replace("{name}", "acme").replace("{serial}", "ab").replace("{format}", "pem")
            )
            anonymous = api_gw.client.request(method.upper(), url)
            assert_problem(anonymous, 401)
    issue = paths["/v1/gateway/consumers/{name}/certificates"]["post"]["responses"]
    assert {"201", "400", "401", "403", "404", "409", "413"} <= set(issue)
    schema = spec["components"]["schemas"]["GatewayCertOut"]["properties"]
    assert "x5t#S256" in schema


BAD_UPSTREAMS = [
    "http://127.0.0.1:99999",
    "http://127.0.0.1:0",
    "http://127.0.0.1:",
    "http://user:pw@127.0.0.1",
    "http://ünï.example",
    "http://[::1",
    "http://[127.0.0.1]:80",
    "http://1.2.3.4.5",
]


@pytest.mark.parametrize("upstream", BAD_UPSTREAMS)
def test_an_upstream_nginx_refuses_is_400(api_gw: Api, upstream: str) -> None:
    assert_problem(api_gw.get("/nginx-snippet", params={"upstream": upstream}), 400)


@pytest.mark.parametrize(
    "upstream",
    ["http://backend", "https://10.0.0.5:8443/api", "http://[::1]:8080", "http://unix:/run/a.sock"],
)
def test_upstreams_nginx_takes_are_rendered(api_gw: Api, upstream: str) -> None:
    snippet = api_gw.get("/nginx-snippet", params={"upstream": upstream})
    assert f"proxy_pass {upstream};" in snippet.text


def test_revoking_under_an_intermediate_revoked_without_its_key_says_so(api_gw: Api) -> None:
    """Regression: the skipped CRL was only logged. The certificate is revoked all the same
    (the root's CRL lists its issuer); crl_skipped says why, as
    POST /v1/certificates/{serial}/revoke's does."""
    issued = api_gw.issue()
    assert issued.status_code == 201, issued.text
    for key in (api_gw.ctx.settings.data_dir / "keys").glob("gateway-intermediate-*"):
        key.unlink()
    api_gw.ctx.cache.clear()
    emergency = api_gw.client.post(
        "/v1/authorities/gateway/revoke-intermediate", headers=api_gw.headers
    )
    assert emergency.status_code == 200, emergency.text
    revoked = api_gw.client.post(  # no body: {}, as docs/gateway.md's {reason?, ...} says
        f"/v1/gateway/certificates/{issued.json()['serial']}/revoke", headers=api_gw.headers
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revocation_reason"] == "unspecified"
    assert revoked.json()["status"] == "revoked"
    assert "missing from the file key store" in revoked.json()["crl_skipped"]


def _issue_over_time(api: Api, clock: FixedClock) -> list[str]:
    """Five certificates, oldest first, a minute apart but the third and fourth (one second)."""
    for name in ("globex", "initech"):
        assert api.post("/consumers", {"name": name}).status_code == 201
    serials = []
    for i, name in enumerate(["acme", "globex", "acme", "initech", "globex"]):
        if i != 3:
            clock.advance(dt.timedelta(minutes=1))
        issued = api.issue(name)
        assert issued.status_code == 201, issued.text
        serials.append(issued.json()["serial"])
    return serials


def test_listing_pages_through_the_link_header(api_gw: Api, clock: FixedClock) -> None:
    """Regression: the list stopped at 1,000 certificates, silently. The body stays the array
    it was; a page with more after it says where the next begins (RFC 8288 ``rel="next"``,
    ``after`` = its last serial, as ``/v1/certificates``'s ``next_after``)."""
    serials = _issue_over_time(api_gw, clock)
    seen: list[dict[str, Any]] = []
    response = api_gw.get("/certificates", params={"limit": 2})
    while True:
        assert response.status_code == 200, response.text
        assert isinstance(response.json(), list)
        seen += response.json()
        if "next" not in response.links:
            break
        assert len(response.json()) == 2
        following = httpx.URL(response.links["next"]["url"])
        assert following.path == "/v1/gateway/certificates"
        assert following.params["after"] == response.json()[-1]["serial"]
        response = api_gw.client.get(str(following), headers=api_gw.headers)
    listed = [c["serial"] for c in seen]  # newest first, every one once; the tie split
    assert sorted(listed) == sorted(serials) and len(set(listed)) == 5
    assert listed[0] == serials[4] and set(listed[1:3]) == set(serials[2:4])
    assert listed[3:] == [serials[1], serials[0]]
    whole = api_gw.get("/certificates", params={"limit": 1000})
    assert [c["serial"] for c in whole.json()] == listed and "link" not in whole.headers

    # the filters are kept in the next page's link
    first = api_gw.get("/certificates", params={"consumer": "acme", "live": True, "limit": 1})
    assert [c["serial"] for c in first.json()] == [serials[2]]
    following = httpx.URL(first.links["next"]["url"])
    assert dict(following.params) == {
        "consumer": "acme", "live": "true", "limit": "1", "after": serials[2]
    }  # fmt: skip
    rest = api_gw.client.get(str(following), headers=api_gw.headers)
    assert [c["serial"] for c in rest.json()] == [serials[0]] and "next" not in rest.links


def test_listing_refuses_bad_paging(api_gw: Api) -> None:
    assert api_gw.issue().status_code == 201
    for query, detail in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=two", "limit"),
        ("after=not-hex", "invalid serial"),
        (f"after={Serial.generate().hex}", "not there to page after"),
        ("live=yes", "query.live: give true or false"),  # pydantic's bool took it
        ("live=1", "query.live: give true or false"),
        ("live=false&live=true", "'live' is given 2 times"),  # the last one won
        ("limit=1&limit=1000", "'limit' is given 2 times"),
    ]:
        problem = assert_problem(api_gw.get(f"/certificates?{query}"), 400)
        assert detail in problem["detail"], (query, problem)


def test_a_bad_consumer_name_in_the_path_gets_the_parser_s_message(api_gw: Api) -> None:
    """docs/api.md: a path parameter is judged by the same parser as everywhere. The path said
    "path.name: 'ACME' is not a valid value" (a pattern), the body "invalid consumer name"."""
    for name in ("ACME", "x" * 65, "-acme"):
        with pytest.raises(InvalidInput) as parsed:
            gateway.ConsumerName(name)
        expected = parsed.value.detail
        for response in (
            api_gw.get(f"/consumers/{name}"),
            api_gw.post(f"/consumers/{name}/disable"),
            api_gw.issue(name),
        ):
            assert assert_problem(response, 400)["detail"] == expected
    jks = assert_problem(api_gw.get("/truststore/jks"), 400)["detail"]
    assert jks == "truststore format is one of pem, nginx, aws, kong"


def test_a_bad_csr_is_400_before_the_two_certificate_rule(api_gw: Api) -> None:
    """The input is judged first: a garbage CSR for a consumer holding two certificates was
    409 "already holds 2 valid certificates", as if a good one would have been issued."""
    assert api_gw.issue().status_code == api_gw.issue().status_code == 201
    refused = assert_problem(api_gw.issue(csr="not a csr"), 400)
    assert "not a valid PEM" in refused["detail"]
    assert "2 valid certificates" in assert_problem(api_gw.issue(), 409)["detail"]


def test_a_csr_of_another_version_is_400(api_gw: Api, tmp_path: Path) -> None:
    """Regression: a CSR whose version is not v1 (0) was HTTP 500: cryptography refuses it with
    ``InvalidVersion``, which is not the ValueError ``ca.csr`` caught."""
    csr = unreadable_csr(tmp_path, "csr/version-5").decode()
    refused = assert_problem(api_gw.issue(csr=csr), 400)
    assert refused["code"] == "invalid-csr" and "not a valid PEM" in refused["detail"]
    assert api_gw.get("/certificates").json() == []


def test_consumers_wait_for_init_as_everything_else_does(api: Api) -> None:
    refused = assert_problem(api.post("/consumers", {"name": "acme"}), 503)
    assert refused["code"] == "not-initialised" and "trellis gateway init" in refused["detail"]
    assert api.get("/consumers").json() == []


def test_init_refuses_an_openvpn_authority_named_gateway(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: it took one an older Trellis let ``/v1/openvpn/init?authority=gateway`` make
    for its own half-made init, and its partners' certificates chained to the VPN's CA."""
    with monkeypatch.context() as older:
        older.setattr("ca.authority._RESERVED", {})
        init_openvpn(api.ctx, InitParams(name="gateway"))
    refused = assert_problem(api.post("/init", {}), 409)
    assert refused["detail"].startswith("authority 'gateway' has purpose openvpn, not gateway")
    assert assert_problem(api.get(""), 503)["code"] == "not-initialised"
