"""An authority name with no authority behind it names nothing: 404 over REST, exit 5 from the
CLI. Only the names an instance knows before their init command ran (``mesh``, ``gateway``)
are 503 / exit 7, "not initialised", with the command to run."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from ca.config import Context
from ca.tokens import create_admin_token
from tests.api.restkit import Rest, assert_problem
from tests.ca.svidkit import SQLITE_ONLY
from tests.cli.test_walkthrough import Trellis

UNKNOWN = [
    ("GET", "/v1/authorities/nope", None),
    ("POST", "/v1/authorities/nope/rotate", {}),
    ("POST", "/v1/authorities/nope/rotate?force=true", {}),
    ("POST", "/v1/authorities/nope/revoke-intermediate", None),
    ("POST", "/v1/openvpn/server-cert?authority=nope", {"network": "10.8.0.0/24"}),
    ("POST", "/v1/openvpn/server-config?authority=nope", {"network": "10.8.0.0/24"}),
    ("POST", "/v1/openvpn/clients?authority=nope", {"name": "alice"}),
]


def test_an_unknown_authority_is_404_and_a_known_uninitialised_one_503(rest: Rest) -> None:
    for method, path, body in UNKNOWN:
        response = rest.client.request(method, path, json=body, headers=rest.admin)
        assert assert_problem(response, 404)["code"] == "not-found", (method, path)
    gateway = assert_problem(rest.client.get("/v1/authorities/gateway", headers=rest.admin), 503)
    assert gateway["code"] == "not-initialised"
    assert "trellis gateway init" in gateway["detail"]
    for path in ("/v1/crl/gateway/intermediate.crl", "/v1/crl/gateway/root.pem"):
        crl = assert_problem(rest.client.get(path), 503)
        assert "trellis gateway init" in crl["detail"], path
    for path in ("/v1/crl/nope/intermediate.crl", "/v1/crl/nope/intermediate.pem"):
        assert assert_problem(rest.client.get(path), 404)["detail"] == "no authority named 'nope'"
    assert rest.client.get("/v1/authorities/mesh", headers=rest.admin).status_code == 200


def test_the_mesh_before_init_is_503(bare_ctx: Context) -> None:
    _info, secret = create_admin_token(bare_ctx, "tests/api")
    with TestClient(create_app(bare_ctx), raise_server_exceptions=False) as client:
        response = client.get("/v1/authorities/mesh", headers={"Authorization": f"Bearer {secret}"})
        problem = assert_problem(response, 503)
        assert problem["code"] == "not-initialised" and "trellis init" in problem["detail"]


@SQLITE_ONLY  # the CLI calls what REST calls, tested above on both databases
def test_the_cli_exits_5_for_an_unknown_authority(tmp_path: Path, database_url: str) -> None:
    cli = Trellis(tmp_path / "var", database_url)
    cli.set_up("init", "--trust-domain", "example.org")
    for args in (
        ("authority", "status", "--authority", "nope"),
        ("authority", "rotate", "--authority", "nope"),
        ("authority", "rotate", "--authority", "nope", "--now"),
        ("authority", "revoke-intermediate", "--authority", "nope", "--yes"),
        ("openvpn", "server-cert", "--authority", "nope", "--out", str(tmp_path / "server")),
        ("crl", "show", "--authority", "nope"),
        ("crl", "fetch", "--authority", "nope", "--out", str(tmp_path / "nope.crl")),
    ):
        result = cli.run(*args, ok=False)
        assert result.returncode == 5, (args, result.stderr)
        assert result.stderr.startswith("trellis: ") and "nope" in result.stderr, args
        if args[:2] == ("crl", "show"):
            assert "no authority named 'nope'" in result.stderr
    for args in (
        ("authority", "status", "--authority", "gateway"),
        ("crl", "show", "--authority", "gateway"),
        ("crl", "fetch", "--authority", "gateway", "--out", str(tmp_path / "gateway.crl")),
    ):
        gateway = cli.run(*args, ok=False)
        assert gateway.returncode == 7 and "trellis gateway init" in gateway.stderr, args
    assert not (tmp_path / "nope.crl").exists() and not (tmp_path / "gateway.crl").exists()
    assert not (tmp_path / "server").exists()
