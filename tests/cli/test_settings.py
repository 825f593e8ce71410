"""Settings the CLI refuses: every bad ``TRELLIS_*`` value (or option overriding one) is one
line naming it and exit 2, before anything is done (docs/configuration.md)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import zygote
from tests.cli.test_walkthrough import Trellis

pytestmark = pytest.mark.slow


@pytest.fixture
def bare(tmp_path: Path) -> Trellis:
    """No CA: settings are judged before the data dir is looked at."""
    return Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")


@pytest.fixture
def local(tmp_path: Path) -> Trellis:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


def _one_line(result: object, starts: str) -> None:
    stderr = getattr(result, "stderr", "")
    assert getattr(result, "returncode", None) == 2, result
    assert stderr.startswith(f"trellis: {starts}"), stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # RFC 5280 §4.2.1.6: a dNSName is a host name, never empty; they went into the
        # serving certificate as DNS:bad name!, DNS:
        ("TRELLIS_SERVER_NAMES", '["bad name!"]'),
        ("TRELLIS_SERVER_NAMES", '["trellis.example.org", ""]'),
        ("TRELLIS_SERVER_NAMES", "notjson"),  # pydantic-settings' SettingsError, a traceback
        ("TRELLIS_SERVER_NAMES", '"trellis.example.org"'),
        # Every certificate's CRL, OCSP and caIssuers URLs are built on it.
        ("TRELLIS_PUBLIC_URL", "not a url"),
        ("TRELLIS_PUBLIC_URL", "ftp://ca.example.org"),
        ("TRELLIS_PUBLIC_URL", "https://ca.example.org/?y"),
        ("TRELLIS_PUBLIC_URL", "https://ca.example.org/#z"),
        # https://user:pw@...: refused with the password masked (tests/cli/test_url_passwords.py)
        ("TRELLIS_PUBLIC_URL", "https:///v1"),
        # written into every certificate's CDP and AIA, where no client can connect to it
        ("TRELLIS_PUBLIC_URL", "https://ca.example.org:0"),
        ("TRELLIS_PUBLIC_URL", "https://ca.example.org:/pki"),
        ("TRELLIS_PUBLIC_URL", "https://[2001:db8::1]:"),
        ("TRELLIS_DATABASE_URL", "garbage"),  # sqlalchemy's ArgumentError, a traceback
        ("TRELLIS_DATABASE_URL", "mysql://u@h/db"),
        ("TRELLIS_BUNDLE_REFRESH_HINT", "-5"),  # published as spiffe_refresh_hint
        ("TRELLIS_BUNDLE_REFRESH_HINT", "0"),
        ("TRELLIS_BUNDLE_REFRESH_HINT", "86401"),  # go-spiffe reads it as an int64; a day
        ("TRELLIS_WORKERS", "abc"),
        ("TRELLIS_WORKERS", "-1"),
        # an OverflowError traceback after the banner; 5000 started 5000 workers
        ("TRELLIS_WORKERS", "65"),
        ("TRELLIS_WORKERS", "99999999999999999999999"),
        ("TRELLIS_PORT", "-1"),
        ("TRELLIS_PORT", "70000"),
        ("TRELLIS_HOST", "999.1.1.1"),
        ("TRELLIS_HOST", "bad host"),
        # recorded with each gateway truststore, shown by 'trellis jobs list'
        ("TRELLIS_NODE_NAME", ""),
        ("TRELLIS_NODE_NAME", "node a"),
        ("TRELLIS_NODE_NAME", "nöde-a"),
        # said "key backend 'foo' is not configured", naming no variable
        ("TRELLIS_KEY_BACKEND", "foo"),
        ("TRELLIS_KEY_BACKEND", "vault"),  # without TRELLIS_VAULT_ADDR
        # accepted (exit 0) without TRELLIS_VAULT_ADDR, unnamed with it
        ("TRELLIS_VAULT_TIMEOUT", "-1"),
        ("TRELLIS_VAULT_TIMEOUT", "0"),
        ("TRELLIS_VAULT_TIMEOUT", "inf"),
        ("TRELLIS_VAULT_AUTH_METHOD", "bogus"),
        # went into the X-Vault-Namespace header ("cannot reach Vault: InvalidHeader", exit 8)
        # and unquoted into the vault command a warning suggests
        ("TRELLIS_VAULT_NAMESPACE", "team\nx"),
        ("TRELLIS_VAULT_NAMESPACE", "team a"),
        ("TRELLIS_VAULT_NAMESPACE", "../admin"),
        ("TRELLIS_VAULT_KUBERNETES_MOUNT", "../x"),  # the transit and KV mounts were checked
        ("TRELLIS_VAULT_TRANSIT_MOUNT", "../x"),  # ... but not named as the variable
        # requests' own words at the first Vault call, exit 8
        ("TRELLIS_VAULT_ADDR", "https://vault.example.org:99999"),
        ("TRELLIS_VAULT_ADDR", "https://vault.example.org:0"),
        ("TRELLIS_VAULT_ADDR", "https://vault.example.org:/"),
        ("TRELLIS_VAULT_ADDR", "vault.example.org:8200"),  # said as "Vault address ..."
        ("TRELLIS_VAULT_CA_CERT", "/nonexistent/vault-ca.pem"),
        ("TRELLIS_VAULT_CLIENT_CERT", "/nonexistent/client.pem"),
    ],
)
def test_a_bad_setting_stops_every_command_in_one_line(
    bare: Trellis, variable: str, value: str
) -> None:
    bare.env[variable] = value
    for command in (["certs", "list"], ["serve"]):  # a serve that starts would time out
        _one_line(bare.run(*command, ok=False, real=False), f"{variable}={value!r}: ")
    assert not bare.data_dir.exists()


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true"]
)
def test_an_in_memory_database_is_refused(bare: Trellis, url: str) -> None:
    """'init' said "Initialised" (exit 0), wrote keys and an admin token, and the database
    went with the process; each further init "succeeded" and left more orphan keys."""
    bare.env["TRELLIS_DATABASE_URL"] = url
    _one_line(
        bare.run("init", "--trust-domain", "example.com", ok=False),
        f"TRELLIS_DATABASE_URL={url!r}: an in-memory database keeps nothing",
    )
    assert not bare.data_dir.exists()


@pytest.mark.parametrize(("where", "name"), [("env", "TRELLIS_DATA_DIR"), ("option", "--data-dir")])
def test_an_empty_data_dir_is_refused(bare: Trellis, tmp_path: Path, where: str, name: str) -> None:
    """An empty TRELLIS_DATA_DIR (or --data-dir "") was the current directory: init wrote the CA
    there and made it 0700."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(mode=0o755)
    env = {**bare.env, "TRELLIS_DATA_DIR": "" if where == "env" else str(bare.data_dir)}
    given = ["--data-dir", ""] if where == "option" else []
    result = zygote.run([*given, "init", "--trust-domain", "example.com"], env=env, cwd=cwd)
    _one_line(result, f"{name}='': empty")
    assert list(cwd.iterdir()) == [] and cwd.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TRELLIS_KEY_PASSPHRASE", "short", "at least 12 characters"),
        ("TRELLIS_VAULT_TOKEN", "sec ret", "not a Vault token: only printable ASCII characters"),
    ],
)
def test_a_bad_secret_setting_is_named_but_not_repeated(
    bare: Trellis, variable: str, value: str, message: str
) -> None:
    """The line goes to a terminal or a log: the passphrase was unnamed ("the key passphrase
    must be at least 12 characters"), the Vault token repeated (TRELLIS_VAULT_TOKEN='sec ret')."""
    bare.env[variable] = value
    for command in (["certs", "list"], ["serve"]):
        result = bare.run(*command, ok=False)
        _one_line(result, f"{variable}: {message}")
        assert value not in result.stderr
    assert not bare.data_dir.exists()


