"""Server certificates and the server directory; where the tls-crypt keys are held (sealed
files, or Vault KV when the authority's keys are in Vault); ``init --force``."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.app import create_app
from ca.audit import list_audit
from ca.authority import active_issuer
from ca.config import Context, Settings, build_context
from ca.errors import Conflict, InvalidInput, Unavailable
from ca.openvpn import (
    PRIVATE_FILES,
    SERVER_PROFILE,
    WITHDRAWN_BY,
    ClientRequest,
    ConfigureParams,
    InitParams,
    ServerRequest,
    VpnName,
    add_client,
    client_pool,
    configure,
    get_config,
    init_openvpn,
    issue_server_cert,
    list_clients,
    server_config,
    write_files,
)
from ca.store.db import SchemaPolicy
from ca.store.models import CertificateRow
from ca.store.models_openvpn import OpenVpnRow
from ca.tlscryptv2 import ServerKey, StaticKey
from ca.tokens import create_admin_token
from cli.launch import Interrupted
from tests.api.restkit import assert_problem, bearer
from tests.ca.svidkit import count_rows
from tests.conftest import interrupt_a_rename, sqlite_database
from tests.openvpn.conftest import REMOTE
from tests.openvpn.vpnkit import DATA, assert_vpn_leaf, crls_in, normalise
from tests.vault.conftest import bao_path, close, openbao, vault_settings  # noqa: F401


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite only: nothing here depends on the database (test_clients.py and test_rest.py run
    on both)."""
    return sqlite_database(request, tmp_path / "trellis.db")


def test_server_certificate(vpn: Context) -> None:
    credentials = issue_server_cert(vpn, ServerRequest())
    leaf, *chain = x509.load_pem_x509_certificates(credentials.certificate_pem)
    issuer = active_issuer(vpn, "vpn")
    assert chain == [issuer.certificate]
    assert_vpn_leaf(leaf, issuer.certificate, REMOTE, "server")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [REMOTE]
    # a second server's certificate: profiles keep pinning the deployment's CN
    second = issue_server_cert(vpn, ServerRequest(common_name=VpnName("vpn2.example.org")))
    assert second.common_name == "vpn2.example.org"
    assert get_config(vpn).server_cn == REMOTE


def test_server_directory(vpn: Context, tmp_path: Path) -> None:
    out = tmp_path / "server"
    files = server_config(vpn, ServerRequest(), ipaddress.IPv4Network("10.9.0.0/24"), out)
    written = write_files(files, out)
    assert [p.name for p in written] == [
        "server.conf",
        "ca.pem",
        "server.crt",
        "server.key",
        "tls-crypt-v2.key",
        "tls-crypt.key",
        "crl.pem",
    ]
    modes = {p.name: p.stat().st_mode & 0o777 for p in written}
    assert {name for name, mode in modes.items() if mode == 0o600} == PRIVATE_FILES
    golden = (DATA / "server.conf.golden").read_text(encoding="utf-8")
    # a CRL path was configured elsewhere (the vpn fixture): server.conf names that file
    assert normalise(files["server.conf"]).replace(str(get_config(vpn).crl_path), "CRL") == golden
    issuer = active_issuer(vpn, "vpn")
    assert x509.load_pem_x509_certificates(files["ca.pem"]) == [issuer.certificate, *issuer.roots]
    assert len(crls_in(files["crl.pem"])) == 2
    ServerKey.from_pem(files["tls-crypt-v2.key"])
    StaticKey.from_pem(files["tls-crypt.key"])


def test_the_first_server_directory_holds_the_crl_file(
    vpn_unconfigured: Context, tmp_path: Path
) -> None:
    from ca.openvpn import ConfigureParams, configure

    configure(vpn_unconfigured, ConfigureParams(remote=REMOTE))
    files = server_config(vpn_unconfigured, ServerRequest(), out_dir=tmp_path / "srv")
    assert b"\ncrl-verify crl.pem\n" in files["server.conf"]
    assert get_config(vpn_unconfigured).crl_path == (tmp_path / "srv" / "crl.pem").resolve()


