"""``trellis openvpn ...``: --json shapes (the REST wire models), exit codes and files, run
in-process through the Typer app on SQLite."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from api.schemas.openvpn import ClientOut, ClientRevokedOut, OpenVpnOut, ProfileOut
from tests.openvpn.vpnkit import InProcessTrellis, crls_in, parse_profile


@pytest.fixture
def cli(tmp_path: Path) -> InProcessTrellis:
    trellis = InProcessTrellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    return trellis


def _json(cli: InProcessTrellis, *args: str) -> Any:
    return json.loads(cli.run(*args, "--json").stdout)


def test_json_shapes_and_files(cli: InProcessTrellis, tmp_path: Path) -> None:
    assert set(_json(cli, "openvpn", "init")) == set(OpenVpnOut.model_fields)
    configured = _json(cli, "openvpn", "configure", "--remote", "vpn.example.org", "--proto", "tcp")
    assert (configured["remote"], configured["proto"], configured["port"]) == (
        "vpn.example.org",
        "tcp",
        1194,
    )
    server = _json(cli, "openvpn", "server-cert", "--out", str(tmp_path / "cert"))
    assert set(server) == {"common_name", "serial", "expires_at", "written"}
    assert (tmp_path / "cert" / "server.key").stat().st_mode & 0o777 == 0o600
    directory = _json(cli, "openvpn", "server-config", "--out", str(tmp_path / "srv"))
    assert directory["crl_path"] == str((tmp_path / "srv" / "crl.pem").resolve())
    assert len(directory["files"]) == 7

    out = tmp_path / "alice.ovpn"
    added = _json(cli, "openvpn", "client", "add", "alice", "--ttl", "7d", "--out", str(out))
    assert set(added) == set(ProfileOut.model_fields)
    assert (added["name"], added["path"], added["tls_crypt"]) == ("alice", str(out), "v2")
    assert out.stat().st_mode & 0o777 == 0o600
    assert "proto tcp" in parse_profile(out.read_bytes()).directives

    listed = _json(cli, "openvpn", "client", "list")
    assert [set(item) for item in listed] == [set(ClientOut.model_fields)]

    renewed = _json(cli, "openvpn", "client", "renew", "alice", "--out", str(tmp_path / "a2.ovpn"))
    assert renewed["serial"] != added["serial"]

    revoked = _json(cli, "openvpn", "client", "revoke", "alice", "--yes")
    assert set(revoked) == set(ClientRevokedOut.model_fields)
    assert [c["serial"] for c in revoked["revoked"]] == [renewed["serial"]]
    crl = Path(revoked["crl_path"])
    assert {e.serial_number for c in crls_in(crl.read_bytes()) for e in c} == {
        int(added["serial"], 16),
        int(renewed["serial"], 16),
    }
    assert _json(cli, "openvpn", "crl") == {"path": str(crl), "health": "ok"}
    copy = tmp_path / "copy.pem"
    assert _json(cli, "openvpn", "crl", "--out", str(copy))["path"] == str(copy)
    assert copy.read_bytes() == crl.read_bytes()


def test_exit_codes_and_messages(cli: InProcessTrellis, tmp_path: Path) -> None:
    assert cli.run("openvpn", "client", "list", ok=False).returncode != 0
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "vpn.example.org")
    out = str(tmp_path / "x.ovpn")
    cli.run("openvpn", "client", "add", "alice", "--out", out)
    assert cli.run("openvpn", "client", "add", "alice", "--out", out, ok=False).returncode != 0
    assert cli.run("openvpn", "client", "add", ".x", "--out", out, ok=False).returncode != 0
    asked = cli.run("openvpn", "client", "revoke", "alice", ok=False)  # no terminal here
    assert asked.returncode == 1 and "pass --yes" in asked.stdout, asked
    text = cli.run("openvpn", "client", "revoke", "alice", "--yes").stdout
    assert "no CRL file configured" in text
    table = cli.run("openvpn", "client", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "SERIAL", "NOT", "AFTER", "TLS-CRYPT"]
    assert table[1].split()[:2] == ["alice", "revoked"]


def test_exit_codes_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cli.main.main`` maps the domain errors: 409 Conflict is exit 6, bad input exit 2, a
    damaged stored secret (Unavailable) exit 8."""
    from cli.main import main

    env = {
        "TRELLIS_DATA_DIR": str(tmp_path / "var"),
        "TRELLIS_KEY_PASSPHRASE": "cli-test-passphrase",
    }
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)

    def exit_code(*argv: str) -> object:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        return exited.value.code

    out = str(tmp_path / "a.ovpn")
    try:
        assert exit_code("openvpn", "init") == 0
        assert exit_code("openvpn", "configure", "--remote", "vpn.example.org") == 0
        assert exit_code("openvpn", "client", "add", "alice", "--out", out) == 0
        assert exit_code("openvpn", "client", "add", "alice", "--out", out) == 6
        assert exit_code("openvpn", "client", "add", "a b", "--out", out) == 2
        assert exit_code("openvpn", "client", "revoke", "nobody", "--yes") == 5
        assert "already has a live certificate" in capsys.readouterr().err
        # The server's own stored secret damaged: exit 8, not 2 (the caller's input is fine).
        (sealed,) = (tmp_path / "var" / "secrets").glob("openvpn-vpn-tls-crypt-v2-server-*")
        sealed.write_bytes(b"garbage\n")
        assert exit_code("openvpn", "client", "add", "bob", "--out", str(tmp_path / "b")) == 8
        assert capsys.readouterr().err == (
            f"trellis: secret {sealed.stem} is not a sealed Trellis secret (damaged)\n"
        )
        assert not (tmp_path / "b").exists()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_refusals_name_the_setting_as_rest_does(cli: InProcessTrellis, tmp_path: Path) -> None:
    """The same words as the REST problem's detail (tests/openvpn/test_rest.py), through the real
    entry point: the CLI user knows --force and configure --remote from --help."""
    trellis = cli.process()
    trellis.run("openvpn", "init")
    again = trellis.run("openvpn", "init", ok=False)
    assert again.returncode == 6, again
    assert (
        again.stderr == "trellis: OpenVPN authority 'vpn' exists: only a forced init replaces it\n"
    )
    out = str(tmp_path / "a.ovpn")
    client = trellis.run("openvpn", "client", "add", "alice", "--out", out, ok=False)
    assert client.returncode == 6, client
    assert client.stderr == "trellis: where do clients connect? configure the remote first\n"


