"""The CLI on a Vault-backed instance, as an operator runs it (real ``trellis`` processes, the
session's OpenBao): a refused init leaves nothing behind, a seal that cannot sign says so, and an
intermediate whose Transit key is gone can still be revoked."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.cli.test_walkthrough import Trellis
from tests.conftest import TRUST_DOMAIN, free_port
from tests.vault.conftest import CLEANUP_POLICY_FILE, POLICY_FILE
from tests.vault.openbao import OpenBao

pytestmark = pytest.mark.slow


def vault_cli(data_dir: Path, openbao: OpenBao, token: str) -> Trellis:
    cli = Trellis(data_dir, f"sqlite:///{data_dir / 'trellis.db'}")
    cli.env.pop("TRELLIS_KEY_PASSPHRASE")  # the file backend's own passphrase file, as by default
    cli.env |= {
        "TRELLIS_KEY_BACKEND": "vault",
        "TRELLIS_VAULT_ADDR": openbao.address,
        "TRELLIS_VAULT_TOKEN": token,
        "TRELLIS_VAULT_TIMEOUT": "5",
    }
    return cli


def transit_keys(openbao: OpenBao) -> set[str]:
    try:
        return set(openbao.api("LIST", "transit/keys")["data"]["keys"])
    except RuntimeError:  # 404: no key at all
        return set()


def test_a_refused_vault_init_leaves_nothing_behind(openbao: OpenBao, tmp_path: Path) -> None:
    """With the opt-in clean-up policy, which lets Trellis delete the keys it made."""
    cannot_sign = CLEANUP_POLICY_FILE.read_text().replace("/sign/", "/sign-not/")
    openbao.put_policy("trellis-cannot-sign", cannot_sign)
    tokens = {"bogus": "bogus", "no-sign": openbao.create_token("trellis-cannot-sign", ttl="1h")}
    keys = transit_keys(openbao)
    held = tmp_path / "held"
    held.mkdir(mode=0o700)  # a looser one would be tightened, with a warning first on stderr
    (held / "notes.txt").write_text("the operator's\n")
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    for name, token in tokens.items():
        for data_dir in (tmp_path / "new" / name, empty, held):
            result = vault_cli(data_dir, openbao, token).run(
                "init", "--trust-domain", TRUST_DOMAIN.name, ok=False
            )
            assert result.returncode == 8, (name, data_dir, result)
            assert result.stderr.startswith("trellis: "), result.stderr
            assert transit_keys(openbao) == keys, "a Transit key was left behind"
        assert not (tmp_path / "new").exists()  # nor the parent it made
        assert empty.is_dir() and list(empty.iterdir()) == []
        assert [p.name for p in held.iterdir()] == ["notes.txt"]
        # A database outside the data dir, in a directory that was not there: its write lock
        # (made on the first write) and that directory were left behind.
        apart = vault_cli(tmp_path / "var", openbao, token)
        apart.env["TRELLIS_DATABASE_URL"] = f"sqlite:///{tmp_path / 'db' / 'here' / 'x.db'}"
        result = apart.run("init", "--trust-domain", TRUST_DOMAIN.name, ok=False)
        assert result.returncode == 8, (name, result)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "held"], name


def test_a_refused_vault_init_under_the_shipped_policy_names_the_key_it_leaves(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """The shipped policy may not delete keys: the key a failed init made stays in Transit, one
    warning names it and the commands that delete it, and the error is still the init's own."""
    openbao.put_policy(
        "trellis-shipped-cannot-sign", POLICY_FILE.read_text().replace("/sign/", "/x/")
    )
    token = openbao.create_token("trellis-shipped-cannot-sign", ttl="1h")
    keys = transit_keys(openbao)
    result = vault_cli(tmp_path / "var", openbao, token).run(
        "init", "--trust-domain", TRUST_DOMAIN.name, ok=False
    )
    assert result.returncode == 8, result
    left = transit_keys(openbao) - keys
    assert sorted(k.split("-")[2] for k in left) == ["intermediate", "root"]  # trellis-mesh-…
    [root] = (k for k in left if "-root-" in k)
    [intermediate] = left - {root}
    assert result.stderr.splitlines() == [
        *(
            f"warning: Transit key {key} is left in Vault: no CA uses it, and Trellis's Vault "
            "policy does "
            f"not let it delete keys; delete it by hand: vault write transit/keys/{key}/config "
            f"deletion_allowed=true && vault delete transit/keys/{key}"
            for key in (root, intermediate)  # one warning each, in the order init made them
        ),
        f"trellis: Vault denied 'update' on transit/sign/{root}: the token's policy lacks that "
        "capability (run 'trellis vault check'; see deploy/vault/trellis-policy.hcl)",
    ]
    assert not (tmp_path / "var").exists()
    for key in left:
        assert openbao.transit_key(key)["deletion_allowed"] is False
        openbao.api("POST", f"transit/keys/{key}/config", {"deletion_allowed": True})
        openbao.api("DELETE", f"transit/keys/{key}")


