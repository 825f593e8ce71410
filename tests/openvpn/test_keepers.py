"""One file, one keeper (``ca.keepers``): an OpenVPN authority's CRL file cannot be taken over by
another authority or a gateway truststore, nor the other way round, whatever path spells it (a
symlink, ``..``), over REST or the CLI; the refusal is 400 / exit 2 and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.app import create_app
from ca import gateway
from ca.config import Context
from ca.errors import InvalidInput, NotFound, Unavailable
from ca.openvpn import (
    SERVER_DIR_FILES,
    ServerRequest,
    get_config,
    server_config,
    write_crl_file,
    write_files,
)
from ca.store.models_gateway import GatewayTruststoreRow
from ca.store.models_openvpn import OpenVpnRow
from ca.tokens import create_admin_token
from tests.api.restkit import assert_problem, bearer
from tests.openvpn.vpnkit import InProcessTrellis


@pytest.fixture
def api(vpn: Context) -> Iterator[TestClient]:
    _info, secret = create_admin_token(vpn, "tests/openvpn")
    with TestClient(create_app(vpn), raise_server_exceptions=False) as client:
        client.headers.update(bearer(secret))
        yield client


def _spellings(crl: Path, tmp_path: Path) -> list[Path]:
    """The same file: as it is, through ``..``, through a symlinked directory, as a symlink."""
    (tmp_path / "linked-dir").symlink_to(crl.parent)
    (tmp_path / "linked-file.pem").symlink_to(crl)
    return [
        crl,
        crl.parent / ".." / crl.parent.name / crl.name,
        tmp_path / "linked-dir" / crl.name,
        tmp_path / "linked-file.pem",
    ]


def test_a_second_authority_cannot_take_over_the_crl_file(
    vpn: Context, api: TestClient, crl_file: Path, tmp_path: Path
) -> None:
    assert api.post("/v1/openvpn/init?authority=vpn2", json={}).status_code == 201
    before = crl_file.read_bytes()
    for path in _spellings(crl_file, tmp_path):
        response = api.patch("/v1/openvpn?authority=vpn2", json={"crl_path": str(path)})
        problem = assert_problem(response, 400)
        assert "OpenVPN authority 'vpn'" in problem["detail"], problem
    assert get_config(vpn, "vpn2").crl_path is None
    assert crl_file.read_bytes() == before
    # its own path again is no conflict
    assert api.patch("/v1/openvpn", json={"crl_path": str(crl_file)}).status_code == 200


def test_an_nginx_truststore_and_a_crl_file_exclude_each_other(
    vpn: Context, api: TestClient, crl_file: Path, tmp_path: Path
) -> None:
    gateway.init_gateway(vpn, gateway.GatewayParams())
    before = crl_file.read_bytes()
    with pytest.raises(InvalidInput, match="kept current by OpenVPN authority 'vpn'"):
        gateway.write_truststore(vpn, gateway.TruststoreFormat.NGINX, crl_file.parent)
    (tmp_path / "linked.pem").symlink_to(crl_file)
    with pytest.raises(InvalidInput, match="kept current by OpenVPN authority 'vpn'"):
        gateway.write_truststore(vpn, gateway.TruststoreFormat.PEM, tmp_path / "linked.pem")
    assert crl_file.read_bytes() == before
    assert not (crl_file.parent / "client-ca.pem").exists()

    store = tmp_path / "nginx"
    gateway.write_truststore(vpn, gateway.TruststoreFormat.NGINX, store)
    nginx_crl = (store / "crl.pem").read_bytes()
    assert api.post("/v1/openvpn/init?authority=vpn2", json={}).status_code == 201
    response = api.patch("/v1/openvpn?authority=vpn2", json={"crl_path": str(store / "crl.pem")})
    assert "the gateway truststore written to" in assert_problem(response, 400)["detail"]
    response = api.patch("/v1/openvpn", json={"crl_path": str(store / "crl.pem")})
    assert_problem(response, 400)
    assert (store / "crl.pem").read_bytes() == nginx_crl
    assert get_config(vpn).crl_path == crl_file.resolve()
    # another truststore over one of its files: refused too
    with pytest.raises(InvalidInput, match="the gateway truststore written to"):
        gateway.write_truststore(vpn, gateway.TruststoreFormat.PEM, store / "client-ca.pem")
    # the same truststore written again is its own keeper
    gateway.write_truststore(vpn, gateway.TruststoreFormat.NGINX, store)


def test_a_truststore_cannot_take_the_ca_pem_the_server_job_keeps(
    vpn: Context, tmp_path: Path
) -> None:
    """The ``openvpn-server-certificate`` job rewrites ``ca.pem`` in the recorded server
    directory when a root rotation changes the chain: a truststore written there would be
    overwritten by it, and the other way round."""
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(), out_dir=out), out)
    gateway.init_gateway(vpn, gateway.GatewayParams())
    before = (out / "ca.pem").read_bytes()
    with pytest.raises(InvalidInput, match="kept current by OpenVPN authority 'vpn'"):
        gateway.write_truststore(vpn, gateway.TruststoreFormat.PEM, out / "ca.pem")
    assert (out / "ca.pem").read_bytes() == before


def test_a_conflict_recorded_before_the_check_is_not_written(
    vpn: Context, crl_file: Path, tmp_path: Path
) -> None:
    """Rows from before keepers were checked: the job refuses to write, loudly."""
    from ca.openvpn import InitParams, init_openvpn

    init_openvpn(vpn, InitParams(name="vpn2"))
    with Session(vpn.engine) as session:
        row = session.get(OpenVpnRow, "vpn2")
        assert row is not None
        row.crl_path = str(crl_file.resolve())
        session.add(row)
        session.commit()
    before = crl_file.read_bytes()
    with pytest.raises(Unavailable, match="kept current by OpenVPN authority 'vpn'"):
        write_crl_file(vpn, "vpn2")
    assert crl_file.read_bytes() == before


def test_the_cli_refuses_with_exit_2_and_changes_nothing(tmp_path: Path) -> None:
    cli = InProcessTrellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "127.0.0.1")
    srv = tmp_path / "srv"
    cli.run("openvpn", "server-config", "--out", str(srv))
    crl = (srv / "crl.pem").read_bytes()
    cli.run("openvpn", "init", "--authority", "vpn2")
    operator = cli.process()  # a real process: exit codes and stderr as an operator sees them
    refused = operator.run("openvpn", "configure", "--authority", "vpn2", "--crl-path",
                      str(srv / "crl.pem"), ok=False)  # fmt: skip
    assert refused.returncode == 2 and "kept current by OpenVPN authority 'vpn'" in refused.stderr
    refused = operator.run("openvpn", "server-config", "--authority", "vpn2", "--out", str(srv),
                      ok=False)  # fmt: skip
    assert refused.returncode == 2 and "kept current by OpenVPN authority 'vpn'" in refused.stderr
    serving = (srv / "server.crt").read_bytes()
    certificates = cli.run("certs", "list", "--json").stdout
    refused = operator.run("openvpn", "server-cert", "--authority", "vpn2", "--out", str(srv),
                      ok=False)  # fmt: skip
    assert refused.returncode == 2 and "kept current by OpenVPN authority 'vpn'" in refused.stderr
    assert (srv / "server.crt").read_bytes() == serving  # and nothing was issued
    assert cli.run("certs", "list", "--json").stdout == certificates
    cli.run("gateway", "init")
    refused = operator.run(
        "gateway", "truststore", "--format", "nginx", "--out", str(srv), ok=False
    )
    assert refused.returncode == 2, refused.stderr
    assert (srv / "crl.pem").read_bytes() == crl and not (srv / "client-ca.pem").exists()
    assert (
        cli.run("openvpn", "configure", "--authority", "vpn2", "--json").stdout.count("null") >= 2
    )


def test_crl_out_overwrites_only_a_crl_file_no_other_keeper_keeps(tmp_path: Path) -> None:
    """``openvpn crl --out`` applies configure --crl-path's rules (docs/openvpn.md, CRL care):
    it turned any file (a 0600 secret, a truststore's client-ca.pem, the data dir's own files)
    into a 0644 file of CRLs."""
    cli = InProcessTrellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
    cli.run("openvpn", "init")
    cli.run("openvpn", "init", "--authority", "vpn2")
    cli.run("openvpn", "configure", "--authority", "vpn2", "--crl-path", str(tmp_path / "v2.pem"))
    cli.run("gateway", "init")
    store = tmp_path / "nginx"
    cli.run("gateway", "truststore", "--format", "nginx", "--out", str(store))
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"secret\n")
    precious.chmod(0o600)
    (tmp_path / "linked").symlink_to(precious)
    operator = cli.process()
    refusals = {
        precious: "exists and is not a CRL file",
        tmp_path / "linked": "exists and is not a CRL file",
        tmp_path / "var" / "admin-token": "is Trellis's own data",
        tmp_path / "trellis.db": "is Trellis's own data",
        store / "client-ca.pem": "exists and is not a CRL file",
        store / "crl.pem": "is kept current by the gateway truststore",
        tmp_path / "v2.pem": "is kept current by OpenVPN authority 'vpn2'",
    }
    for path, why in refusals.items():
        before = path.read_bytes(), path.stat().st_mode
        refused = operator.run("openvpn", "crl", "--out", str(path), ok=False)
        assert refused.returncode == 2 and why in refused.stderr, (path, refused)
        assert (path.read_bytes(), path.stat().st_mode) == before
    old = tmp_path / "old-crl.pem"
    cli.run("openvpn", "crl", "--out", str(old))  # a new file, then a CRL file: both fine
    cli.run("openvpn", "crl", "--out", str(old))
    (tmp_path / "empty.pem").touch()
    cli.run("openvpn", "crl", "--out", str(tmp_path / "empty.pem"))
    assert b"BEGIN X509 CRL" in (tmp_path / "empty.pem").read_bytes()


def test_no_file_of_a_server_directory_can_become_a_truststore(
    vpn: Context, tmp_path: Path
) -> None:
    """server-config writes ca.pem, server.conf and the tls-crypt keys too, and OpenVPN reads
    them all: a gateway truststore over ``ca.pem`` made the server trust every gateway partner
    (a consumer's certificate in a VPN profile connected). Only server.crt and server.key, and
    the CRL file, were refused."""
    srv = tmp_path / "srv"
    server_config(vpn, ServerRequest(), out_dir=srv)
    gateway.init_gateway(vpn, gateway.GatewayParams())
    files = {name: (srv / name).read_bytes() for name in SERVER_DIR_FILES}
    for name in SERVER_DIR_FILES:
        for format in (gateway.TruststoreFormat.AWS, gateway.TruststoreFormat.PEM):
            with pytest.raises(InvalidInput, match="kept current by OpenVPN authority 'vpn'"):
                gateway.write_truststore(vpn, format, srv / ".." / "srv" / name)
    assert {name: (srv / name).read_bytes() for name in SERVER_DIR_FILES} == files
    with Session(vpn.engine) as session:
        assert session.exec(select(GatewayTruststoreRow)).all() == []


def test_a_truststore_recorded_over_a_server_file_is_left_alone_and_can_be_forgotten(
    vpn: Context, tmp_path: Path
) -> None:
    """A record from before the check (or from a ca.pem written before its directory became a
    server directory) is not refreshed over OpenVPN's file, the job says why, and
    ``remove_truststore`` forgets it, after which server-config may write the directory again
    (it refused for ever: no command removed a truststore record)."""
    srv = tmp_path / "srv"
    server_config(vpn, ServerRequest(), out_dir=srv)
    gateway.init_gateway(vpn, gateway.GatewayParams())
    ca_pem = (srv / "ca.pem").read_bytes()
    with Session(vpn.engine) as session:
        session.add(
            GatewayTruststoreRow(
                node=vpn.settings.node_name,
                path=str(srv / "ca.pem"),
                format="aws",
                written_at=vpn.clock.now(),
            )
        )
        session.commit()
    assert gateway.refresh_truststores(vpn) == []
    with pytest.raises(Unavailable, match="kept current by OpenVPN authority 'vpn'") as failed:
        gateway.refresh_job(vpn)
    assert "trellis gateway truststore remove --out" in failed.value.detail
    assert str(srv) not in failed.value.public  # /v1/jobs and /readyz name no server path
    assert (srv / "ca.pem").read_bytes() == ca_pem
    with pytest.raises(InvalidInput, match="kept current by the gateway truststore"):
        server_config(vpn, ServerRequest(), out_dir=srv)

    with pytest.raises(NotFound, match="no gateway truststore is recorded"):
        gateway.remove_truststore(vpn, srv / "server.crt")
    (tmp_path / "link").symlink_to(srv)
    removed = gateway.remove_truststore(vpn, tmp_path / "link" / "ca.pem")  # any spelling
    assert (removed.path, removed.format) == (srv / "ca.pem", gateway.TruststoreFormat.AWS)
    with Session(vpn.engine) as session:
        assert session.exec(select(GatewayTruststoreRow)).all() == []
    assert (srv / "ca.pem").read_bytes() == ca_pem  # the record goes, the file stays
    server_config(vpn, ServerRequest(), out_dir=srv)
    assert gateway.refresh_job(vpn) == "nothing changed"


def test_the_cli_forgets_a_truststore_that_holds_a_server_directory(tmp_path: Path) -> None:
    """The order the probe met it in: a truststore written to DIR/ca.pem first keeps DIR from
    becoming a server directory, until ``gateway truststore remove`` forgets it."""
    cli = InProcessTrellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "127.0.0.1")
    cli.run("gateway", "init")
    srv = tmp_path / "srv"
    srv.mkdir(mode=0o700)
    cli.run("gateway", "truststore", "--format", "aws", "--out", str(srv / "ca.pem"))
    operator = cli.process()
    refused = operator.run("openvpn", "server-config", "--out", str(srv), ok=False)
    assert refused.returncode == 2 and "kept current by the gateway truststore" in refused.stderr
    missing = operator.run("gateway", "truststore", "remove", "--out", str(srv), ok=False)
    assert missing.returncode == 5 and "no gateway truststore is recorded" in missing.stderr
    removed = operator.run("gateway", "truststore", "remove", "--out", str(srv / "ca.pem"))
    assert f"forgot the aws truststore at {srv / 'ca.pem'}" in removed.stdout
    cli.run("openvpn", "server-config", "--out", str(srv))
    ca_pem = (srv / "ca.pem").read_bytes()
    refused = operator.run(
        "gateway", "truststore", "--format", "aws", "--out", str(srv / "ca.pem"), ok=False
    )
    assert refused.returncode == 2 and "kept current by OpenVPN authority 'vpn'" in refused.stderr
    assert operator.run("gateway", "truststore", "--refresh").stdout == "unchanged\n"
    assert (srv / "ca.pem").read_bytes() == ca_pem
