"""``/v1/openvpn/...`` over HTTP (in-process ``TestClient``), on SQLite and PostgreSQL: the same
operations as the CLI, problem documents for every refusal, the public CRL endpoint, and what
OpenAPI says about them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.app import create_app
from api.schemas.openvpn import ClientOut, ClientRevokedOut, OpenVpnOut, ServerConfigOut
from ca.audit import list_audit
from ca.certs import list_certificates
from ca.config import Context
from ca.store.models_openvpn import OpenVpnRow
from ca.tokens import create_admin_token
from tests.api.restkit import assert_problem, bearer
from tests.ca.svidkit import SQLITE_ONLY
from tests.openvpn.vpnkit import crls_in, parse_profile

OVPN = "application/x-openvpn-profile"


@pytest.fixture
def api(ctx: Context) -> Iterator[TestClient]:
    _info, secret = create_admin_token(ctx, "tests/openvpn")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        client.headers.update(bearer(secret))
        yield client


def _ready(api: TestClient, crl: Path) -> None:
    assert api.post("/v1/openvpn/init", json={}).status_code == 201
    body = {"remote": "vpn.example.org", "port": 1194, "proto": "udp", "crl_path": str(crl)}
    response = api.patch("/v1/openvpn", json=body)
    assert response.status_code == 200, response.text


def test_onboarding_and_offboarding(api: TestClient, ctx: Context, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    _ready(api, crl)
    shown = api.get("/v1/openvpn").json()
    assert set(shown) == set(OpenVpnOut.model_fields)
    assert shown["crl_path"] == str(crl.resolve()) and shown["key_store"] == "file"

    created = api.post("/v1/openvpn/clients", json={"name": "alice"})
    assert created.status_code == 201, created.text
    assert created.headers["content-type"].startswith(OVPN)
    assert created.headers["content-disposition"] == 'attachment; filename="alice.ovpn"'
    assert created.headers["cache-control"] == "no-store"
    profile = parse_profile(created.text)
    assert "remote vpn.example.org 1194" in profile.directives
    serial = format(profile.certificates("cert")[0].serial_number, "x")
    assert created.headers["x-certificate-serial"] == serial

    listed = api.get("/v1/openvpn/clients").json()
    assert [set(item) for item in listed] == [set(ClientOut.model_fields)]
    assert (listed[0]["name"], listed[0]["status"], listed[0]["serial"]) == (
        "alice",
        "active",
        serial,
    )

    renewed = api.post("/v1/openvpn/clients/alice/renew", json={"ttl": "7d"})
    assert renewed.status_code == 200 and renewed.headers["content-type"].startswith(OVPN)
    new_serial = renewed.headers["x-certificate-serial"]
    assert new_serial != serial

    revoked = api.post(
        "/v1/openvpn/clients/alice/revoke",
        json={"reason": "keyCompromise"},
        headers={"X-Request-ID": "offboard-alice"},
    )
    assert revoked.status_code == 200, revoked.text
    body = revoked.json()
    assert set(body) == set(ClientRevokedOut.model_fields)
    assert [c["serial"] for c in body["revoked"]] == [new_serial]
    assert body["revoked"][0]["revoked_by"].startswith("admin-token:")
    assert body["revoked"][0]["revocation_request_id"] == "offboard-alice"
    (record,) = [r for r in list_audit(ctx, event="certificate.revoked") if r.subject == new_serial]
    assert record.request_id == "offboard-alice"
    assert body["revoked"][0]["spiffe_id"] == "CN=alice"
    assert body["crl_path"] == str(crl.resolve()) and body["crl_error"] is None
    on_file = {entry.serial_number for c in crls_in(crl.read_bytes()) for entry in c}
    assert on_file == {int(serial, 16), int(new_serial, 16)}

    public = TestClient(api.app)  # no credential
    pem = public.get("/v1/openvpn/crl.pem")
    assert pem.status_code == 200 and pem.headers["content-type"] == "application/x-pem-file"
    assert pem.content == crl.read_bytes()


def test_refusals_are_problems(api: TestClient, tmp_path: Path) -> None:
    assert_problem(api.get("/v1/openvpn"), 404)
    unknown = assert_problem(api.post("/v1/openvpn/init", json={"key_backend": "s3"}), 400)
    assert "unknown key backend" in unknown["detail"]
    # a backend this server has no settings for: the caller's choice to mend, not an outage
    novault = assert_problem(api.post("/v1/openvpn/init", json={"key_backend": "vault"}), 400)
    assert "needs TRELLIS_VAULT_ADDR" in novault["detail"]
    assert_problem(api.get("/v1/openvpn"), 404)  # nothing was made
    assert_problem(api.post("/v1/openvpn/clients", json={"name": "alice"}), 404)
    _ready(api, tmp_path / "crl.pem")
    assert_problem(api.post("/v1/openvpn/init", json={}), 409)
    assert api.post("/v1/openvpn/clients", json={"name": "alice"}).status_code == 201
    duplicate = assert_problem(api.post("/v1/openvpn/clients", json={"name": "alice"}), 409)
    assert "live certificate" in duplicate["detail"]
    for bad in (
        {"name": "-rf"},
        {"name": "a b"},
        {"name": "x", "tls_crypt": "v9"},
        {"name": "x", "ttl": "forever"},
        {"name": "x", "surprise": 1},
    ):
        assert_problem(api.post("/v1/openvpn/clients", json=bad), 400)
    assert_problem(api.patch("/v1/openvpn", json={"port": 0}), 400)
    assert_problem(api.patch("/v1/openvpn", json={"remote": "a b"}), 400)
    assert_problem(api.post("/v1/openvpn/clients/bob/renew", json={}), 404)
    assert_problem(api.post("/v1/openvpn/clients/bob/revoke", json={}), 404)
    assert_problem(api.post("/v1/openvpn/clients/alice/revoke", json={"reason": "bored"}), 400)
    assert_problem(api.post("/v1/openvpn/server-config", json={"network": "10.0.0.0/33"}), 400)
    anonymous = TestClient(api.app)
    assert_problem(anonymous.get("/v1/openvpn/clients"), 401)
    assert_problem(anonymous.post("/v1/openvpn/clients", json={"name": "eve"}), 401)
    assert_problem(anonymous.get("/v1/openvpn/crl.pem?authority=mesh2"), 404)
    # Regression: the mesh CA's CRLs were served as if mesh were an OpenVPN authority.
    mesh = assert_problem(anonymous.get("/v1/openvpn/crl.pem?authority=mesh"), 404)
    assert mesh["detail"].startswith("no OpenVPN authority 'mesh'")
    assert mesh["detail"] == assert_problem(api.get("/v1/openvpn?authority=mesh"), 404)["detail"]


def test_a_crl_path_that_server_conf_cannot_hold_is_refused_and_changes_nothing(
    api: TestClient, tmp_path: Path
) -> None:
    """The CRL path goes into server.conf as ``crl-verify PATH`` and is written by a job for
    ever after: a line break in it would add a directive of the caller's choosing."""
    crl = tmp_path / "crl.pem"
    _ready(api, crl)
    before, files = api.get("/v1/openvpn").json(), sorted(tmp_path.rglob("*"))
    for bad in (
        f"{tmp_path}/x\ncrl-verify /etc/passwd",
        f"{tmp_path}/x\nscript-security 2",
        f"{tmp_path}/a b/crl.pem",
        f"{tmp_path}/tab\there",
        f'{tmp_path}/"quoted"',
        f"{tmp_path}/back\\slash",
        f"{tmp_path}/#comment",
        "relative/crl.pem",
        "crl.pem",
    ):
        problem = assert_problem(api.patch("/v1/openvpn", json={"crl_path": bad}), 400)
        assert "server.conf" in problem["detail"] or "absolute" in problem["detail"], problem
    assert api.get("/v1/openvpn").json() == before
    assert sorted(tmp_path.rglob("*")) == files  # nothing written anywhere
    conf = api.post("/v1/openvpn/server-config", json={"cn": "vpnserver"})
    assert conf.status_code == 201, conf.text
    server_conf = conf.json()["files"]["server.conf"]
    assert f"crl-verify {crl.resolve()}" in server_conf
    assert "/etc/passwd" not in server_conf and "script-security" not in server_conf


