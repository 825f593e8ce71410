"""The README walkthrough, end to end, as a user runs it: real `trellis` processes, a real
HTTPS server, real openssl verifying the results; on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import zygote
from tests.conftest import free_port
from tests.processes import terminate

pytestmark = pytest.mark.slow

TRELLIS = zygote.TRELLIS


class Trellis:
    """Runs the CLI against one data dir and database, like an operator's shell."""

    def __init__(self, data_dir: Path, database_url: str, *, real: bool = False) -> None:
        self.real = real  # every command a real executable (tests.zygote), as a user's are
        self.env = {
            **os.environ,
            "TRELLIS_DATA_DIR": str(data_dir),
            "TRELLIS_DATABASE_URL": database_url,
            "TRELLIS_KEY_PASSPHRASE": "walkthrough-passphrase",
        }
        self.data_dir = data_dir

    def run(
        self, *args: str, ok: bool = True, real: bool | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``real``: as ``tests.zygote.run``'s, for one command."""
        result = zygote.run(args, env=self.env, real=True if self.real else real)
        if ok and result.returncode != 0:
            raise AssertionError(f"trellis {' '.join(args)} failed: {result.stderr}")
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json").stdout)

    def set_up(self, *args: str) -> str:
        """``trellis ARGS`` in this process, for state a test starts from and does not test (an
        ``init``, an ``openvpn configure``): the same Typer app, environment and data, without
        the ~0.7 s of CPU a new interpreter spends importing. Its output."""
        from typer.testing import CliRunner

        from cli.common import STATE
        from cli.main import app

        result = CliRunner().invoke(app, list(args), env=self.env)
        STATE.close()
        if result.exit_code != 0:
            raise AssertionError(f"trellis {' '.join(args)} failed: {result.output}") from (
                result.exception
            )
        return result.stdout

    @contextlib.contextmanager
    def serving(
        self,
        log: Path,
        *args: str,
        wrapper: Sequence[str] = (),
        up: str = "/readyz",
    ) -> Iterator[Serving]:
        """``trellis serve`` on a free loopback port, once ``up`` answers; stopped after
        (SIGTERM, then SIGKILL). Its output goes to ``log``, shown when it fails to come up.
        ``wrapper``: the command it runs under (``setpriv ...``)."""
        port = free_port()
        with log.open("w") as out:
            process = subprocess.Popen(
                [*wrapper, TRELLIS, "serve", "--port", str(port), *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        tls = ssl.create_default_context(cafile=str(self.data_dir / "bundle.pem"))
        url = f"https://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, (
                    f"serve exited {process.returncode}: {log.read_text()}"
                )
                try:
                    if httpx.get(f"{url}{up}", verify=tls, timeout=2).is_success:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)  # a late poll keeps a test waiting for a server already up
            yield Serving(process, port, url, tls)
        finally:
            terminate(process, grace=30)


@dataclass(frozen=True)
class Serving:
    process: subprocess.Popen[bytes]
    port: int
    url: str
    tls: ssl.SSLContext


def openssl_verify(bundle: Path, svid: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(bundle),
            "-untrusted",
            str(svid),
            str(svid),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def readme_trellis(tmp_path: Path, database_url: str) -> Trellis:
    """The README's first step as a user runs it: ``trellis init``, the real executable, as
    every command of the walkthrough (the conftest's ``trellis`` sets the CA up in-process)."""
    cli = Trellis(tmp_path / "var", database_url, real=True)
    cli.run("init", "--trust-domain", "example.org")
    return cli


@pytest.fixture
def readme_server(readme_trellis: Trellis, tmp_path: Path) -> Iterator[str]:
    with readme_trellis.serving(tmp_path / "serve.log") as serving:
        yield serving.url


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_readme_walkthrough(readme_trellis: Trellis, readme_server: str, tmp_path: Path) -> None:
    trellis, server = readme_trellis, readme_server
    bundle = trellis.data_dir / "bundle.pem"
    admin_token = (trellis.data_dir / "admin-token").read_text().strip()
    assert (trellis.data_dir / "admin-token").stat().st_mode & 0o777 == 0o600

    # 1. a registration entry, by CLI; a second one by REST with the admin token
    entry_id = trellis.run(
        "entry", "create", "--spiffe-id", "spiffe://example.org/ns/default/sa/web"
    ).stdout.strip()
    rest = httpx.post(
        f"{server}/v1/entries",
        json={"spiffe_id": "spiffe://example.org/ns/default/sa/api"},
        headers={"Authorization": f"Bearer {admin_token}"},
        verify=ssl.create_default_context(cafile=str(bundle)),
    )
    assert rest.status_code == 201, rest.text
    listed = trellis.json("entry", "list")
    assert isinstance(listed, list)
    assert {e["spiffe_id"] for e in listed} == {
        "spiffe://example.org/ns/default/sa/web",
        "spiffe://example.org/ns/default/sa/api",
    }

    # 2. a join token; 3. the workload requests its SVID with it
    token = trellis.run("token", "create", "--entry", entry_id).stdout.strip()
    out = tmp_path / "web"
    trellis.run(
        "svid",
        "request",
        "--server",
        server,
        "--bundle",
        str(bundle),
        "--token",
        token,
        "--out",
        str(out),
    )
    assert (out / "svid.key").stat().st_mode & 0o777 == 0o600
    for purpose in ("sslclient", "sslserver"):
        result = openssl_verify(out / "bundle.pem", out / "svid.pem", purpose)
        assert result.returncode == 0, result.stdout + result.stderr
    first_serial = _serial(out / "svid.pem")

    # the token was single-use
    again = trellis.run(
        "svid",
        "request",
        "--server",
        server,
        "--bundle",
        str(bundle),
        "--token",
        token,
        "--out",
        str(tmp_path / "again"),
        ok=False,
    )
    assert again.returncode == 3 and "already been used" in again.stderr
    assert not (tmp_path / "again").exists()

    # 4. renewal by possession of the current key only
    trellis.run("svid", "renew", "--server", server, "--dir", str(out))
    second_serial = _serial(out / "svid.pem")
    assert second_serial != first_serial
    assert openssl_verify(out / "bundle.pem", out / "svid.pem", "sslclient").returncode == 0

    # 5. the admin lists, revokes, and renewal of the revoked SVID is refused
    certs = trellis.json("certs", "list", "--spiffe-id", "spiffe://example.org/ns/default/sa/web")
    assert isinstance(certs, list)
    assert {c["serial"] for c in certs} == {first_serial, second_serial}
    assert all(c["status"] == "active" for c in certs)
    revoked = trellis.json("revoke", second_serial, "--reason", "keyCompromise", "--yes")
    assert isinstance(revoked, dict) and revoked["status"] == "revoked"
    assert revoked["revocation_reason"] == "keyCompromise"
    shown = trellis.json("certs", "show", second_serial)
    assert isinstance(shown, dict) and shown["status"] == "revoked"

    before = (out / "svid.pem").read_bytes()
    refused = trellis.run("svid", "renew", "--server", server, "--dir", str(out), ok=False)
    assert refused.returncode == 3 and "revoked" in refused.stderr
    assert (out / "svid.pem").read_bytes() == before  # the old files are untouched

    again_revoke = trellis.run(
        "revoke", second_serial, "--reason", "keyCompromise", "--yes", ok=False
    )
    assert again_revoke.returncode == 6

    listed_revoked = trellis.json("certs", "list", "--status", "revoked")
    assert isinstance(listed_revoked, list)
    assert [c["serial"] for c in listed_revoked] == [second_serial]

    # the bundle the CLI prints is the one the server publishes
    served = httpx.get(f"{server}/v1/bundle", verify=ssl.create_default_context(cafile=str(bundle)))
    assert served.text.strip() == trellis.run("bundle", "show").stdout.strip()


# The details REST answers for the same reasons (tests/api/test_rest_revocation.py).
HOLD = "certificateHold is not a reason Trellis revokes for"
EMPTY_REASON = "unknown revocation reason ''"


def test_cli_errors_are_one_line_and_non_zero(trellis: Trellis) -> None:
    cases = [
        (("entry", "create", "--spiffe-id", "spiffe://example.org/a/"), 2, "trailing slash"),
        (("entry", "create", "--spiffe-id", "spiffe://other.org/a"), 2, "trust domain"),
        (("entry", "show", "00000000-0000-0000-0000-000000000000"), 5, "does not exist"),
        (("revoke", "zz-not-hex", "--yes"), 2, "invalid serial"),
        (("revoke", "abcdef", "--yes"), 5, "no certificate"),
        (("revoke", "abcdef", "--reason", "because", "--yes"), 2, "unknown revocation reason"),
        (("revoke", "abcdef", "--reason", "removeFromCRL", "--yes"), 2, "not a reason to revoke"),
        (("revoke", "abcdef", "--reason", "certificateHold", "--yes"), 2, HOLD),
        (("authority", "revoke-intermediate", "--reason", "certificateHold", "--yes"), 2, HOLD),
        (("authority", "revoke-intermediate", "--reason", "", "--yes"), 2, EMPTY_REASON),
        (("init", "--trust-domain", "example.org"), 6, "already exists"),
        (("token", "create", "--entry", "nope"), 5, "does not exist"),
    ]
    for args, code, text in cases:
        result = trellis.run(*args, ok=False)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], (args, result.stderr)


def test_serve_refuses_to_start_without_a_ca(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "empty", f"sqlite:///{tmp_path / 'empty.db'}")
    result = cli.run("serve", "--port", str(free_port()), ok=False)
    assert result.returncode == 7
    assert "trellis init" in result.stderr


def _serial(path: Path) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number, "x")


