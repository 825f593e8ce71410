"""Logging in to OpenBao (token, token file, AppRole, Kubernetes), keeping the token alive
(renewal, re-login), and telling an operator exactly what the policy lacks (``trellis vault
check``). Every login here gets the shipped policy (deploy/vault/trellis-policy.hcl) only.

Kubernetes auth needs a Kubernetes API to review service-account tokens, so the JWT auth method
stands in: it takes the same ``{"role", "jwt"}`` login body, and we sign the "service-account
token" ourselves with a key whose public half the auth method is configured with.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.config import Settings
from ca.errors import InvalidInput, Unavailable
from ca.keys import KeyType
from ca.keys.vault import VaultAuth, VaultKeyBackend, render_policy, requirements
from cli.main import main
from tests.ca.test_file_keys import raw_sign, verify
from tests.conftest import free_port
from tests.vault.conftest import CLEANUP_POLICY_FILE, POLICY_FILE
from tests.vault.openbao import OpenBao
from tests.vault.test_vault_cli import transit_keys

K8S_MOUNT = "k8s-jwt"
SERVICE_ACCOUNT = "system:serviceaccount:trellis:trellis-ca"


def backend_for(server: OpenBao, **settings: Any) -> VaultKeyBackend:
    return VaultKeyBackend.from_settings(Settings(vault_addr=server.address, **settings))


@pytest.fixture
def backends() -> Iterator[list[VaultKeyBackend]]:
    """Backends made by a test, closed after it."""
    made: list[VaultKeyBackend] = []
    yield made
    for backend in made:
        backend.connection.close()


def sign_once(backend: VaultKeyBackend, handle: Any = None) -> None:
    handle = handle or backend.create(KeyType.EC_P256, "auth")
    signer = backend.load(handle)
    verify(signer.public_key(), KeyType.EC_P256, raw_sign(signer, b"hello"), b"hello")


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def approle(openbao: OpenBao) -> dict[str, str]:
    openbao.enable_auth("approle", "approle")
    roles = {
        "trellis": {"token_ttl": "1h"},
        "trellis-short": {"token_ttl": "1s", "token_max_ttl": "1s"},
    }
    for role, ttls in roles.items():
        openbao.api("POST", f"auth/approle/role/{role}", {"token_policies": ["trellis"], **ttls})
    return {
        role: openbao.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        for role in roles
    }


def secret_id(openbao: OpenBao, role: str, tmp_path: Path) -> Path:
    value = openbao.api("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
    return write_secret(tmp_path / f"{role}-secret-id", value)


@pytest.fixture(scope="module")
def kubernetes_signing_key(openbao: OpenBao) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    openbao.enable_auth(K8S_MOUNT, "jwt")
    openbao.api("POST", f"auth/{K8S_MOUNT}/config", {"jwt_validation_pubkeys": [public.decode()]})
    openbao.api(
        "POST",
        f"auth/{K8S_MOUNT}/role/trellis",
        {
            "role_type": "jwt",
            "bound_audiences": ["openbao"],
            "user_claim": "sub",
            "bound_subject": SERVICE_ACCOUNT,
            "token_policies": ["trellis"],
            "token_ttl": "1h",
        },
    )
    return key


def service_account_token(key: ec.EllipticCurvePrivateKey, subject: str = SERVICE_ACCOUNT) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": subject,
        "aud": ["openbao"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": "trellis", "serviceaccount": {"name": "trellis-ca"}},
    }
    return jwt.encode(claims, key, algorithm="ES256")


# -- token ------------------------------------------------------------------------------------


def test_token_login_with_the_shipped_policy(
    openbao: OpenBao, backends: list[VaultKeyBackend]
) -> None:
    backend = backend_for(openbao, vault_token=openbao.create_token("trellis", ttl="1h"))
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "token")
    sign_once(backend, handle)
    backend.store_secret("auth/token", b"kv works with the policy")
    assert backend.read_secret("auth/token") == b"kv works with the policy"
    backend.destroy(handle)
    backend.check()


def test_token_is_renewed_before_it_expires(
    openbao: OpenBao, backends: list[VaultKeyBackend]
) -> None:
    token = openbao.create_token("trellis", ttl="2s", explicit_max_ttl="60s", renewable=True)
    backend = backend_for(openbao, vault_token=token)
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "renewed")
    for _ in range(2):  # 2.4 s in all: past the 2 s the token was issued with
        time.sleep(1.2)
        sign_once(backend, handle)
    info = openbao.api("POST", "auth/token/lookup", {"token": token})["data"]
    assert info["last_renewal_time"] and info["ttl"] > 0


def test_token_file_is_read_again_when_vault_rejects_the_token(
    openbao: OpenBao, backends: list[VaultKeyBackend], tmp_path: Path
) -> None:
    first = openbao.create_token("trellis", ttl="1h")
    token_file = write_secret(tmp_path / "token", first)
    backend = backend_for(openbao, vault_token_file=token_file)
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "token-file")
    openbao.api("POST", "auth/token/revoke", {"token": first})
    write_secret(token_file, openbao.create_token("trellis", ttl="1h"))  # as Vault Agent would
    sign_once(backend, handle)


def test_a_revoked_fixed_token_is_a_clear_unavailable(
    openbao: OpenBao, backends: list[VaultKeyBackend]
) -> None:
    token = openbao.create_token("trellis", ttl="1h")
    backend = backend_for(openbao, vault_token=token)
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "revoked")
    openbao.api("POST", "auth/token/revoke", {"token": token})
    with pytest.raises(Unavailable, match="no longer accepts Trellis's token"):
        sign_once(backend, handle)


# -- AppRole ----------------------------------------------------------------------------------


def test_approle_login_and_relogin_after_revocation(
    openbao: OpenBao, approle: dict[str, str], backends: list[VaultKeyBackend], tmp_path: Path
) -> None:
    backend = backend_for(
        openbao,
        vault_auth_method="approle",
        vault_role_id=approle["trellis"],
        vault_secret_id_file=secret_id(openbao, "trellis", tmp_path),
    )
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "approle")
    sign_once(backend, handle)
    first = backend.connection.token_info()["accessor"]
    openbao.api("POST", "auth/token/revoke-accessor", {"accessor": first})
    sign_once(backend, handle)  # 403, the token no longer looks up: log in again, retry
    assert backend.connection.token_info()["accessor"] != first


def test_approle_token_at_its_max_ttl_is_replaced_by_a_new_login(
    openbao: OpenBao, approle: dict[str, str], backends: list[VaultKeyBackend], tmp_path: Path
) -> None:
    backend = backend_for(
        openbao,
        vault_auth_method="approle",
        vault_role_id=approle["trellis-short"],
        vault_secret_id_file=secret_id(openbao, "trellis-short", tmp_path),
    )
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "short")
    first = backend.connection.token_info()["accessor"]
    time.sleep(1.1)  # the 1 s token has expired and cannot be renewed past its max TTL
    sign_once(backend, handle)
    assert backend.connection.token_info()["accessor"] != first


def test_approle_with_a_wrong_secret_id_is_unavailable(
    openbao: OpenBao, approle: dict[str, str], tmp_path: Path
) -> None:
    backend = backend_for(
        openbao,
        vault_auth_method="approle",
        vault_role_id=approle["trellis"],
        vault_secret_id_file=write_secret(tmp_path / "wrong", "not-a-secret-id"),
    )
    with pytest.raises(Unavailable, match="approle login at auth/approle/login failed"):
        backend.check()
    backend.connection.close()


# -- Kubernetes (JWT auth standing in) --------------------------------------------------------


def test_kubernetes_login_reads_the_service_account_token(
    openbao: OpenBao,
    kubernetes_signing_key: ec.EllipticCurvePrivateKey,
    backends: list[VaultKeyBackend],
    tmp_path: Path,
) -> None:
    token_file = write_secret(tmp_path / "sa-token", service_account_token(kubernetes_signing_key))
    backend = backend_for(
        openbao,
        vault_auth_method="kubernetes",
        vault_kubernetes_role="trellis",
        vault_kubernetes_mount=K8S_MOUNT,
        vault_kubernetes_token_file=token_file,
    )
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "kubernetes")
    sign_once(backend, handle)
    assert backend.connection.token_info()["policies"] == ["default", "trellis"]
    # The kubelet rotates projected tokens: a re-login reads the file again.
    write_secret(token_file, service_account_token(kubernetes_signing_key))
    accessor = backend.connection.token_info()["accessor"]
    openbao.api("POST", "auth/token/revoke-accessor", {"accessor": accessor})
    sign_once(backend, handle)


def test_kubernetes_login_for_another_service_account_is_refused(
    openbao: OpenBao, kubernetes_signing_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    wrong = service_account_token(kubernetes_signing_key, "system:serviceaccount:default:web")
    backend = backend_for(
        openbao,
        vault_auth_method="kubernetes",
        vault_kubernetes_role="trellis",
        vault_kubernetes_mount=K8S_MOUNT,
        vault_kubernetes_token_file=write_secret(tmp_path / "sa-token", wrong),
    )
    with pytest.raises(Unavailable, match="kubernetes login at auth/k8s-jwt/login failed"):
        backend.check()
    backend.connection.close()


# -- what the policy lacks --------------------------------------------------------------------


def test_the_shipped_policies_are_the_ones_trellis_asks_for() -> None:
    assert POLICY_FILE.read_text() == render_policy(requirements())
    assert CLEANUP_POLICY_FILE.read_text() == render_policy(requirements(cleanup=True))


@pytest.mark.parametrize("variant", ["shipped", "cleanup"])
def test_the_policy_lets_no_key_leave_vault_or_lose_a_version(
    openbao: OpenBao,
    backends: list[VaultKeyBackend],
    caplog: pytest.LogCaptureFixture,
    variant: str,
) -> None:
    """The key rule's trailing * also matches <key>/config, /trim and /import_version: the
    token may create, read and sign with its keys, and make none exportable, trim none, import
    nothing and stop no version from signing. Only the opt-in clean-up policy lets it delete
    one; under the shipped one, ``destroy`` leaves the key and says how to delete it by hand."""
    policy = (POLICY_FILE if variant == "shipped" else CLEANUP_POLICY_FILE).read_text()
    openbao.put_policy(f"trellis-{variant}", policy)
    token = openbao.create_token(f"trellis-{variant}", ttl="1h", no_default_policy=True)
    backend = backend_for(openbao, vault_token=token)
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "guarded")
    name = handle.ref.split("@", 1)[0]
    openbao.api("POST", f"transit/keys/{name}/rotate")  # by an operator: a v2 to trim down to
    refused = [
        ("POST", f"keys/{name}/config", {"exportable": True}),
        ("POST", f"keys/{name}/config", {"allow_plaintext_backup": True}),
        ("POST", f"keys/{name}/config", {"min_encryption_version": 2}),
        ("POST", f"keys/{name}/trim", {"min_available_version": 2}),
        ("POST", f"keys/{name}/import_version", {"ciphertext": "AA=="}),
        ("GET", f"export/signing-key/{name}", None),
        ("GET", f"backup/{name}", None),
    ]
    for method, path, body in refused:
        with pytest.raises(RuntimeError, match="HTTP 403"):
            openbao.api(method, f"transit/{path}", body, token=token)
    info = openbao.transit_key(name)
    assert info["exportable"] is False and info["allow_plaintext_backup"] is False
    assert info["min_encryption_version"] == 0 and sorted(info["keys"]) == ["1", "2"]
    sign_once(backend, handle)
    caplog.set_level(logging.WARNING, logger="trellis.keys")
    backend.destroy(handle)
    if variant == "cleanup":
        assert name not in transit_keys(openbao)  # LIST is a 404 once no key is left
        assert caplog.messages == []
        return
    assert openbao.transit_key(name)["deletion_allowed"] is False
    sign_once(backend, handle)  # still there, and still a key that signs
    assert caplog.messages == [
        f"Transit key {name} is left in Vault: no CA uses it, and Trellis's Vault policy does "
        f"not let it delete keys; delete it by hand: vault write transit/keys/{name}/config "
        f"deletion_allowed=true && vault delete transit/keys/{name}"
    ]
    for method, path, body in [
        ("POST", f"keys/{name}/config", {"deletion_allowed": True}),
        ("DELETE", f"keys/{name}", None),
    ]:
        with pytest.raises(RuntimeError, match="HTTP 403"):
            openbao.api(method, f"transit/{path}", body, token=token)
    openbao.api("POST", f"transit/keys/{name}/config", {"deletion_allowed": False}, token=token)


@pytest.fixture(scope="module")
def token_without_sign(openbao: OpenBao) -> str:
    partial = tuple(r for r in requirements() if not r.path.startswith("transit/sign/"))
    openbao.put_policy("trellis-no-sign", render_policy(partial))
    return openbao.create_token("trellis-no-sign", ttl="1h", no_default_policy=True)


def test_a_missing_capability_is_named_when_signing(
    openbao: OpenBao, token_without_sign: str, backends: list[VaultKeyBackend]
) -> None:
    backend = backend_for(openbao, vault_token=token_without_sign)
    backends.append(backend)
    handle = backend.create(KeyType.EC_P256, "no-sign")  # creating is allowed, signing is not
    with pytest.raises(
        Unavailable, match=r"Vault denied 'update' on transit/sign/trellis-no-sign-"
    ):
        sign_once(backend, handle)


def run_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str, **env: str
) -> tuple[int, str, str]:
    for name in [n for n in os.environ if n.startswith("TRELLIS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(f"TRELLIS_{name.upper()}", value)
    with pytest.raises(SystemExit) as exited:
        main(["vault", "check", *args])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_vault_check_passes_with_the_shipped_policy(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = openbao.create_token("trellis", ttl="1h", no_default_policy=True)
    keys = transit_keys(openbao)
    code, out, _ = run_check(
        monkeypatch, capsys, "--json", vault_addr=openbao.address, vault_token=token
    )
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["missing"] == [], report
    assert [c["name"] for c in report["checks"]] == [
        "connectivity", "auth", "transit mount", "kv mount", "capabilities", "excess rights"
    ]  # fmt: skip
    # The key rule's * covers <key>/rotate, which no policy rule can take out again: said,
    # so that the line does not claim more than the policy holds, and harmless (pinned versions).
    assert report["checks"][-1]["detail"] == (
        "the token cannot export, trim, reconfigure or delete keys; it can rotate them, which"
        " changes no CA (each signs with the key version it pinned)"
    )
    assert transit_keys(openbao) == keys  # the probes made none


def test_vault_check_fails_a_token_that_may_delete_keys(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Setting deletion_allowed, then DELETE, destroys a CA key: the opt-in clean-up policy
    grants both (no policy can keep them to keys Trellis never recorded), and the check says so
    and fails, probing on a key that does not exist."""
    openbao.put_policy("trellis-cleanup", CLEANUP_POLICY_FILE.read_text())
    token = openbao.create_token("trellis-cleanup", ttl="1h", no_default_policy=True)
    keys = transit_keys(openbao)
    code, out, err = run_check(
        monkeypatch, capsys, "--json", vault_addr=openbao.address, vault_token=token
    )
    report = json.loads(out)
    assert code == 8 and report["ok"] is False and report["missing"] == [], report
    checks = {c["name"]: c for c in report["checks"]}
    assert [name for name, c in checks.items() if not c["ok"]] == ["excess rights"]
    assert checks["excess rights"]["detail"] == (
        "the token may also set deletion_allowed on keys and delete keys on transit/: that is "
        "the right to destroy every CA key, which no policy can keep to the keys Trellis never "
        "recorded (the opt-in clean-up policy grants it; use the policy below)"
    )
    assert report["policy"] == POLICY_FILE.read_text()
    assert err.strip() == "trellis: Vault is not ready for Trellis: excess rights failed"
    assert transit_keys(openbao) == keys  # the probes made and deleted none


