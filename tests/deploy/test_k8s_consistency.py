"""Cross-references inside each kustomization set under deploy/k8s: selectors, ports, probes,
Secret/ConfigMap references, securityContext, images, settings. Each check passes on the real
manifests and is shown to catch a deliberately broken in-memory copy."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from api.routes.public import router as public_router
from ca.config import Settings
from tests.deploy import checks
from tests.deploy.manifests import (
    REPO,
    ManifestSet,
    Obj,
    containers,
    kustomize_dirs,
    load_set,
    trellis_containers,
    workloads,
)

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PUBLIC_PATHS = {route.path for route in public_router.routes}  # type: ignore[attr-defined]
SETTINGS = set(Settings.model_fields)
DIRS = kustomize_dirs()

Check = Callable[[ManifestSet], list[str]]
CHECKS: dict[str, Check] = {
    "selectors": checks.selector_problems,
    "ports": checks.port_problems,
    "probes": lambda s: checks.probe_problems(s, PUBLIC_PATHS),
    "references": checks.reference_problems,
    "security": checks.security_problems,
    "images": lambda s: checks.image_problems(s, VERSION),
    "settings": lambda s: checks.env_problems(s, SETTINGS),
}


def test_the_expected_sets_exist() -> None:
    assert [d.name for d in DIRS] == ["agent", "ha", "single"]


def test_probe_paths_are_public_routes() -> None:
    assert {"/healthz", "/readyz"} <= PUBLIC_PATHS


@pytest.mark.parametrize("directory", DIRS, ids=lambda d: d.name)
def test_kustomization_lists_exactly_the_manifests(directory: Path) -> None:
    assert checks.kustomization_problems(directory) == []


@pytest.mark.parametrize("check", CHECKS, ids=str)
@pytest.mark.parametrize("directory", DIRS, ids=lambda d: d.name)
def test_set_is_consistent(directory: Path, check: str) -> None:
    assert CHECKS[check](load_set(directory)) == []


def _container(body: Obj, name: str) -> Obj:
    spec = body["spec"]["template"]["spec"]
    found: Obj = next(
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name
    )
    return found


def _pod(body: Obj) -> Obj:
    pod: Obj = body["spec"]["template"]["spec"]
    return pod


# (case id, set, kind, name, edit, check, expected fragment of a problem)
BROKEN: list[tuple[str, str, str, str, Callable[[Obj], object], str, str]] = [
    (
        "fail/selector/service-mismatch",
        "single",
        "Service",
        "trellis",
        lambda b: b["spec"]["selector"].update({"app.kubernetes.io/name": "trellis-typo"}),
        "selectors",
        "matches no pod template",
    ),
    (
        "fail/selector/workload-mismatch",
        "ha",
        "Deployment",
        "trellis",
        lambda b: b["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "x"}),
        "selectors",
        "does not match its pods",
    ),
    (
        "fail/selector/pdb",
        "ha",
        "PodDisruptionBudget",
        "trellis",
        lambda b: b["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "nope"}),
        "selectors",
        "matches no pod template",
    ),
    (
        "fail/port/service-target",
        "single",
        "Service",
        "trellis",
        lambda b: b["spec"]["ports"][0].update({"targetPort": "http"}),
        "ports",
        "does not reach",
    ),
    (
        "fail/port/configmap",
        "single",
        "ConfigMap",
        "trellis-config",
        lambda b: b["data"].update({"TRELLIS_PORT": "9443"}),
        "ports",
        "TRELLIS_PORT 9443",
    ),
    (
        "fail/port/probe",
        "ha",
        "Deployment",
        "trellis",
        lambda b: _container(b, "trellis")["livenessProbe"]["httpGet"].update({"port": 9000}),
        "ports",
        "livenessProbe port 9000",
    ),
    (
        "fail/probe/path",
        "single",
        "StatefulSet",
        "trellis",
        lambda b: _container(b, "trellis")["readinessProbe"]["httpGet"].update({"path": "/ready"}),
        "probes",
        "/ready is not a public API route",
    ),
    (
        "fail/probe/scheme",
        "ha",
        "Deployment",
        "trellis",
        lambda b: _container(b, "trellis")["livenessProbe"]["httpGet"].update({"scheme": "HTTP"}),
        "probes",
        "HTTPS GET of /healthz",
    ),
    (
        "fail/reference/secret",
        "single",
        "StatefulSet",
        "trellis",
        lambda b: _container(b, "init")["env"][0]["valueFrom"]["secretKeyRef"].update(
            {"name": "trellis-secret"}
        ),
        "references",
        "Secret trellis-secret is neither",
    ),
    (
        "fail/reference/secret-key",
        "ha",
        "Deployment",
        "trellis",
        lambda b: _container(b, "trellis")["env"][0]["valueFrom"]["secretKeyRef"].update(
            {"key": "DATABASE_URL"}
        ),
        "references",
        "has no key DATABASE_URL",
    ),
    (
        "fail/reference/configmap",
        "agent",
        "Deployment",
        "web",
        lambda b: _pod(b)["volumes"].append({"name": "x", "configMap": {"name": "missing"}}),
        "references",
        "ConfigMap missing is neither",
    ),
    (
        "fail/reference/volume",
        "single",
        "StatefulSet",
        "trellis",
        lambda b: _container(b, "trellis")["volumeMounts"][0].update({"name": "state"}),
        "references",
        "volumeMount state has no volume",
    ),
    (
        "fail/security/read-only-root",
        "single",
        "StatefulSet",
        "trellis",
        lambda b: _container(b, "init")["securityContext"].pop("readOnlyRootFilesystem"),
        "security",
        "readOnlyRootFilesystem",
    ),
    (
        "fail/security/capabilities",
        "agent",
        "Job",
        "report",
        lambda b: _container(b, "report")["securityContext"]["capabilities"].update({"drop": []}),
        "security",
        "drop ALL",
    ),
    (
        "fail/security/seccomp",
        "ha",
        "Deployment",
        "trellis",
        lambda b: (
            _pod(b)["securityContext"].pop("seccompProfile"),
            _container(b, "trellis")["securityContext"].pop("seccompProfile"),
        ),
        "security",
        "seccompProfile",
    ),
    (
        "fail/security/root",
        "agent",
        "Deployment",
        "web",
        lambda b: _pod(b)["securityContext"].update({"runAsUser": 0}),
        "security",
        "runs as root",
    ),
    (
        "fail/security/limits",
        "ha",
        "Deployment",
        "trellis",
        lambda b: _container(b, "trellis")["resources"].pop("limits"),
        "security",
        "resources.limits",
    ),
    (
        "fail/image/latest",
        "agent",
        "Deployment",
        "web",
        lambda b: _container(b, "web").update({"image": "nginxinc/nginx-unprivileged:latest"}),
        "images",
        "needs a fixed tag",
    ),
    (
        "fail/image/untagged",
        "single",
        "StatefulSet",
        "trellis",
        lambda b: _container(b, "trellis").update({"image": "registry.example.org/trellis"}),
        "images",
        "needs a fixed tag",
    ),
    (
        "fail/settings/typo",
        "single",
        "ConfigMap",
        "trellis-config",
        lambda b: b["data"].update({"TRELLIS_TRUSTDOMAIN": "example.org"}),
        "settings",
        "TRELLIS_TRUSTDOMAIN is not a Trellis setting",
    ),
    (
        "fail/settings/service-links",
        "ha",
        "Deployment",
        "trellis",
        lambda b: _pod(b).pop("enableServiceLinks"),
        "settings",
        "enableServiceLinks must be false",
    ),
    (
        "fail/settings/literal-secret",
        "single",
        "StatefulSet",
        "trellis",
        lambda b: _container(b, "trellis")["env"].append(
            {"name": "TRELLIS_KEY_PASSPHRASE", "value": "hunter2hunter2"}
        ),
        "settings",
        "must come from a Secret",
    ),
]


@pytest.mark.parametrize(
    ("directory", "kind", "name", "edit", "check", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in BROKEN],
)
def test_a_broken_copy_is_caught(
    directory: str, kind: str, name: str, edit: Callable[[Obj], object], check: str, expected: str
) -> None:
    manifests = load_set(REPO / "deploy" / "k8s" / directory)
    assert CHECKS[check](manifests) == []
    problems = CHECKS[check](manifests.edited(kind, name, edit))
    assert any(expected in problem for problem in problems), problems


def test_an_unlisted_manifest_is_caught(tmp_path: Path) -> None:
    source = REPO / "deploy" / "k8s" / "single"
    for path in source.iterdir():
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "service.yaml").unlink()
    problems = checks.kustomization_problems(tmp_path)
    assert any("extra.yaml is not listed" in p for p in problems), problems
    assert any("service.yaml is listed but does not exist" in p for p in problems), problems


def _server_config(directory: str) -> dict[str, str]:
    data: dict[str, str] = (
        load_set(REPO / "deploy" / "k8s" / directory)
        .defined("ConfigMap", "trellis-config")
        .body["data"]
    )  # type: ignore[union-attr]
    return data


@pytest.mark.parametrize("server", ["single", "ha"])
def test_agents_reach_a_name_on_the_servers_certificate(server: str) -> None:
    """The agent verifies Trellis's certificate: the host in --server must be one of the
    TRELLIS_SERVER_NAMES the server puts on it, and the port its TRELLIS_PORT."""
    config = _server_config(server)
    names = json.loads(config["TRELLIS_SERVER_NAMES"])
    agents = list(trellis_containers(load_set(REPO / "deploy" / "k8s" / "agent")))
    assert agents
    for doc, container in agents:
        args = container["args"]
        url = urlsplit(args[args.index("--server") + 1])
        assert url.scheme == "https", doc.ref
        assert url.hostname in names, (doc.ref, url.hostname, names)
        assert str(url.port) == config["TRELLIS_PORT"], doc.ref


def test_single_and_ha_agree_on_settings() -> None:
    single, ha = _server_config("single"), _server_config("ha")
    assert single == ha


DEPLOY_DOC = (REPO / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("directory", DIRS, ids=lambda d: d.name)
def test_operator_provided_objects_are_documented(directory: Path) -> None:
    provided = load_set(directory).operator_provided
    assert provided
    for _, name in provided:
        assert f"`{name}`" in DEPLOY_DOC, name


def test_the_documented_build_command_is_the_dockerfiles() -> None:
    command = "docker build -f deploy/docker/Dockerfile"
    assert command in DEPLOY_DOC
    assert command in (REPO / "deploy" / "docker" / "Dockerfile").read_text()


def _passphrase_refs(directory: str) -> list[Obj]:
    manifests = load_set(REPO / "deploy" / "k8s" / directory)
    return [
        variable["valueFrom"]["secretKeyRef"]
        for _, spec in workloads(manifests)
        for container in containers(spec)
        for variable in container.get("env", [])
        if variable["name"] == "TRELLIS_KEY_PASSPHRASE"
    ]


def test_the_key_passphrase_is_optional_where_vault_is_the_recommended_backend() -> None:
    """docs/vault.md: an instance whose keys are all in Vault reads no passphrase, yet the HA
    Deployment (Vault recommended) would not start without the Secret key. There a file-key
    replica without it still refuses to start, naming it (its key files exist); the single
    node keeps it required: with file keys, its first init would otherwise make one beside the
    keys on the volume."""
    ha, single = _passphrase_refs("ha"), _passphrase_refs("single")
    assert ha and all(ref.get("optional") is True for ref in ha), ha
    assert len(single) == 2 and not any(ref.get("optional") for ref in single), single
