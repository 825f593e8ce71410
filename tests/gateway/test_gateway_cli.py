"""``trellis gateway``: the commands, their ``--json`` shapes (the REST models) and exit codes.

Run in-process through ``cli.main.main`` (the entry point's own error handling) to keep the
suite fast; ``test_gateway_nginx.py`` runs the installed ``trellis`` as real processes.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from ca import gateway
from cli import gateway as cli_gateway
from cli.common import STATE
from cli.launch import Interrupted
from cli.main import main
from tests.conftest import PASSPHRASE
from tests.gateway.gwkit import partner_csr

CERT_KEYS = {
    "serial", "consumer", "status", "delivery", "not_before", "not_after", "fingerprint_sha256",
    "x5t#S256", "requested_by", "revoked_at", "revocation_reason", "certificate", "chain",
    "pkcs12", "clamped",
}  # fmt: skip


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.err = ""  # the last command's stderr

    def run(self, *args: str, code: int = 0) -> str:
        self.capsys.readouterr()
        try:
            main(list(args))
            exit_code = 0
        except SystemExit as exc:
            exit_code = exc.code if isinstance(exc.code, int) else 1
        out, err = self.capsys.readouterr()
        self.err = err
        assert exit_code == code, (args, out, err)
        return out if code == 0 else err

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json"))


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.setenv("TRELLIS_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("TRELLIS_DATABASE_URL", f"sqlite:///{tmp_path / 'trellis.db'}")
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", PASSPHRASE)
    return Cli(capsys)


def test_onboarding_with_json_output(cli: Cli, tmp_path: Path) -> None:
    init = cli.json("gateway", "init", "--max-ttl", "200d")
    assert set(init) == {
        "authority", "default_ttl", "max_ttl", "root_serial", "root_fingerprint_sha256",
        "root_not_after", "intermediate_serial", "intermediate_not_after",
    }  # fmt: skip
    assert (init["default_ttl"], init["max_ttl"]) == ("90d", "200d")
    assert "already" in cli.run("gateway", "init", code=6)

    added = cli.json("gateway", "consumer", "add", "acme", "--contact", "api@acme.example")
    assert added["name"] == "acme" and added["enabled"] is True
    assert "added gateway consumer globex" in cli.run("gateway", "consumer", "add", "globex")
    assert "invalid consumer name" in cli.run("gateway", "consumer", "add", "Nope", code=2)

    (tmp_path / "acme.csr").write_bytes(partner_csr()[1])
    issued = cli.json("gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "acme.csr"),
                      "--out", str(tmp_path / "acme.pem"))  # fmt: skip
    assert set(issued) == CERT_KEYS
    assert (issued["delivery"], issued["requested_by"], issued["pkcs12"]) == ("csr", "cli", None)
    written = x509.load_pem_x509_certificates((tmp_path / "acme.pem").read_bytes())
    assert format(written[0].serial_number, "x") == issued["serial"]
    assert len(written) == 2  # leaf, then the issuing intermediate

    (tmp_path / "pw").write_text("correct horse battery\n")
    text = cli.run("gateway", "cert", "issue", "acme", "--p12", str(tmp_path / "acme.p12"),
                   "--p12-password-file", str(tmp_path / "pw"), "--legacy-p12")  # fmt: skip
    assert "Trellis keeps no copy" in text and "x5t#S256" in text
    assert (tmp_path / "acme.p12").stat().st_mode & 0o777 == 0o600
    bundle = pkcs12.load_pkcs12((tmp_path / "acme.p12").read_bytes(), b"correct horse battery")
    assert bundle.cert is not None and bundle.key is not None

    shown = cli.json("gateway", "cert", "show", issued["serial"])
    assert shown == issued | {"chain": None}
    assert "x5t#S256      " + issued["x5t#S256"] in cli.run(
        "gateway", "cert", "show", issued["serial"]
    )
    listed = cli.json("gateway", "cert", "list", "--consumer", "acme", "--live")
    assert len(listed) == 2 and all(set(c) == CERT_KEYS for c in listed)
    consumers = cli.json("gateway", "consumer", "list")
    assert [(c["name"], c["live_certificates"]) for c in consumers] == [("acme", 2), ("globex", 0)]
    assert "acme" in cli.run("gateway", "consumer", "list")

    # the rules, as exit codes (docs/cli.md): 409 → 6, 403 → 4, 404 → 5, bad input → 2
    again = ("gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "acme.csr"),
             "--out", str(tmp_path / "again.pem"))  # fmt: skip
    assert "already holds 2 valid certificates" in cli.run(*again, code=6)
    assert not (tmp_path / "again.pem").exists()
    revoked = cli.json("gateway", "cert", "revoke", issued["serial"], "--reason", "superseded")
    assert set(revoked) == CERT_KEYS | {"rewritten", "crl_skipped"}
    assert (revoked["status"], revoked["crl_skipped"]) == ("revoked", None)
    assert "already revoked" in cli.run("gateway", "cert", "revoke", issued["serial"], code=6)
    disabled = cli.run("gateway", "consumer", "disable", "acme")
    assert "still holds 1 valid certificate" in disabled
    assert "disabled" in cli.run(*again, code=4)
    (tmp_path / "bad.csr").write_text("not a csr")
    bad = ("gateway", "cert", "issue", "globex", "--csr", str(tmp_path / "bad.csr"),
           "--out", str(tmp_path / "bad.pem"))  # fmt: skip
    assert "not a valid PEM" in cli.run(*bad, code=2)
    assert "no gateway consumer" in cli.run("gateway", "consumer", "disable", "initech", code=5)
    assert "--csr needs --out" in cli.run("gateway", "cert", "issue", "globex",
                                          "--csr", str(tmp_path / "bad.csr"), code=2)  # fmt: skip
    (tmp_path / "short").write_text("short\n")
    short = ("gateway", "cert", "issue", "globex", "--p12", str(tmp_path / "g.p12"),
             "--p12-password-file", str(tmp_path / "short"))  # fmt: skip
    assert "8 to 1024" in cli.run(*short, code=2)
    (tmp_path / "adir").mkdir()
    into_a_directory = ("gateway", "cert", "issue", "globex", "--p12", str(tmp_path / "adir"))
    assert f"--p12 {tmp_path / 'adir'}: is a directory" in cli.run(*into_a_directory, code=2)


def test_truststore_and_snippet_commands(cli: Cli, tmp_path: Path) -> None:
    assert "trellis gateway init" in cli.run(
        "gateway", "truststore", "--format", "pem", "--out", str(tmp_path / "ca.pem"), code=7
    )
    cli.run("gateway", "init")
    out = cli.run("gateway", "truststore", "--format", "nginx", "--out", str(tmp_path / "ng"))
    assert out.split() == ["wrote", str(tmp_path / "ng" / "crl.pem"),
                           "wrote", str(tmp_path / "ng" / "client-ca.pem")]  # fmt: skip
    assert cli.run("gateway", "truststore", "--refresh").strip() == "unchanged"
    assert "give --format and --out" in cli.run("gateway", "truststore", "--format", "pem", code=2)
    assert "pem, nginx, aws, kong" in cli.run(
        "gateway", "truststore", "--format", "jks", "--out", str(tmp_path / "x"), code=2
    )
    assert cli.run("gateway", "nginx-snippet") == gateway.nginx_snippet(gateway.NginxSnippet())
    assert "contains characters" in cli.run("gateway", "nginx-snippet", "--server-name", "a b",
                                            code=2)  # fmt: skip
    assert "the port 1 to 65535" in cli.run("gateway", "nginx-snippet", "--listen", "99999", code=2)
    assert "is empty or relative" in cli.run("gateway", "nginx-snippet", "--truststore", "", code=2)


@pytest.mark.parametrize("upstream", ["http://127.0.0.1:99999", "http://user:pw@127.0.0.1"])
def test_an_upstream_nginx_refuses_is_exit_2(cli: Cli, upstream: str) -> None:
    assert "upstream" in cli.run("gateway", "nginx-snippet", "--upstream", upstream, code=2)


def test_init_names_the_option_to_change(cli: Cli) -> None:
    """The gateway has no SVIDs and no --svid-ttl: the message names the CA TTL, not a flag."""
    err = cli.run(
        "gateway", "init", "--ca-ttl", "5s", "--default-ttl", "1s", "--max-ttl", "2s", code=2
    )
    assert "SVID" not in err and "--svid-ttl" not in err
    assert "give a CA TTL of 6h or more" in err and "--ca-ttl" not in err


def test_revoking_under_an_intermediate_revoked_without_its_key_says_so(
    cli: Cli, tmp_path: Path
) -> None:
    """Regression: the skipped CRL was only logged. It is revoked all the same (the root's CRL
    lists its issuer); the warning and --json's crl_skipped say so, as for trellis revoke."""
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme")
    (tmp_path / "acme.csr").write_bytes(partner_csr()[1])
    serials = [
        cli.json("gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "acme.csr"),
                 "--out", str(tmp_path / f"{i}.pem"))["serial"]
        for i in range(2)
    ]  # fmt: skip
    for key in (tmp_path / "var" / "keys").glob("gateway-intermediate-*"):
        key.unlink()
    cli.run("authority", "revoke-intermediate", "--authority", "gateway", "--yes")
    assert f"revoked {serials[0]} (acme)" in cli.run("gateway", "cert", "revoke", serials[0])
    assert "warning: the issuer's CRL was not re-signed" in cli.err
    assert "missing from the file key store" in cli.err
    revoked = cli.json("gateway", "cert", "revoke", serials[1])
    assert revoked["status"] == "revoked"
    assert "missing from the file key store" in revoked["crl_skipped"]