def test_vault_check_works_in_a_namespace(
    openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """sys/health is a root-namespace path: asked inside the namespace, OpenBao refuses it."""
    namespace = "trellis-ns"

    def api(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"X-Vault-Token": openbao.root_token, "X-Vault-Namespace": namespace}
        response = httpx.request(
            method, f"{openbao.address}/v1/{path}", json=body, headers=headers, timeout=30
        )
        assert response.status_code < 300, response.text
        return response.json() if response.content else {}

    openbao.api("POST", f"sys/namespaces/{namespace}", {})
    api("POST", "sys/mounts/transit", {"type": "transit"})
    api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    api("PUT", "sys/policies/acl/trellis", {"policy": POLICY_FILE.read_text()})
    body = {"policies": ["trellis"], "ttl": "1h", "no_default_policy": True}
    token = api("POST", "auth/token/create", body)["auth"]["client_token"]
    env = {"vault_addr": openbao.address, "vault_token": token, "vault_namespace": namespace}
    code, out, err = run_check(monkeypatch, capsys, "--json", **env)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True, (report, err)


def test_vault_check_names_the_missing_capability_and_the_policy(
    openbao: OpenBao,
    token_without_sign: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"vault_addr": openbao.address, "vault_token": token_without_sign}
    code, out, err = run_check(monkeypatch, capsys, "--json", **env)
    report = json.loads(out)
    assert code == 8, err
    assert report["missing"] == [{"path": "transit/sign/trellis-*", "capabilities": ["update"]}]
    assert report["policy"] == POLICY_FILE.read_text()
    assert err.strip() == "trellis: Vault is not ready for Trellis: capabilities failed"

    code, out, _ = run_check(monkeypatch, capsys, **env)
    assert code == 8
    assert "FAILED  capabilities   missing update on transit/sign/trellis-*" in out
    assert 'path "transit/sign/trellis-*" {\n  capabilities = ["update"]\n}' in out


@pytest.mark.parametrize(
    ("env", "failed", "detail"),
    [
        ({"vault_token": "s.not-a-token"}, "auth", "rejected Trellis's token"),
        ({"vault_kv_mount": "nokv"}, "kv mount", "nokv/ is not mounted"),
        ({"vault_transit_mount": "secret"}, "transit mount", "secret/ is kv v2, not transit"),
        ({"vault_addr": "unreachable"}, "connectivity", "connection refused"),
        ({}, "excess rights", "may also make keys exportable, allow plaintext backups"),
        ({"vault_token": "s.bad\u20ac"}, "", "TRELLIS_VAULT_TOKEN"),
    ],
    ids=[
        "fail/bad-token",
        "fail/no-kv-mount",
        "fail/transit-is-kv",
        "fail/unreachable",
        "fail/root-token-may-export",
        "fail/token-not-latin-1",
    ],
)
def test_vault_check_reports_what_fails(
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    failed: str,
    detail: str,
) -> None:
    values = {"vault_addr": openbao.address, "vault_token": openbao.root_token, **env}
    if values["vault_addr"] == "unreachable":
        values["vault_addr"] = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, out, err = run_check(monkeypatch, capsys, "--json", **values)
    assert time.monotonic() - started < 5
    if not failed:  # a setting that cannot be used: one line naming it, before anything
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and detail in err, err
        return
    report = json.loads(out)
    assert code == 8 and report["ok"] is False
    check = {c["name"]: c for c in report["checks"]}[failed]
    assert check["ok"] is False and detail in check["detail"], check


def test_settings_errors_name_the_missing_setting() -> None:
    with pytest.raises(
        InvalidInput, match="TRELLIS_VAULT_ROLE_ID and TRELLIS_VAULT_SECRET_ID_FILE"
    ):
        VaultKeyBackend.from_settings(
            Settings(vault_addr="http://127.0.0.1:1", vault_auth_method="approle")
        )
    with pytest.raises(InvalidInput, match="unknown Vault auth method"):
        VaultAuth(method="ldap")  # the settings refuse it first (tests/cli/test_settings.py)
    with pytest.raises(InvalidInput, match="TRELLIS_VAULT_TOKEN or TRELLIS_VAULT_TOKEN_FILE"):
        VaultKeyBackend.from_settings(Settings(vault_addr="http://127.0.0.1:1"))
