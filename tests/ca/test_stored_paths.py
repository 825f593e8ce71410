"""Paths Trellis records (``ca.files.MAX_STORED_PATH``) are bounded in ``ca``, before anything is
issued or written. SQLite kept a longer one; PostgreSQL refused the row, so the caller got an
internal error (500, exit 1) for its own mistake, and ``server-config`` had issued first."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api.app import create_app
from ca import gateway
from ca.certs import list_certificates
from ca.config import Context
from ca.errors import InvalidInput
from ca.files import MAX_STORED_PATH
from ca.istio import MAX_KUBE_CONTEXT, IstioParams
from ca.openvpn import (
    ConfigureParams,
    InitParams,
    ServerRequest,
    configure,
    get_config,
    init_openvpn,
    server_config,
)
from ca.store.models import IstioClusterRow
from ca.store.models_gateway import GatewayTruststoreRow
from ca.store.models_openvpn import OpenVpnRow
from ca.tokens import create_admin_token
from tests.api.restkit import assert_problem, bearer
from tests.cli.test_walkthrough import Trellis


@pytest.fixture
def vpn(ctx: Context, tmp_path: Path) -> Context:
    init_openvpn(ctx, InitParams())
    configure(ctx, ConfigureParams(remote="vpn.example.org", crl_path=tmp_path / "crl.pem"))
    return ctx


def _long_dir(base: Path) -> Path:
    """An existing directory whose path is longer than a path column holds."""
    deep = base
    while len(str(deep)) <= MAX_STORED_PATH:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    return deep


def _short_link(base: Path) -> Path:
    """A short name that resolves to ``_long_dir``: what is recorded is the resolved path."""
    link = base / "l"
    link.symlink_to(_long_dir(base))
    assert len(str(link)) < 200
    return link


@pytest.mark.parametrize(
    ("table", "column"),
    [
        (OpenVpnRow, "crl_path"),
        (OpenVpnRow, "server_dir"),
        (GatewayTruststoreRow, "path"),
        (IstioClusterRow, "output"),
        (IstioClusterRow, "kubeconfig"),
    ],
)
def test_the_bound_is_the_columns(table: type, column: str) -> None:
    assert table.__table__.c[column].type.length == MAX_STORED_PATH  # type: ignore[attr-defined]


def test_kube_context_bound_is_the_columns() -> None:
    length = IstioClusterRow.__table__.c["kube_context"].type.length  # type: ignore[attr-defined]
    assert length == MAX_KUBE_CONTEXT


def test_a_crl_path_too_long_to_store_is_refused(vpn: Context, tmp_path: Path) -> None:
    before = get_config(vpn).crl_path
    for crl in (_long_dir(tmp_path / "a") / "crl.pem", _short_link(tmp_path / "b") / "crl.pem"):
        with pytest.raises(InvalidInput, match=f"the CRL path is at most {MAX_STORED_PATH}"):
            configure(vpn, ConfigureParams(crl_path=crl))
    assert get_config(vpn).crl_path == before


def test_a_server_directory_too_long_to_store_is_refused_before_issuing(
    vpn: Context, tmp_path: Path
) -> None:
    issued = list_certificates(vpn, limit=1000)
    with pytest.raises(InvalidInput, match="the server directory is at most"):
        server_config(vpn, ServerRequest(), out_dir=_short_link(tmp_path) / "srv")
    assert list_certificates(vpn, limit=1000) == issued
    with Session(vpn.engine) as session:
        row = session.get(OpenVpnRow, "vpn")
        assert row is not None and row.server_dir is None


def test_a_truststore_path_too_long_to_store_is_refused(ctx: Context, tmp_path: Path) -> None:
    gateway.init_gateway(ctx, gateway.GatewayParams())
    target = _long_dir(tmp_path) / "client-ca.pem"  # recorded as given, made absolute
    with pytest.raises(InvalidInput, match="the truststore path is at most"):
        gateway.write_truststore(ctx, gateway.TruststoreFormat.NGINX, target)
    assert not target.exists()


def test_istio_outputs_too_long_to_store_are_refused(tmp_path: Path) -> None:
    long = _short_link(tmp_path)
    with pytest.raises(InvalidInput, match="the output path is at most"):
        IstioParams("east", output=long / "cacerts.yaml")
    with pytest.raises(InvalidInput, match="the kubeconfig path is at most"):
        IstioParams("east", kubeconfig=long / "kubeconfig")
    with pytest.raises(InvalidInput, match=f"a kube context is at most {MAX_KUBE_CONTEXT}"):
        IstioParams("east", kubeconfig=tmp_path / "k", kube_context="c" * (MAX_KUBE_CONTEXT + 1))
    IstioParams("east", kubeconfig=tmp_path / "k", kube_context="c" * MAX_KUBE_CONTEXT)


def test_over_rest_a_crl_path_resolving_too_long_is_a_400(vpn: Context, tmp_path: Path) -> None:
    """The wire model bounds the text given (1024); the path recorded is the resolved one."""
    _info, secret = create_admin_token(vpn, "tests/stored-paths")
    crl = str(_short_link(tmp_path) / "crl.pem")
    with TestClient(create_app(vpn), raise_server_exceptions=False) as api:
        api.headers.update(bearer(secret))
        refused = assert_problem(api.patch("/v1/openvpn", json={"crl_path": crl}), 400)
    assert f"the CRL path is at most {MAX_STORED_PATH} characters" in refused["detail"]


def test_the_cli_exits_2_for_a_crl_path_too_long(tmp_path: Path, database_url: str) -> None:
    """PostgreSQL refused the row: exit 1 and a database error, not the caller's mistake."""
    cli = Trellis(tmp_path / "var", database_url)
    cli.run("openvpn", "init")
    crl = str(_long_dir(tmp_path / "long") / "crl.pem")
    refused = cli.run("openvpn", "configure", "--crl-path", crl, ok=False)
    assert refused.returncode == 2, refused
    assert f"the CRL path is at most {MAX_STORED_PATH} characters" in refused.stderr