def test_minted_svid_json_is_shaped_like_requested_and_is_not_renewable(
    trellis: Trellis, server: str, tmp_path: Path
) -> None:
    from cryptography import x509

    minted_dir = tmp_path / "minted"
    minted = trellis.json(
        "svid", "mint", "--spiffe-id", "spiffe://example.org/m", "--out", str(minted_dir)
    )
    entry_id = trellis.run("entry", "create", "--spiffe-id", "spiffe://example.org/r").stdout
    token = trellis.run("token", "create", "--entry", entry_id.strip()).stdout.strip()
    bundle = str(trellis.data_dir / "bundle.pem")
    requested_dir = tmp_path / "requested"
    requested = trellis.json(
        "svid", "request", "--server", server, "--bundle", bundle, "--token", token,
        "--out", str(requested_dir),
    )  # fmt: skip
    assert isinstance(minted, dict) and isinstance(requested, dict)
    assert minted.keys() == requested.keys()
    # REST's shape (what request passes on): "...Z", not isoformat's "...+00:00"
    for document, directory in ((minted, minted_dir), (requested, requested_dir)):
        cert = x509.load_pem_x509_certificates((directory / "svid.pem").read_bytes())[0]
        assert document["expires_at"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    refused = trellis.run("svid", "renew", "--server", server, "--dir", str(minted_dir), ok=False)
    assert refused.returncode == 4, refused.stderr
    assert "minted SVIDs are not renewable, mint a new one" in refused.stderr
    assert "deleted" not in refused.stderr