def test_a_pkcs12_interrupted_on_its_way_to_the_file_is_withdrawn(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a full disk) while ``--p12`` is written: the key exists nowhere else, so the
    certificate is revoked before the command ends; it stayed live and counted against the
    consumer's limit."""
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme")
    (tmp_path / "pw").write_text("correct horse battery\n")

    def interrupted(path: Path, data: bytes) -> None:
        raise Interrupted

    with monkeypatch.context() as patched, pytest.raises(Interrupted):
        patched.setattr(cli_gateway, "write_private", interrupted)
        main(["gateway", "cert", "issue", "acme", "--p12", str(tmp_path / "acme.p12"),
              "--p12-password-file", str(tmp_path / "pw")])  # fmt: skip
    STATE.close()
    (cert,) = cli.json("gateway", "cert", "list", "--consumer", "acme")
    assert (cert["status"], cert["revocation_reason"]) == ("revoked", "superseded")
    assert cli.json("gateway", "consumer", "list")[0]["live_certificates"] == 0


@pytest.mark.parametrize(
    ("content", "why"),
    [
        pytest.param(b"pass\x00word12\n", "must not contain NUL", id="fail/nul"),
        pytest.param("éééé\n".encode(), "8 to 1024 characters", id="fail/4-characters-8-bytes"),
        pytest.param(b"password1\nsecond line\n", "more than one line", id="fail/two-lines"),
        pytest.param(b"password1\r\n", "carriage return", id="fail/crlf"),
        pytest.param(b"\xffpassword1\n", "UTF-8", id="fail/not-utf8"),
    ],
)
def test_a_password_file_rest_or_openssl_would_read_otherwise_is_refused(
    cli: Cli, tmp_path: Path, content: bytes, why: str
) -> None:
    """The REST rules (characters, no NUL; ca.gateway.check_pkcs12_password) and OpenSSL's
    '-passin file:' reading (one line, docs/gateway.md): exit 2 before anything is issued."""
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme")
    (tmp_path / "pw").write_bytes(content)
    refused = cli.run("gateway", "cert", "issue", "acme", "--p12", str(tmp_path / "a.p12"),
                      "--p12-password-file", str(tmp_path / "pw"), code=2)  # fmt: skip
    assert why in refused
    assert cli.json("gateway", "cert", "list") == [] and not (tmp_path / "a.p12").exists()


