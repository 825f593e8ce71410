"""Every manifest under deploy/k8s (Calico's CRDs aside) against the Kubernetes OpenAPI schemas in
strict mode (unknown fields are errors), from the schemas kubernetes-validate bundles: offline.

Pinned to Kubernetes 1.30 (the oldest minor the manifests support: PVC retention policy,
native fsGroupChangePolicy, policy/v1 PDBs) and also checked against the newest schemas the
package ships, so a field removed upstream shows up here.
"""

from __future__ import annotations

import copy
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import Doc, kustomize_dirs, load_docs, manifest_files

PINNED = "1.30"
NEWEST = kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())
DOCS = [doc for path in manifest_files() for doc in load_docs(path)]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The schemas are files inside the package: any attempt to reach the network fails."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"schema validation tried to use the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def validate(body: dict[str, Any], version: str) -> str:
    return str(kubernetes_validate.validate(body, version, strict=True))


def test_the_pinned_version_is_bundled() -> None:
    assert PINNED in [v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()]


def test_every_manifest_file_is_covered() -> None:
    kinds = {doc.kind for doc in DOCS}
    assert {
        "StatefulSet",
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Namespace",
        "Job",
    } <= kinds


@pytest.mark.parametrize("version", [PINNED, NEWEST])
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d.path.parent.name}/{d.path.name}#{d.index}")
def test_manifest_matches_the_kubernetes_schema(doc: Doc, version: str) -> None:
    assert validate(doc.body, version) == version


def _statefulset() -> dict[str, Any]:
    body = next(d.body for d in DOCS if d.kind == "StatefulSet")
    return copy.deepcopy(body)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda b: b["spec"].update({"replica": 1}), id="fail/unknown-field"),
        pytest.param(
            lambda b: b["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
                {"containerPort": "8443"}
            ),
            id="fail/port-as-string",
        ),
        pytest.param(
            lambda b: b["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
                {"readOnlyRootFS": True}
            ),
            id="fail/misspelt-security-field",
        ),
        pytest.param(lambda b: b["spec"].pop("selector"), id="fail/missing-required"),
    ],
)
def test_strict_validation_rejects_a_broken_manifest(edit: Any) -> None:
    body = _statefulset()
    edit(body)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(body, PINNED)


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (for its built-in kustomize) not installed")
@pytest.mark.parametrize("directory", kustomize_dirs(), ids=lambda d: d.name)
def test_kustomize_renders_valid_namespaced_objects(directory: Path) -> None:
    """`kubectl kustomize` (offline) accepts the kustomization; what it renders is valid and
    every namespaced object lands in the kustomization's namespace."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [body for body in yaml.safe_load_all(result.stdout) if body]
    namespace = yaml.safe_load((directory / "kustomization.yaml").read_text())["namespace"]
    assert rendered
    for body in rendered:
        validate(body, PINNED)
        if body["kind"] != "Namespace":
            assert body["metadata"]["namespace"] == namespace, body["metadata"]
