"""A restored instance is a copy of the one its backup was taken of: it acts on the same things
outside its data dir (restore lists them and says only one may run), and its CRL numbers go on
above every number the original signed (RFC 5280 §5.2.3), though its database went back."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ca.restored import MARKER, crl_numbers_from
from tests.conftest import PASSPHRASE
from tests.gateway.test_gateway_cli import Cli


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.delenv("TRELLIS_DATABASE_URL", raising=False)
    monkeypatch.delenv("TRELLIS_DATA_DIR", raising=False)
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", PASSPHRASE)
    return Cli(capsys)


def _mint(cli: Cli, data_dir: Path, name: str, out: Path) -> str:
    spiffe_id = f"spiffe://example.org/{name}"
    minted = cli.json("--data-dir", str(data_dir), "svid", "mint", "--spiffe-id", spiffe_id,
                      "--out", str(out / name))  # fmt: skip
    return str(minted["serial"])


def _crl_number(cli: Cli, data_dir: Path) -> int:
    return int(cli.json("--data-dir", str(data_dir), "crl", "show")["number"])


def test_a_restored_copy_lists_what_it_acts_on_and_outnumbers_the_original_s_crls(
    cli: Cli, tmp_path: Path
) -> None:
    """Restoring an older backup took each CA's CRL number back to the backup's: the copy's
    next CRL reused numbers the original had already signed (for CRLs with revocations the
    copy lacks). And nothing said that the copy rewrites the original's OpenVPN CRL file: a
    revocation on the copy made the live VPN's CRL drop one made on the original."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    crl_file = tmp_path / "vpn" / "crl.pem"
    crl_file.parent.mkdir()
    run = ["--data-dir", str(original)]
    cli.run(*run, "init", "--trust-domain", "example.org")
    cli.run(*run, "openvpn", "init")
    cli.run(*run, "openvpn", "configure", "--remote", "vpn.example.org",
            "--crl-path", str(crl_file))  # fmt: skip
    serials = [_mint(cli, original, name, tmp_path) for name in ("a", "b", "c")]
    cli.run(*run, "revoke", serials[0], "--yes")
    cli.run(*run, "backup", "--out", str(tmp_path / "backup.tgz"))
    for serial in serials[1:]:  # after the backup: the restore rolls these back
        cli.run(*run, "revoke", serial, "--yes")
    signed = _crl_number(cli, original)

    before = dt.datetime.now(dt.UTC)
    restored = cli.json("--data-dir", str(copy), "restore", str(tmp_path / "backup.tgz"))
    assert restored["acts_on"]["openvpn_crl_files"] == [str(crl_file)]
    assert restored["acts_on"]["vault_keys"] == []  # file keys: the copy has its own
    assert restored["warning"].startswith("only one of this instance and the one the backup")
    said = cli.run("--data-dir", str(tmp_path / "again"), "restore", str(tmp_path / "backup.tgz"))
    assert f"\n  OpenVPN CRL file     {crl_file}\n" in said, said
    assert (
        "\nwarning: only one of this instance and the one the backup was taken of may run" in said
    )
    marker = json.loads((copy / MARKER).read_text())
    assert marker["crl_numbers_from"] >= crl_numbers_from(before)

    assert _crl_number(cli, copy) < signed  # the backup's CRL, served until it is re-signed
    cli.run("--data-dir", str(copy), "revoke", serials[1], "--yes")  # re-revoked on the copy
    after = _crl_number(cli, copy)
    assert after > signed and after >= marker["crl_numbers_from"]
    cli.run("--data-dir", str(copy), "revoke", serials[2], "--yes")
    assert _crl_number(cli, copy) == after + 1  # and on by one, as on any instance