def test_server_files(api: TestClient, tmp_path: Path) -> None:
    _ready(api, tmp_path / "crl.pem")
    assert_problem(api.post("/v1/openvpn/server-cert", json={"cn": "bad name"}), 400)
    cert = api.post("/v1/openvpn/server-cert", json={"cn": "vpn.example.org"})
    assert cert.status_code == 201, cert.text
    assert set(cert.json()) == {"common_name", "serial", "expires_at", "certificate", "key"}
    config = api.post("/v1/openvpn/server-config", json={"network": "10.7.0.0/24"})
    assert config.status_code == 201, config.text
    body: dict[str, Any] = config.json()
    assert set(body) == set(ServerConfigOut.model_fields)
    assert "server 10.7.0.0 255.255.255.0" in body["files"]["server.conf"]
    assert body["private"] == ["server.key", "tls-crypt-v2.key", "tls-crypt.key"]
    # clients pin the server CN given last
    ovpn = api.post("/v1/openvpn/clients", json={"name": "bob", "tls_crypt": "shared"}).text
    assert "verify-x509-name vpn.example.org name" in parse_profile(ovpn).directives


def test_openapi_documents_the_openvpn_operations(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    operations = spec["paths"]
    add = operations["/v1/openvpn/clients"]["post"]["responses"]
    assert {"201", "400", "401", "403", "409", "413"} <= set(add)
    assert OVPN in add["201"]["content"]
    assert "application/problem+json" in add["409"]["content"]
    assert "security" not in operations["/v1/openvpn/crl.pem"]["get"]
    assert "security" in operations["/v1/openvpn/clients/{name}/revoke"]["post"]


def test_refusals_over_rest(api: TestClient, tmp_path: Path) -> None:
    _ready(api, tmp_path / "crl.pem")
    for network in ("10.8.0.0/31", "0.0.0.0/0", "fd00::/64", ""):
        response = api.post("/v1/openvpn/server-config", json={"network": network})
        assert_problem(response, 400)
    assert_problem(api.post("/v1/openvpn/server-cert", json={"cn": ""}), 400)
    assert_problem(api.patch("/v1/openvpn", json={"server_cn": ""}), 400)
    assert api.post("/v1/openvpn/clients", json={"name": "alice"}).status_code == 201
    bodiless = api.post("/v1/openvpn/clients/alice/revoke")  # no body: {}, as docs say {reason?}
    assert bodiless.status_code == 200, bodiless.text
    assert bodiless.json()["revoked"][0]["revocation_reason"] == "cessationOfOperation"
    assert_problem(api.post("/v1/openvpn/clients/alice/revoke", json={}), 409)
    assert_problem(api.post("/v1/openvpn/clients/nobody/revoke", json={}), 404)


@SQLITE_ONLY
def test_revoking_a_client_of_an_intermediate_revoked_without_its_key_says_so(
    api: TestClient, ctx: Context, tmp_path: Path
) -> None:
    """Regression: the skipped CRL was only logged. The client is revoked all the same (the
    root's CRL lists its issuer); each revoked certificate's crl_skipped says why, as
    POST /v1/certificates/{serial}/revoke's does."""
    _ready(api, tmp_path / "crl.pem")
    assert api.post("/v1/openvpn/clients", json={"name": "alice"}).status_code == 201
    for key in (ctx.settings.data_dir / "keys").glob("vpn-intermediate-*"):
        key.unlink()
    ctx.cache.clear()
    emergency = api.post("/v1/authorities/vpn/revoke-intermediate")
    assert emergency.status_code == 200, emergency.text
    revoked = api.post("/v1/openvpn/clients/alice/revoke", json={})
    assert revoked.status_code == 200, revoked.text
    (item,) = revoked.json()["revoked"]
    assert item["status"] == "revoked"
    assert "missing from the file key store" in item["crl_skipped"]


def test_a_remote_that_cannot_be_a_cn_needs_a_server_cn(
    api: TestClient, ctx: Context, tmp_path: Path
) -> None:
    """Profiles pin the server CN, else the remote: an IPv6 remote pinned ``verify-x509-name ::1
    name``, a name no server certificate can have (server-config refuses it as a CN), so every
    client profile failed. configure refuses such a remote without a server CN, and a remote
    stored before that (or by an older version) stops client add before anything is issued."""
    assert api.post("/v1/openvpn/init", json={}).status_code == 201
    for remote in ("::1", "2001:db8::7", "a" * 63 + "." + "b" * 10):
        refused = assert_problem(api.patch("/v1/openvpn", json={"remote": remote}), 400)
        assert "cannot be the server's CN" in refused["detail"], refused
    assert api.get("/v1/openvpn").json()["remote"] is None
    body = {"remote": "::1", "server_cn": "vpn6.example", "crl_path": str(tmp_path / "crl.pem")}
    assert api.patch("/v1/openvpn", json=body).status_code == 200
    created = api.post("/v1/openvpn/clients", json={"name": "carol"})
    assert created.status_code == 201, created.text
    directives = parse_profile(created.text).directives
    assert "verify-x509-name vpn6.example name" in directives and "remote ::1 1194" in directives

    with Session(ctx.engine) as session:  # as stored before configure checked it
        row = session.get(OpenVpnRow, "vpn")
        assert row is not None
        row.server_cn = None
        session.add(row)
        session.commit()
    issued = list_certificates(ctx, limit=1000)
    refused = assert_problem(api.post("/v1/openvpn/clients", json={"name": "dave"}), 409)
    assert "'::1' cannot be the server's CN" in refused["detail"]
    assert "configure a server CN" in refused["detail"] and "--" not in refused["detail"]
    refused = assert_problem(api.post("/v1/openvpn/server-config", json={}), 409)
    assert "'::1' cannot be the server's CN" in refused["detail"]
    assert list_certificates(ctx, limit=1000) == issued  # nothing issued
    assert [c["name"] for c in api.get("/v1/openvpn/clients").json()] == ["carol"]


def test_a_crl_file_not_rewritten_is_reported_without_its_path(
    api: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: crl_error was the operator's sentence, with the CRL file's path and the
    temporary file's name in it; answers name no server path (docs/api.md). The log has it."""
    crl = tmp_path / "crl.pem"
    _ready(api, crl)
    assert api.post("/v1/openvpn/clients", json={"name": "alice"}).status_code == 201
    staged = tmp_path / ".crl.pem.x1y2z3"

    def denied(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise PermissionError(13, "Permission denied", str(staged))

    monkeypatch.setattr("ca.openvpn.write_atomic", denied)
    revoked = api.post("/v1/openvpn/clients/alice/revoke", json={})
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["crl_error"] == (
        "cannot write the CRL file of OpenVPN authority 'vpn': Permission denied"
    )
    assert str(tmp_path) not in revoked.json()["crl_error"]
    assert f"cannot write the CRL file {crl.resolve()}: " in caplog.text
    assert str(staged) in caplog.text


def test_refusals_name_the_setting_not_a_cli_flag(api: TestClient) -> None:
    """Regression: ca's messages told REST callers to pass --force, --ca-ttl, --cn or to run
    'trellis openvpn configure --remote'. They name the setting; each adapter spells it."""
    short = assert_problem(api.post("/v1/openvpn/init", json={"ca_ttl": "5s"}), 400)["detail"]
    assert "give a CA TTL of 6s or more" in short
    assert api.post("/v1/openvpn/init", json={}).status_code == 201
    again = assert_problem(api.post("/v1/openvpn/init", json={}), 409)["detail"]
    assert again == "OpenVPN authority 'vpn' exists: only a forced init replaces it"
    client = assert_problem(api.post("/v1/openvpn/clients", json={"name": "alice"}), 409)
    assert client["detail"] == "where do clients connect? configure the remote first"
    server = assert_problem(api.post("/v1/openvpn/server-cert", json={}), 409)
    assert server["detail"].startswith("no server CN yet: give one, or configure")
    for detail in (short, again, client["detail"], server["detail"]):
        assert "--" not in detail and "trellis " not in detail, detail


def test_init_refuses_the_mesh_and_gateway_names(api: TestClient, ctx: Context) -> None:
    """Regression: ``?authority=gateway`` made an OpenVPN authority that ``/v1/gateway/init``
    then took for the gateway's own, and ``?authority=mesh`` one the mesh's init tripped on."""
    for name, owner in (("mesh", "the SPIFFE mesh"), ("gateway", "the API gateway")):
        refused = assert_problem(api.post(f"/v1/openvpn/init?authority={name}", json={}), 400)
        assert refused["detail"] == (
            f"the authority name {name!r} is reserved for {owner}:"
            " give the openvpn authority another name"
        )
    gateway = api.post("/v1/gateway/init", json={})
    assert gateway.status_code == 201, gateway.text
    assert api.get("/v1/openvpn?authority=gateway").status_code == 404
    created = api.post("/v1/openvpn/init?authority=vpn2", json={})
    assert created.status_code == 201, created.text
    assert created.json()["authority"] == "vpn2"
