"""deploy/systemd: the unit file and its example environment file, parsed the way systemd
reads them, and the hardening the unit must keep (problems listed, empty: fine)."""

from __future__ import annotations

from ca.config import MAX_CONNECTIONS
from tests.deploy.manifests import DEPLOY

UNIT = DEPLOY / "systemd" / "trellis.service"
ENV_FILE = DEPLOY / "systemd" / "trellis.env.example"
TRUE = {"yes", "true", "on", "1"}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's INI dialect: repeated keys accumulate, so values are lists."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_problems(text: str) -> list[str]:
    unit = parse_unit(text)
    service = unit.get("Service", {})
    problems = []

    def last(key: str) -> str | None:
        return service[key][-1] if service.get(key) else None

    expected = {
        "User": "trellis",
        "ProtectSystem": "strict",
        "Restart": "on-failure",
        "EnvironmentFile": "/etc/trellis/trellis.env",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        if last(key) != value:
            problems.append(f"{key}= must be {value!r}, not {last(key)!r}")
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        if (last(key) or "").lower() not in TRUE:
            problems.append(f"{key}= must be enabled")
    writable = " ".join(service.get("ReadWritePaths", [])).split()
    if writable != ["/var/lib/trellis"]:
        problems.append(f"ReadWritePaths= must be exactly /var/lib/trellis, not {writable}")
    # A serving process holds MAX_CONNECTIONS connections, as many again in their handshakes,
    # and its own files; its seccomp filter (~@resources) stops it raising its own limit.
    nofile = (last("LimitNOFILE") or "0").split(":")[0]
    if nofile != "infinity" and int(nofile) < 2 * MAX_CONNECTIONS + 1024:
        problems.append(f"LimitNOFILE= must be at least {2 * MAX_CONNECTIONS + 1024}")
    if not (last("ExecStart") or "").endswith("/trellis serve"):
        problems.append("ExecStart= must run `trellis serve`")
    if unit.get("Install", {}).get("WantedBy") != ["multi-user.target"]:
        problems.append("WantedBy=multi-user.target missing")
    return problems


def parse_env_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile=: KEY=value lines, # comments, quotes around a value removed."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


TEXT = UNIT.read_text()
ENV = parse_env_file(ENV_FILE.read_text())