def test_audit_seal_without_vault_exits_8_and_revoking_a_keyless_intermediate_works(
    openbao: OpenBao, tmp_path: Path
) -> None:
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cli.set_up("init", "--trust-domain", TRUST_DOMAIN.name)
    cli.set_up("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN.name}/web")

    cut_off = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cut_off.env["TRELLIS_VAULT_ADDR"] = f"http://127.0.0.1:{free_port()}"
    sealing = cut_off.run("audit", "seal", ok=False)
    assert sealing.returncode == 8, sealing
    assert "but could not sign the head: cannot reach Vault" in sealing.stderr, sealing.stderr
    assert "sealed" not in sealing.stdout
    cli.run("audit", "seal")
    verified = cli.json("audit", "verify")
    assert isinstance(verified, dict) and verified["ok"] and verified["unsigned"] == 0

    with sqlite3.connect(tmp_path / "var" / "trellis.db") as db:
        serial, key_ref = db.execute(
            "SELECT serial, key_ref FROM ca WHERE role = 'intermediate' AND state = 'active'"
        ).fetchone()
    name = key_ref.split("@", 1)[0]
    openbao.api("POST", f"transit/keys/{name}/config", {"deletion_allowed": True})
    openbao.api("DELETE", f"transit/keys/{name}")
    revoked = cli.run("authority", "revoke-intermediate", "--yes")
    assert f"revoked intermediate {serial}" in revoked.stdout.replace(":", "").lower(), revoked
    assert "own final CRL was not signed" in revoked.stderr, revoked.stderr
    assert "missing from the vault key store" in revoked.stderr, revoked.stderr
    cli.run("crl", "fetch", "--ca", "root", "--out", str(tmp_path / "root.crl"))
    root_crl = x509.load_der_x509_crl((tmp_path / "root.crl").read_bytes())
    listed = root_crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert listed is not None


@pytest.mark.parametrize(
    ("mount", "said"),
    [("cubbyhole", "cubbyhole/ is cubbyhole, not transit"), ("nope", "nope/ is not mounted")],
    ids=["fail/not-transit", "fail/no-mount"],
)
def test_init_on_a_mount_that_is_no_transit_engine_exits_8_and_leaves_nothing(
    openbao: OpenBao, tmp_path: Path, mount: str, said: str
) -> None:
    """A cubbyhole (or KV v1) would keep the create body as a secret; a missing mount was
    reported as not found (exit 5). Both are Vault not set up as configured: exit 8."""
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cli.env["TRELLIS_VAULT_TRANSIT_MOUNT"] = mount
    result = cli.run("init", "--trust-domain", TRUST_DOMAIN.name, ok=False)
    assert result.returncode == 8, result
    assert result.stderr.startswith("trellis: ") and said in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "var").exists()
    with pytest.raises(RuntimeError, match="HTTP 404"):
        openbao.api("LIST", f"{mount}/keys")


def test_a_vault_only_instance_needs_no_key_passphrase(openbao: OpenBao, tmp_path: Path) -> None:
    """Every key and secret is in Vault, so nothing reads the file backend's passphrase: an
    emptied ``key-passphrase`` was exit 8 for every command, ``serve`` included."""
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cli.set_up("init", "--trust-domain", TRUST_DOMAIN.name)
    passphrase = tmp_path / "var" / "key-passphrase"
    assert not passphrase.exists()  # nothing is encrypted with one, so none is made
    passphrase.write_bytes(b"")
    cli.run("openvpn", "init")  # its tls-crypt keys go to the KV store, not sealed files
    cli.run("openvpn", "configure", "--remote", "vpn.example.org")
    cli.run("openvpn", "client", "add", "alice", "--out", str(tmp_path / "alice.ovpn"))
    entry = cli.run("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN.name}/web")
    token = cli.run("token", "create", "--entry", entry.stdout.strip()).stdout.strip()
    with cli.serving(tmp_path / "serve.log") as served:
        bundle = str(tmp_path / "var" / "bundle.pem")
        out = tmp_path / "web"
        cli.run("svid", "request", "--server", served.url, "--bundle", bundle, "--token", token,
                "--out", str(out))  # fmt: skip
    assert x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert passphrase.read_bytes() == b""  # neither read nor replaced
    assert not (tmp_path / "var" / "secrets").exists()