def test_a_server_directory_stopped_between_its_files_changes_nothing(
    vpn: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after three of the seven files were replaced: the directory held a new
    server.crt beside the old server.key, the new CN was already what profiles pin, and the new
    certificate stayed live with its key lost. Now the files and the configuration are as
    they were, and the certificate is withdrawn."""
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(), out_dir=out), out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    configured = get_config(vpn)
    interrupt_a_rename(monkeypatch, out, after=3)
    request = ServerRequest(common_name=VpnName("gw.example.org"))
    with pytest.raises(Interrupted):
        write_files(server_config(vpn, request, out_dir=out), out)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert get_config(vpn) == configured
    with Session(vpn.engine) as session:
        rows = session.exec(select(CertificateRow).where(CertificateRow.profile == SERVER_PROFILE))
        statuses = sorted((row.status, row.revoked_by) for row in rows)
    assert statuses == [("active", None), ("revoked", WITHDRAWN_BY)]


def test_a_server_cn_needs_a_name(vpn_unconfigured: Context) -> None:
    with pytest.raises(Conflict, match="no server CN"):
        issue_server_cert(vpn_unconfigured, ServerRequest())


def test_tls_crypt_keys_are_sealed_files(vpn: Context) -> None:
    row = _row(vpn)
    assert row.secret_store == "file"
    secrets_dir = vpn.settings.data_dir / "secrets"
    sealed = sorted(secrets_dir.iterdir())
    assert [p.name for p in sealed] == sorted(
        [f"{row.tls_crypt_v2_ref}.sealed", f"{row.tls_crypt_ref}.sealed"]
    )
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    server = ServerKey.from_pem(server_config(vpn, ServerRequest())["tls-crypt-v2.key"])
    for path in sealed:
        assert path.stat().st_mode & 0o777 == 0o600
        assert server.raw not in path.read_bytes()
        assert b"TRELLIS SEALED SECRET" in path.read_bytes()
    # another passphrase cannot open them
    wrong = build_context(
        Settings(
            data_dir=vpn.settings.data_dir,
            database_url=vpn.settings.database_url,
            key_passphrase="another-passphrase-entirely",  # type: ignore[arg-type]
        ),
        schema=SchemaPolicy.TRUSTED,
    )
    try:
        with pytest.raises(Unavailable, match="wrong key passphrase"):
            add_client(wrong, ClientRequest(VpnName("nobody")))
    finally:
        wrong.close()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _append_key(path: Path) -> None:
    """Still valid armour and base64, now longer: it no longer opens."""
    path.write_bytes(path.read_bytes().replace(b"\n-----END", b"QUJD\n-----END"))


SEALED_FILE_DAMAGE: dict[str, Callable[[Path], object]] = {
    "fail/garbage": lambda path: path.write_bytes(b"garbage\n"),
    "fail/empty": lambda path: path.write_bytes(b""),
    "fail/truncated": _truncate,
    "fail/other-bytes": _append_key,
    "fail/missing": Path.unlink,
    "fail/directory": lambda path: (path.unlink(), path.mkdir()),
}


def _assert_refused_as_damage(ctx: Context, name: str) -> None:
    """``openvpn client add`` over the domain and over REST: the server's fault (503, exit 8
    through ``cli.main``'s one mapping), never a client's mistake (400) or a 500; nothing is
    issued and the name stays free."""
    certificates = count_rows(ctx, "certificate")
    ctx.cache.clear()  # a process started after the damage
    with pytest.raises(Unavailable, match=r"secret .?openvpn-vpn-tls-crypt-v2-server-"):
        add_client(ctx, ClientRequest(VpnName(name)))
    _info, secret = create_admin_token(ctx, "tests/openvpn")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        response = client.post("/v1/openvpn/clients", json={"name": name}, headers=bearer(secret))
    body = assert_problem(response, 503)
    assert body["code"] == "unavailable"
    assert str(ctx.settings.data_dir) not in str(body["detail"])
    assert count_rows(ctx, "certificate") == certificates
    assert [c.name for c in list_clients(ctx)] == []


@pytest.mark.parametrize("damage", list(SEALED_FILE_DAMAGE.values()), ids=list(SEALED_FILE_DAMAGE))
def test_a_damaged_sealed_secret_is_the_servers_fault(
    vpn: Context, damage: Callable[[Path], object]
) -> None:
    row = _row(vpn)
    damage(vpn.settings.data_dir / "secrets" / f"{row.tls_crypt_v2_ref}.sealed")
    _assert_refused_as_damage(vpn, "erin")


@pytest.mark.parametrize(
    "value",
    ["!!notbase64%%", base64.b64encode(b"ABC").decode(), None],
    ids=["fail/not-base64", "fail/3-bytes", "fail/no-value"],
)
def test_a_damaged_kv_secret_is_the_servers_fault(
    tmp_path: Path,
    openbao: object,  # noqa: F811
    value: str | None,
) -> None:
    ctx = build_context(vault_settings(tmp_path, openbao))  # type: ignore[arg-type]
    try:
        init_openvpn(ctx, InitParams(key_backend="vault"))
        configure(ctx, ConfigureParams(remote=REMOTE))
        data = {"other": "x"} if value is None else {"value": value}
        path = f"secret/data/trellis/{_row(ctx).tls_crypt_v2_ref}"
        openbao.api("POST", path, {"data": data})  # type: ignore[attr-defined]
        _assert_refused_as_damage(ctx, "bob")
    finally:
        close(ctx)


def test_init_force_replaces_the_deployment(vpn: Context) -> None:
    add_client(vpn, ClientRequest(VpnName("alice")))
    before = _row(vpn)
    old_key = server_config(vpn, ServerRequest())["tls-crypt-v2.key"]
    with pytest.raises(Conflict, match="only a forced init replaces it"):
        init_openvpn(vpn, InitParams())
    init_openvpn(vpn, InitParams(force=True))
    after = _row(vpn)
    assert after.tls_crypt_v2_ref != before.tls_crypt_v2_ref
    assert not (vpn.settings.data_dir / "secrets" / f"{before.tls_crypt_v2_ref}.sealed").exists()
    assert list_clients(vpn) == []
    assert after.remote is None  # configure again: the old settings went with the old CA
    configure(vpn, ConfigureParams(remote=REMOTE))
    assert server_config(vpn, ServerRequest())["tls-crypt-v2.key"] != old_key


def test_init_never_takes_over_another_authority(ctx: Context) -> None:
    for force in (False, True):
        with pytest.raises(InvalidInput, match="reserved for the SPIFFE mesh"):
            init_openvpn(ctx, InitParams(name="mesh", force=force))
    assert active_issuer(ctx).trust_domain is not None  # the mesh is untouched


def test_with_vault_the_keys_are_in_kv(
    tmp_path: Path,
    openbao: object,  # noqa: F811
) -> None:
    ctx = build_context(vault_settings(tmp_path, openbao))  # type: ignore[arg-type]
    try:
        init_openvpn(ctx, InitParams(key_backend="vault"))
        row = _row(ctx)
        assert row.secret_store == "vault"
        assert not (ctx.settings.data_dir / "secrets").exists()
        stored = openbao.api("GET", f"secret/data/trellis/{row.tls_crypt_v2_ref}")  # type: ignore[attr-defined]
        assert stored["data"]["data"]["value"]
        from ca.openvpn import ConfigureParams, configure

        configure(ctx, ConfigureParams(remote=REMOTE))
        ctx.cache.clear()  # read back from Vault, not from the process cache
        files = server_config(ctx, ServerRequest())
        assert len(ServerKey.from_pem(files["tls-crypt-v2.key"]).raw) == 128
    finally:
        close(ctx)


def _row(ctx: Context) -> OpenVpnRow:
    from sqlmodel import Session

    with Session(ctx.engine) as session:
        row = session.get(OpenVpnRow, "vpn")
        assert row is not None
        return row


def test_the_openvpn_migration_is_a_branch_off_0004() -> None:
    """Features add sibling migrations off 0004 (applied with ``upgrade heads``, later joined by
    a merge revision): 0006 is on the way from every head down to base."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import ca.store.db

    config = Config()
    config.set_main_option("script_location", str(Path(ca.store.db.__file__).parent / "migrations"))
    script = ScriptDirectory.from_config(config)
    revision = script.get_revision("0006")
    assert revision is not None and revision.down_revision == "0004"
    for head in script.get_heads():
        assert "0006" in {r.revision for r in script.iterate_revisions(head, "base")}


def _configured(vpn: Context) -> list[dict[str, object]]:
    return [e.detail for e in list_audit(vpn, event="openvpn.configured")]


def test_server_config_records_what_it_changes_in_the_audit_trail(
    vpn: Context, tmp_path: Path
) -> None:
    """docs/openvpn.md: every configuration change is in the audit log, whichever command made
    it; a second server's certificate changes nothing there."""
    vpn2 = tmp_path / "vpn2"
    init_openvpn(vpn, InitParams(name="vpn2"))
    configure(vpn, ConfigureParams(remote="vpn2.example.org"), "vpn2")
    count = len(_configured(vpn))
    request = ServerRequest(authority="vpn2", common_name=VpnName("gw.example.org"))
    server_config(vpn, request, out_dir=vpn2)
    latest = _configured(vpn)[0]
    assert len(_configured(vpn)) == count + 1
    assert latest["server_cn"] == "gw.example.org"
    assert latest["crl_path"] == str((vpn2 / "crl.pem").resolve())
    assert latest["server_dir"] == str(vpn2.resolve())
    assert get_config(vpn, "vpn2").server_cn == "gw.example.org"
    issue_server_cert(vpn, ServerRequest(authority="vpn2", common_name=VpnName("b.example")))
    server_config(vpn, ServerRequest(authority="vpn2"), out_dir=vpn2)  # nothing changes
    assert len(_configured(vpn)) == count + 1


@pytest.mark.parametrize(
    "network",
    ["10.8.0.0/31", "10.8.0.0/30", "10.8.0.0/32", "10.0.0.0/8", "0.0.0.0/0", "0.0.0.0/24"],
)
def test_a_pool_openvpn_refuses_is_refused_before_issuing(
    vpn: Context, tmp_path: Path, network: str
) -> None:
    """OpenVPN 2.6 refuses ``server`` with a pool smaller than /29 or larger than /16 and cannot
    parse a 0.0.0.0 network (checked against the binary)."""
    with pytest.raises(InvalidInput, match="network"):
        client_pool(network)
    with pytest.raises(InvalidInput, match="network"):
        server_config(vpn, ServerRequest(), ipaddress.IPv4Network(network), tmp_path / "nt")
    with Session(vpn.engine) as session:
        row = session.get(OpenVpnRow, "vpn")
        assert row is not None and row.server_dir is None
        assert not session.exec(
            select(CertificateRow).where(CertificateRow.profile == "openvpn-server")
        ).all()


@pytest.mark.parametrize("network", ["10.8.0.0/29", "10.8.0.0/16", "192.168.7.0/24"])
def test_pools_openvpn_takes(network: str) -> None:
    assert client_pool(network) == ipaddress.IPv4Network(network)


def test_an_empty_cn_is_refused(vpn: Context) -> None:
    with pytest.raises(InvalidInput, match="invalid name ''"):
        issue_server_cert(vpn, ServerRequest(common_name=VpnName("")))
