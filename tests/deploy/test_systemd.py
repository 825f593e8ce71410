"""deploy/systemd: the unit's hardening, its example environment file against Trellis's settings,
and (where systemd-analyze exists) systemd's own verification of the unit."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ca.config import PLACEHOLDER, Settings
from tests.deploy.unitfile import DEPLOY, ENV, TEXT, parse_unit, unit_problems


def test_the_unit_is_hardened() -> None:
    assert unit_problems(TEXT) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "ProtectSystem=strict", "ProtectSystem=full", "ProtectSystem", id="fail/protect-system"
        ),
        pytest.param(
            "CapabilityBoundingSet=\n",
            "CapabilityBoundingSet=CAP_NET_ADMIN\n",
            "CapabilityBoundingSet",
            id="fail/capabilities",
        ),
        pytest.param(
            "NoNewPrivileges=yes", "NoNewPrivileges=no", "NoNewPrivileges", id="fail/new-privileges"
        ),
        pytest.param(
            "ReadWritePaths=/var/lib/trellis",
            "ReadWritePaths=/var/lib/trellis /etc",
            "ReadWritePaths",
            id="fail/writable-etc",
        ),
        pytest.param("User=trellis", "User=root", "User", id="fail/root"),
        pytest.param("PrivateTmp=yes\n", "", "PrivateTmp", id="fail/shared-tmp"),
        pytest.param("LimitNOFILE=65536\n", "", "LimitNOFILE", id="fail/default-descriptors"),
    ],
)
def test_a_weakened_unit_is_caught(old: str, new: str, expected: str) -> None:
    assert old in TEXT
    problems = unit_problems(TEXT.replace(old, new))
    assert any(expected in problem for problem in problems), problems


def test_the_state_directory_is_the_data_dir() -> None:
    service = parse_unit(TEXT)["Service"]
    data_dir = f"/var/lib/{service['StateDirectory'][-1]}"
    assert ENV["TRELLIS_DATA_DIR"] == data_dir == service["WorkingDirectory"][-1]


def test_the_example_env_file_holds_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    for key in ENV:
        assert key.startswith("TRELLIS_") and key.removeprefix("TRELLIS_").lower() in fields, key
    assert "TRELLIS_TRUST_DOMAIN" in ENV, "ExecStartPre's `trellis init` needs it"
    assert PLACEHOLDER in ENV["TRELLIS_KEY_PASSPHRASE"]
    assert json.loads(ENV["TRELLIS_SERVER_NAMES"])
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    # Installed unedited (docs/deploy.md: "then edit it"), the unit fails at its first command,
    # rather than encrypt the CA keys with the example's published passphrase.
    with pytest.raises(ValidationError, match=f"still the examples' {PLACEHOLDER} placeholder"):
        Settings()
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", "an-operator's-own-passphrase")
    settings = Settings()
    assert settings.port == 8443 and settings.server_names == ["trellis.example.org"]
    assert str(settings.data_dir) == ENV["TRELLIS_DATA_DIR"]


@pytest.mark.parametrize(
    "example", sorted(DEPLOY.glob("k8s/*/secret-example.yaml")), ids=lambda p: p.parent.name
)
def test_no_example_passphrase_is_taken(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Secrets' placeholders too: one applied unedited was a CA encrypted with it."""
    for doc in yaml.safe_load_all(example.read_text()):
        value = (doc.get("stringData") or {}).get("TRELLIS_KEY_PASSPHRASE")
        if value is not None:
            monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", value)
            with pytest.raises(ValidationError, match="placeholder"):
                Settings()


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _verify(tmp_path: Path, text: str) -> str:
    """`systemd-analyze verify` on a copy whose commands exist here: the unit's syntax, keys and
    values as systemd reads them. Returns what it reported about the unit."""
    assert SYSTEMD_ANALYZE is not None
    unit = tmp_path / "trellis.service"
    unit.write_text(text.replace("/opt/trellis/bin/trellis", "/bin/true"))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "\n".join(
        line for line in (result.stdout + result.stderr).splitlines() if "trellis.service" in line
    )


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    assert _verify(tmp_path, TEXT) == ""


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_verification_catches_a_misspelt_key(tmp_path: Path) -> None:
    report = _verify(tmp_path, TEXT.replace("ProtectHome=yes", "ProtectHomes=yes"))
    assert "Unknown key" in report and "ProtectHomes" in report