def test_a_relative_crl_path_is_the_shells_and_a_line_break_is_refused(
    cli: InProcessTrellis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.run("openvpn", "init")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vpn").mkdir()
    configured = _json(cli, "openvpn", "configure", "--crl-path", "vpn/crl.pem")
    assert configured["crl_path"] == str((tmp_path / "vpn" / "crl.pem").resolve())
    assert crls_in((tmp_path / "vpn" / "crl.pem").read_bytes())
    # the real command (the in-process runner skips the entry point's error mapping)
    refused = cli.process().run(
        "openvpn", "configure", "--crl-path", "x\nscript-security 2", ok=False
    )
    assert refused.returncode == 2 and "server.conf" in refused.stderr, refused
    assert _json(cli, "openvpn", "configure")["crl_path"] == configured["crl_path"]  # unchanged


def test_refusals_and_their_exit_codes(cli: InProcessTrellis, tmp_path: Path) -> None:
    """What the probe found exiting 0 or with the wrong code (docs/cli.md: 2 bad input, 6
    already revoked, 5 not found)."""
    cli.run("init", "--trust-domain", "example.org")
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "127.0.0.1")
    cli.run("openvpn", "client", "add", "alice", "--out", str(tmp_path / "alice.ovpn"))
    operator = cli.process()
    for network in ("10.8.0.0/31", "0.0.0.0/0", "10.0.0.0/8"):
        refused = operator.run(
            "openvpn",
            "server-config",
            "--network",
            network,
            "--out",
            str(tmp_path / "nt"),
            ok=False,
        )
        assert refused.returncode == 2 and "network" in refused.stderr, refused.stderr
    assert not (tmp_path / "nt").exists()
    refused = operator.run(
        "openvpn", "server-cert", "--cn", "", "--out", str(tmp_path / "d"), ok=False
    )
    assert refused.returncode == 2 and "invalid name ''" in refused.stderr
    cli.run("openvpn", "client", "revoke", "alice", "--yes")
    again = operator.run("openvpn", "client", "revoke", "alice", "--yes", ok=False)
    assert again.returncode == 6 and "already revoked" in again.stderr
    unknown = operator.run("openvpn", "client", "revoke", "nobody", "--yes", ok=False)
    assert unknown.returncode == 5
    listed = json.loads(cli.run("certs", "list", "--json").stdout)
    assert [c for c in listed if c.get("profile") == "openvpn-server"] == []  # nothing issued