def test_a_vault_token_and_a_token_file_are_refused_together(bare: Trellis) -> None:
    """The file won, silently: which token Trellis used was not the one the operator read."""
    token_file = bare.data_dir.parent / "vault-token"
    token_file.write_text("hvs.from-the-file\n")
    bare.env.update(
        TRELLIS_VAULT_ADDR="http://127.0.0.1:1",
        TRELLIS_VAULT_TOKEN="hvs.from-the-variable",
        TRELLIS_VAULT_TOKEN_FILE=str(token_file),
    )
    for command in (["certs", "list"], ["vault", "check"]):
        result = bare.run(*command, ok=False)
        _one_line(
            result,
            f"TRELLIS_VAULT_TOKEN_FILE={str(token_file)[:80]!r}: TRELLIS_VAULT_TOKEN is set too:"
            " give the token or the file, not both",
        )
        assert "hvs.from-the-variable" not in result.stderr
    assert not bare.data_dir.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--port", "70000"),
        ("--port", "0"),
        ("--host", "999.1.1.1"),
        ("--workers", "-2"),
        ("--workers", "65"),
        ("--workers", "99999999999999999999999"),
    ],
)
def test_a_bad_serve_option_is_one_line_before_the_banner(
    bare: Trellis, option: str, value: str
) -> None:
    """--port 70000 printed "listening on https://127.0.0.1:70000" and listened on 4464."""
    result = bare.run("serve", option, value, ok=False)
    _one_line(result, f"{option}={value!r}: ")
    assert result.stdout == ""