def test_the_password_is_the_file_s_one_line_as_openssl_reads_it(cli: Cli, tmp_path: Path) -> None:
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme")
    for name, content in [("lf", "éééééééé\n"), ("bare", "éééééééé")]:
        (tmp_path / name).write_text(content, encoding="utf-8")
        p12 = tmp_path / f"{name}.p12"
        cli.run("gateway", "cert", "issue", "acme", "--p12", str(p12),
                "--p12-password-file", str(tmp_path / name))  # fmt: skip
        checked = subprocess.run(
            ["openssl", "pkcs12", "-info", "-noout", "-in", str(p12),
             "-passin", f"file:{tmp_path / name}"],
            capture_output=True, check=False,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stderr


def test_a_missing_input_file_is_exit_2(cli: Cli, tmp_path: Path) -> None:
    """A file named on the command line that is not there is a wrong argument (docs/cli.md),
    for --csr as for --p12-password-file; --csr was exit 8."""
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme")
    missing = tmp_path / "missing"
    refused = cli.run("gateway", "cert", "issue", "acme", "--csr", str(missing),
                      "--out", str(tmp_path / "a.pem"), code=2)  # fmt: skip
    assert refused == f"trellis: --csr {missing}: no such file\n"
    refused = cli.run("gateway", "cert", "issue", "acme", "--p12", str(tmp_path / "a.p12"),
                      "--p12-password-file", str(missing), code=2)  # fmt: skip
    assert refused == f"trellis: --p12-password-file {missing}: no such file\n"


def test_cert_list_says_how_to_get_the_next_page(cli: Cli, tmp_path: Path) -> None:
    """Regression: the list stopped at 1,000 certificates, silently. As ``certs list``: a page
    with more after it ends with the next page's command on stderr (filters, --limit and --json
    kept), --json stays the array; followed, it reaches every certificate once, newest first."""
    cli.run("gateway", "init")
    for name in ("acme", "globex", "initech"):
        cli.run("gateway", "consumer", "add", name)
    (tmp_path / "p.csr").write_bytes(partner_csr()[1])
    for i, name in enumerate(["acme", "globex", "acme", "initech", "globex"]):
        cli.run("gateway", "cert", "issue", name, "--csr", str(tmp_path / "p.csr"),
                "--out", str(tmp_path / f"{i}.pem"))  # fmt: skip
    every = cli.json("gateway", "cert", "list")
    assert len(every) == 5 and cli.err == ""

    seen, args, pages = [], ["gateway", "cert", "list", "--limit", "2", "--json"], 0
    while True:  # as a script would: run the line it is given until there is none
        page = json.loads(cli.run(*args))
        seen += page
        pages += 1
        if not cli.err:
            break
        assert len(page) == 2
        assert cli.err == (
            f"more: trellis gateway cert list --limit 2 --json --after {page[-1]['serial']}\n"
        )
        args = cli.err.split()[2:]
    assert pages == 3 and seen == every

    text = cli.run("gateway", "cert", "list", "--consumer", "acme", "--live", "--limit", "1")
    acme = [c["serial"] for c in every if c["consumer"] == "acme"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == acme[:1]
    again = "trellis gateway cert list --consumer acme --live --limit 1"
    assert cli.err == f"more: {again} --after {acme[0]}\n"
    last = cli.run(*again.split()[1:], "--after", acme[0])
    assert [line.split()[0] for line in last.splitlines()[1:]] == acme[1:] and cli.err == ""


def test_cert_list_refuses_bad_paging_with_exit_2(cli: Cli) -> None:
    cli.run("gateway", "init")
    for args, message in [
        (("--limit", "0"), "limit must be between 1 and 1000"),
        (("--limit", "1001"), "limit must be between 1 and 1000"),
        (("--after", "not-hex"), "invalid serial"),
        (("--after", "abcdef"), "not there to page after"),
    ]:
        assert message in cli.run("gateway", "cert", "list", *args, code=2), args


def test_consumer_add_before_init_is_exit_7_as_truststore_is(cli: Cli, tmp_path: Path) -> None:
    cli.run("init", "--trust-domain", "example.org")
    refused = cli.run("gateway", "consumer", "add", "acme", code=7)
    assert "trellis gateway init" in refused
    cli.run("gateway", "truststore", "--format", "pem", "--out", str(tmp_path / "t.pem"), code=7)
    assert cli.json("gateway", "consumer", "list") == []


def test_truststore_commands_print_json(cli: Cli, tmp_path: Path) -> None:
    """``truststore``, ``--refresh`` and ``remove`` had no --json: scripts parsed "wrote PATH"."""
    cli.run("gateway", "init")
    ng = tmp_path / "ng"
    written = cli.json("gateway", "truststore", "--format", "nginx", "--out", str(ng), "--json")
    assert written == {
        "format": "nginx",
        "written": [str(ng / "crl.pem"), str(ng / "client-ca.pem")],
    }
    assert cli.json("gateway", "truststore", "--refresh", "--json") == {"rewritten": []}
    (ng / "crl.pem").write_text("stale\n")  # what a refresh puts right
    assert cli.json("gateway", "truststore", "--refresh", "--json") == {
        "rewritten": [str(ng / "crl.pem")]
    }
    removed = cli.json("gateway", "truststore", "remove", "--out", str(ng), "--json")
    assert removed == {"node": socket.gethostname(), "path": str(ng), "format": "nginx"}
    assert cli.json("gateway", "truststore", "--refresh", "--json") == {"rewritten": []}