def test_revoking_a_client_of_an_intermediate_revoked_without_its_key_says_so(
    cli: InProcessTrellis, tmp_path: Path
) -> None:
    """Regression: the skipped CRL was only logged. The client is revoked all the same (the
    root's CRL lists its issuer); the warning and --json's crl_skipped say so, as for
    trellis revoke."""
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "vpn.example.org")
    for name in ("alice", "bob"):
        cli.run("openvpn", "client", "add", name, "--out", str(tmp_path / f"{name}.ovpn"))
    for key in (cli.data_dir / "keys").glob("vpn-intermediate-*"):
        key.unlink()
    cli.run("authority", "revoke-intermediate", "--authority", "vpn", "--yes")
    text = cli.run("openvpn", "client", "revoke", "alice", "--yes").stdout  # stdout and stderr
    assert "warning: the issuer's CRL was not re-signed" in text, text
    assert "missing from the file key store" in text
    (revoked,) = _json(cli, "openvpn", "client", "revoke", "bob", "--yes")["revoked"]
    assert revoked["status"] == "revoked"
    assert "missing from the file key store" in revoked["crl_skipped"]


@pytest.mark.parametrize(
    ("command", "in_the_way"),
    [("server-cert", "server.key"), ("server-config", "tls-crypt.key")],
)
def test_a_server_file_that_cannot_be_written_is_refused_before_issuing(
    cli: InProcessTrellis, tmp_path: Path, command: str, in_the_way: str
) -> None:
    """A directory where one of the files goes: the certificate was issued, the files before
    it written, the key lost (exit 8), and the certificate stayed live; server-config had
    also recorded the directory and its crl.pem as the CRL file. Now: exit 2 naming the file,
    nothing issued, written or recorded."""
    cli.run("openvpn", "init")
    cli.run("openvpn", "configure", "--remote", "vpn.example.org")
    out = tmp_path / "srv"
    (out / in_the_way).mkdir(parents=True)
    refused = cli.process().run("openvpn", command, "--out", str(out), ok=False)
    assert refused.returncode == 2, refused
    assert f"{out / in_the_way}: is a directory" in refused.stderr
    assert [path.name for path in out.iterdir()] == [in_the_way]
    listed = json.loads(cli.run("certs", "list", "--json").stdout)
    assert [c for c in listed if c.get("profile") == "openvpn-server"] == []
    assert _json(cli, "openvpn", "configure")["crl_path"] is None


def test_crl_of_an_authority_that_is_not_openvpn_is_refused(
    cli: InProcessTrellis, tmp_path: Path
) -> None:
    """Regression: ``crl --authority mesh --out F`` wrote the mesh CA's CRLs, where every other
    openvpn command says there is no such OpenVPN authority (exit 5)."""
    cli.run("init", "--trust-domain", "example.org")
    cli.run("openvpn", "init")
    out = tmp_path / "mesh-crl.pem"
    refused = cli.process().run(
        "openvpn", "crl", "--authority", "mesh", "--out", str(out), ok=False
    )
    assert refused.returncode == 5, refused
    assert "no OpenVPN authority 'mesh'" in refused.stderr
    assert not out.exists()