def test_good_settings_are_accepted(bare: Trellis) -> None:
    bare.env.update(
        TRELLIS_SERVER_NAMES='["trellis.example.org", "*.mesh.example.org", "10.0.0.1", "::1"]',
        TRELLIS_PUBLIC_URL="https://ca.example.org:8443/pki/",
        TRELLIS_HOST="::",
        TRELLIS_WORKERS="0",
        TRELLIS_NODE_NAME="worker-3.example.org",
    )
    bare.run("init", "--trust-domain", "example.org")
    bare.run("certs", "list")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_exit_8_in_one_line_without_the_banner(
    local: Trellis, workers: str
) -> None:
    """It printed "listening on ..." and then exited 3 (authentication failed) with a uvicorn
    JSON log line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = local.run("serve", "--port", str(port), "--workers", workers, ok=False)
    assert result.returncode == 8, result
    assert result.stderr == f"trellis: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert "listening on" not in result.stdout


def test_an_address_this_host_does_not_have_is_exit_8(local: Trellis) -> None:
    result = local.run("serve", "--host", "192.0.2.1", "--port", "8443", ok=False)
    assert result.returncode == 8, result
    assert result.stderr.startswith("trellis: cannot listen on 192.0.2.1:8443: ")
    assert result.stderr.count("\n") == 1 and "listening on" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "create"], "give exactly one of --entry ID or --admin"),
        (["revoke", "--yes"], "give a SERIAL or --spiffe-id\n"),  # it said "not both"
        (["bundle", "show", "--format", "bogus"], "--format 'bogus': pem or jwks"),
        (["init"], "--trust-domain (or TRELLIS_TRUST_DOMAIN) is required"),
        (["istio", "issue", "--cluster", "c1"], "give --out PATH or --kubeconfig PATH"),
    ],
)
def test_trellis_own_usage_checks_are_one_line(
    local: Trellis, args: list[str], message: str
) -> None:
    """They went through click: Usage, Try and Error, three lines (docs/cli.md: one line)."""
    result = local.run(*args, ok=False)
    _one_line(result, message)


def test_backup_refuses_postgresql_before_connecting_and_messages_are_one_line(
    local: Trellis, tmp_path: Path
) -> None:
    """backup connected first (exit 8, libpq's two lines); docs/operations.md: exit 2."""
    down = "postgresql://u:p@127.0.0.1:1/db"
    local.env["TRELLIS_DATABASE_URL"] = down
    _one_line(
        local.run("backup", "--out", str(tmp_path / "x.tgz"), ok=False),
        "backup and restore cover SQLite installations",
    )
    unreachable = local.run("certs", "list", ok=False)
    assert unreachable.returncode == 8, unreachable
    assert unreachable.stderr.startswith("trellis: cannot reach the database: ")
    assert unreachable.stderr.count("\n") == 1 and "\t" not in unreachable.stderr


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("init", "--trust-domain", "example.org"), id="mesh"),
        pytest.param(("openvpn", "init"), id="openvpn"),
        pytest.param(("gateway", "init"), id="gateway"),
    ],
)
def test_init_with_vault_but_no_vault_settings_is_the_operators_mistake(
    bare: Trellis, command: tuple[str, ...]
) -> None:
    """docs/cli.md: exit 2 naming the settings, for every init (openvpn and gateway init were
    exit 8, 'key backend 'vault' is not configured', an outage), and the option, which is
    read as the setting it overrides."""
    _one_line(
        bare.run(*command, "--key-backend", "vault", ok=False),
        "--key-backend='vault': the vault key backend needs TRELLIS_VAULT_ADDR",
    )
    assert not bare.data_dir.exists()


def test_a_bundle_that_is_not_there_is_exit_2_naming_bundle(local: Trellis, tmp_path: Path) -> None:
    missing = tmp_path / "nonexist.pem"
    _one_line(
        local.run("audit", "verify", "--bundle", str(missing), ok=False),
        f"--bundle {missing}: no such file",
    )
    request = local.run(
        "svid",
        "request",
        "--server",
        "https://127.0.0.1:1",
        "--bundle",
        str(missing),
        "--token",
        "t",
        "--out",
        str(tmp_path / "out"),
        ok=False,
    )
    _one_line(request, f"--bundle {missing}: cannot read the trust bundle")


def test_restore_of_a_file_that_is_not_there_is_exit_2_before_the_data_dir(
    local: Trellis, tmp_path: Path
) -> None:
    """A non-empty data dir was reported (exit 6) for an archive that does not exist."""
    missing = tmp_path / "nonexist.tgz"
    _one_line(local.run("restore", str(missing), ok=False), f"{missing}: no such backup file")
