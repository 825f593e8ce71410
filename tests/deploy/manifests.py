"""Loading the Kubernetes manifests under deploy/k8s and walking what they contain.

A *set* is one kustomization directory: the documents its kustomization.yaml lists, the
``*-example.yaml`` documents beside it (placeholder Secrets and ConfigMaps that show what the
operator provides; never listed), and the objects its ``trellis.dev/operator-provided``
annotation names. The consistency checks in ``checks.py`` work on sets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CALICO = K8S / "calico"
KUSTOMIZATION = "kustomization.yaml"
OPERATOR_PROVIDED = "trellis.dev/operator-provided"
EXAMPLE_ANNOTATION = "trellis.dev/example"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}

Obj = dict[str, Any]


@dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    path: Path
    index: int
    body: Obj

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name", ""))

    @property
    def ref(self) -> str:
        return f"{self.path.relative_to(REPO)}#{self.index} {self.kind}/{self.name}"


def load_docs(path: Path) -> list[Doc]:
    with path.open() as handle:
        bodies = [body for body in yaml.safe_load_all(handle) if body]
    return [Doc(path, index, body) for index, body in enumerate(bodies)]


def is_example(path: Path) -> bool:
    return path.name.endswith("-example.yaml")


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s, except kustomizations and Calico's CRDs."""
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name != KUSTOMIZATION and CALICO not in path.parents
    )


def kustomize_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S.rglob(KUSTOMIZATION))


@dataclass(frozen=True)
class ManifestSet:
    directory: Path
    kustomization: Obj
    resources: list[Doc]
    examples: list[Doc]
    operator_provided: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return self.directory.name

    def of_kind(self, kind: str) -> list[Doc]:
        return [doc for doc in self.resources if doc.kind == kind]

    def defined(self, kind: str, name: str) -> Doc | None:
        """The object, from the resources or, for operator-provided ones, the examples."""
        for doc in self.resources:
            if doc.kind == kind and doc.name == name:
                return doc
        if (kind.lower(), name) in self.operator_provided:
            for doc in self.examples:
                if doc.kind == kind and doc.name == name:
                    return doc
        return None

    def edited(self, kind: str, name: str, edit: Callable[[Obj], object]) -> ManifestSet:
        """A deep copy with ``edit`` applied to one resource's body (for negative tests)."""
        docs = []
        for doc in self.resources:
            body = copy.deepcopy(doc.body)
            if doc.kind == kind and doc.name == name:
                edit(body)
            docs.append(replace(doc, body=body))
        return replace(self, resources=docs)


def load_set(directory: Path) -> ManifestSet:
    kustomization = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    resources = [
        doc for entry in kustomization.get("resources", []) for doc in load_docs(directory / entry)
    ]
    examples = [doc for path in sorted(directory.glob("*-example.yaml")) for doc in load_docs(path)]
    annotation = kustomization.get("metadata", {}).get("annotations", {}).get(OPERATOR_PROVIDED, "")
    provided = frozenset(
        (kind.strip().lower(), name.strip())
        for item in annotation.split(",")
        if item.strip()
        for kind, _, name in [item.partition("/")]
    )
    return ManifestSet(directory, kustomization, resources, examples, provided)


def pod_template(doc: Doc) -> Obj | None:
    if doc.kind not in WORKLOAD_KINDS:
        return None
    template: Obj = doc.body["spec"]["template"]
    return template


def pod_spec(doc: Doc) -> Obj | None:
    template = pod_template(doc)
    return None if template is None else template["spec"]


def containers(spec: Obj) -> Iterator[Obj]:
    """Init containers first, then the others."""
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def workloads(manifests: ManifestSet) -> Iterator[tuple[Doc, Obj]]:
    for doc in manifests.resources:
        spec = pod_spec(doc)
        if spec is not None:
            yield doc, spec


def is_trellis_image(image: str) -> bool:
    return image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "trellis"


def trellis_containers(manifests: ManifestSet) -> Iterator[tuple[Doc, Obj]]:
    for doc, spec in workloads(manifests):
        for container in containers(spec):
            if is_trellis_image(container["image"]):
                yield doc, container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())