def test_the_mesh_and_gateway_names_are_refused_before_anything_is_set_up(
    cli: InProcessTrellis, tmp_path: Path
) -> None:
    """Regression: ``openvpn init --name mesh`` on a new data dir exited 0, and then 'trellis
    init' exited 6 and 'trellis init --exists-ok' (make run) 2 on the VPN's empty trust domain;
    ``--name gateway`` handed 'trellis gateway init' the VPN's CA."""
    operator = cli.process()
    for name, owner in (("mesh", "the SPIFFE mesh"), ("gateway", "the API gateway")):
        refused = operator.run("openvpn", "init", "--authority", name, ok=False)
        assert refused.returncode == 2, refused
        assert refused.stderr == (
            f"trellis: the authority name {name!r} is reserved for {owner}:"
            " give the openvpn authority another name\n"
        )
    assert not cli.data_dir.exists() and not (tmp_path / "trellis.db").exists()
    operator.set_up("init", "--trust-domain", "d6.example")
    again = operator.run("init", "--exists-ok", "--trust-domain", "d6.example")
    assert again.stdout.startswith("A CA for d6.example already exists"), again
    operator.set_up("gateway", "init")


def test_init_refuses_an_older_trellis_openvpn_mesh_or_gateway(
    cli: InProcessTrellis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database where an older Trellis let an OpenVPN authority take those names: the inits
    say so (exit 6) instead of taking it for their own, --exists-ok included."""
    with monkeypatch.context() as older:
        older.setattr("ca.authority._RESERVED", {})
        cli.run("openvpn", "init", "--name", "mesh")
        cli.run("openvpn", "init", "--name", "gateway")
    operator = cli.process()
    for args in (
        ("init", "--trust-domain", "d6.example"),
        ("init", "--exists-ok", "--trust-domain", "d6.example"),
        ("init", "--force", "--trust-domain", "d6.example"),
    ):
        refused = operator.run(*args, ok=False)
        assert refused.returncode == 6, refused
        assert refused.stderr == (
            "trellis: authority 'mesh' has purpose openvpn, not spiffe: it is never used as one,"
            " and no init, forced or not, replaces it\n"
        )
    refused = operator.run("gateway", "init", ok=False)
    assert refused.returncode == 6, refused
    assert "authority 'gateway' has purpose openvpn, not gateway" in refused.stderr


def test_init_names_its_authority_with_authority_and_still_takes_name(
    cli: InProcessTrellis,
) -> None:
    """``--authority``, as every other openvpn command calls it; ``--name``, its old spelling,
    still works but is not offered in --help."""
    assert "--authority" in cli.run("openvpn", "init", "--help").stdout
    assert "--name" not in cli.run("openvpn", "init", "--help").stdout
    assert _json(cli, "openvpn", "init", "--authority", "vpn2")["authority"] == "vpn2"
    assert _json(cli, "openvpn", "init", "--name", "vpn3")["authority"] == "vpn3"
    assert _json(cli, "openvpn", "init", "--authority", "vpn4", "--name", "vpn4")["authority"] == (
        "vpn4"
    )
    both = cli.process().run("openvpn", "init", "--authority", "vpn5", "--name", "vpn6", ok=False)
    assert both.returncode == 2, both
    assert both.stderr == "trellis: --name is the old spelling of --authority: give one of them\n"


def test_authority_status_of_the_vpn_names_no_trust_domain(cli: InProcessTrellis) -> None:
    """Only the mesh has a trust domain: the VPN's status line read 'authority vpn (), ...'."""
    cli.run("openvpn", "init")
    first = cli.run("authority", "status", "--authority", "vpn").stdout.splitlines()[0]
    assert first.startswith("authority vpn, bundle sequence "), first