def test_vault_init_under_the_default_file_backend_makes_no_key_passphrase(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """docs/vault.md's set-up as written: ``init --key-backend vault`` without
    ``TRELLIS_KEY_BACKEND=vault``. Every command then starts under the file backend, which
    checks the passphrase at its start; it generated ``key-passphrase`` there (init, and
    ``entry list`` after an ``rm``), though nothing was ever encrypted with it."""
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    del cli.env["TRELLIS_KEY_BACKEND"]
    passphrase = tmp_path / "var" / "key-passphrase"
    cli.run("init", "--trust-domain", TRUST_DOMAIN.name, "--key-backend", "vault")
    assert list((tmp_path / "var" / "keys").iterdir()) == []
    assert not passphrase.exists()
    cli.run("entry", "list")
    cli.run("svid", "mint", "--spiffe-id", f"spiffe://{TRUST_DOMAIN.name}/w",
            "--out", str(tmp_path / "w"))  # fmt: skip
    with cli.serving(tmp_path / "serve.log"):
        pass
    assert not passphrase.exists()
    cli.run("openvpn", "init", "--key-backend", "file")  # the first file key makes it
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600


def test_a_file_key_on_a_vault_instance_needs_the_passphrase_where_it_is_used(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """An authority kept in files beside Vault ones (``--key-backend file``) needs the
    passphrase for its keys and sealed secrets: unusable, that is exit 8 naming the file where
    they are used, and at ``serve``'s start; the Vault authorities go on working."""
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cli.set_up("init", "--trust-domain", TRUST_DOMAIN.name)
    passphrase = tmp_path / "var" / "key-passphrase"
    passphrase.touch(mode=0o600)  # not looser: that would add a warning to stderr
    passphrase.write_bytes(b"short\n")
    damaged = (
        f"trellis: the key passphrase file {passphrase} is empty or shorter than 12 characters:"
        " put back the passphrase the CA keys were encrypted with, or set TRELLIS_KEY_PASSPHRASE"
    )
    refused = cli.run("openvpn", "init", "--key-backend", "file", ok=False)
    assert refused.returncode == 8 and refused.stderr.splitlines() == [damaged], refused
    assert list((tmp_path / "var" / "keys").iterdir()) == []
    assert cli.run("openvpn", "client", "list", ok=False).returncode == 5  # no authority

    passphrase.unlink()
    cli.run("openvpn", "init", "--key-backend", "file")  # makes one, as a file instance does
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    cli.set_up("openvpn", "configure", "--remote", "vpn.example.org")
    kept = passphrase.read_bytes()
    passphrase.write_bytes(b"short\n")
    add = ("openvpn", "client", "add", "bob", "--out", str(tmp_path / "bob.ovpn"))
    refused = cli.run(*add, ok=False)
    assert refused.returncode == 8 and refused.stderr.splitlines() == [damaged], refused
    assert not (tmp_path / "bob.ovpn").exists()
    serve = cli.run("serve", "--port", str(free_port()), ok=False)
    assert serve.returncode == 8 and serve.stderr.splitlines()[-1] == damaged, serve  # after logs
    cli.run("svid", "mint", "--spiffe-id", f"spiffe://{TRUST_DOMAIN.name}/w",
            "--out", str(tmp_path / "w"))  # fmt: skip
    passphrase.unlink()
    missing = cli.run(*add, ok=False)
    assert missing.returncode == 8, missing
    assert missing.stderr.splitlines() == [
        f"trellis: the CA keys in {tmp_path / 'var' / 'keys'} are encrypted, and {passphrase}"
        " is missing: put it back, or set TRELLIS_KEY_PASSPHRASE"
    ]
    assert not passphrase.exists()  # no new one in its place
    passphrase.write_bytes(kept)
    cli.run(*add)


def test_a_server_names_no_path_of_its_own_to_clients(openbao: OpenBao, tmp_path: Path) -> None:
    """A file authority made beside the Vault ones while ``serve`` runs (it read no passphrase
    at its start), then the passphrase file damaged: ``/readyz``, which anyone may read, and an
    admin's problem response say what is wrong without the path of the file, which only the
    server's log names. Both gave the file's full path."""
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cli.set_up("init", "--trust-domain", TRUST_DOMAIN.name)
    admin = {"Authorization": "Bearer " + cli.set_up("token", "create", "--admin").strip()}
    passphrase = tmp_path / "var" / "key-passphrase"
    log = tmp_path / "serve.log"
    with cli.serving(log) as served:
        cli.set_up("openvpn", "init", "--key-backend", "file")
        cli.set_up("openvpn", "configure", "--remote", "vpn.example.org")
        passphrase.write_bytes(b"short\n")
        deadline = time.monotonic() + 15  # past the passing verdict /readyz reuses (READY_FOR)
        while (ready := httpx.get(f"{served.url}/readyz", verify=served.tls)).is_success:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.1)
        added = httpx.post(
            f"{served.url}/v1/openvpn/clients", json={"name": "carol"}, headers=admin,
            verify=served.tls,
        )  # fmt: skip
    keys = ready.json()["detail"]["keys"]
    assert keys == "the key passphrase file holds no usable passphrase", ready.text
    assert added.status_code == 503, added.text
    assert added.json()["detail"] == "the key passphrase file holds no usable passphrase"
    assert f"the key passphrase file {passphrase} is empty" in log.read_text()  # for its operator


def test_restoring_a_vault_only_instance_asks_for_no_key_passphrase(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """The archive of an instance whose keys are all in Vault holds no key file and no sealed
    secret: restore told it, as every instance, to set TRELLIS_KEY_PASSPHRASE."""
    cli = vault_cli(tmp_path / "var", openbao, openbao.root_token)
    cli.set_up("init", "--trust-domain", TRUST_DOMAIN.name)
    backed_up = cli.run("backup", "--out", str(tmp_path / "backup.tgz")).stdout
    assert "passphrase" not in backed_up, backed_up  # it has none to keep
    restored = vault_cli(tmp_path / "restored", openbao, openbao.root_token)
    said = restored.run("restore", str(tmp_path / "backup.tgz")).stdout
    assert "TRELLIS_KEY_PASSPHRASE" not in said and "no key passphrase needed" in said, said
    again = vault_cli(tmp_path / "again", openbao, openbao.root_token)
    shown = again.json("restore", str(tmp_path / "backup.tgz"))
    assert isinstance(shown, dict) and shown["needs_key_passphrase"] is False
    restored.run("certs", "list")  # and it runs without one


def _ca_keys(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT key_ref FROM ca WHERE key_backend = 'vault'").fetchall()
    return {str(ref).split("@")[0] for (ref,) in rows}


def test_a_restored_copy_never_destroys_the_vault_keys_of_the_instance_it_came_from(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """'init --force' on a restored copy, with the clean-up policy, deleted the Transit keys of
    the instance the backup was taken of (which then failed: "CA key ... is missing from the
    vault key store"); with the shipped policy it said they were used by no CA and how to
    delete them. The keys the copy inherited now stay, with a warning that the original may
    still sign with them and no command to delete them; keys the copy made itself after the
    restore are cleaned up as on any instance."""
    openbao.put_policy("trellis-cleanup", CLEANUP_POLICY_FILE.read_text())
    cleanup = openbao.create_token("trellis-cleanup", ttl="1h")
    shipped = openbao.create_token("trellis", ttl="1h")
    original = vault_cli(tmp_path / "var", openbao, shipped)
    original.set_up("init", "--trust-domain", TRUST_DOMAIN.name)
    original.set_up("backup", "--out", str(tmp_path / "backup.tgz"))
    inherited = _ca_keys(tmp_path / "var" / "trellis.db")
    assert len(inherited) == 2 and inherited <= transit_keys(openbao)

    copy = vault_cli(tmp_path / "copy", openbao, cleanup)
    said = copy.run("restore", str(tmp_path / "backup.tgz")).stdout
    for key in inherited:
        assert f"  Vault key            {key}@v1\n" in said, said
    assert "warning: only one of this instance and the one the backup was taken of may run" in said
    forced = copy.run("init", "--trust-domain", "v5.test", "--force")
    assert inherited <= transit_keys(openbao)
    warnings = sorted(line for line in forced.stderr.splitlines() if line.startswith("warning:"))
    assert warnings == sorted(
        f"warning: vault key {key}@v1 is left in place: this instance was restored from a"
        " backup, and the instance the backup was taken of may still sign with it; delete it"
        " only once no instance uses it"
        for key in inherited
    ), forced.stderr
    assert "no CA uses it" not in forced.stderr and "vault delete" not in forced.stderr
    original.run("vault", "check")
    original.run("svid", "mint", "--spiffe-id", f"spiffe://{TRUST_DOMAIN.name}/after",
                 "--out", str(tmp_path / "minted"))  # fmt: skip

    own = _ca_keys(tmp_path / "copy" / "trellis.db")
    assert own and not own & inherited and own <= transit_keys(openbao)
    again = copy.run("init", "--trust-domain", "v5.test", "--force")
    assert not own & transit_keys(openbao), "the copy's own keys were left"
    assert inherited <= transit_keys(openbao)
    assert all(key not in again.stderr for key in own), again.stderr
    original.run("vault", "check")
