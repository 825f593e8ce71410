"""Consistency checks over one manifest set. Each returns a list of problems (empty: fine), so a
test can show a check passes on the real manifests and catches a deliberately broken copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.deploy.manifests import (
    EXAMPLE_ANNOTATION,
    KUSTOMIZATION,
    Doc,
    ManifestSet,
    Obj,
    containers,
    is_example,
    is_trellis_image,
    load_docs,
    pod_template,
    selects,
    trellis_containers,
    workloads,
)

PLACEHOLDER = "CHANGE-ME"
# Variables Trellis reads that are not server settings.
NON_SETTINGS_VARIABLES = {"TRELLIS_JOIN_TOKEN"}


def kustomization_problems(directory: Path) -> list[str]:
    """Every listed file exists, every manifest in the directory is listed, examples are not
    listed and are visibly placeholders."""
    problems = []
    listed = yaml.safe_load((directory / KUSTOMIZATION).read_text()).get("resources", [])
    for entry in listed:
        if not (directory / entry).is_file():
            problems.append(f"{directory.name}: {entry} is listed but does not exist")
        if is_example(Path(entry)):
            problems.append(f"{directory.name}: example {entry} must not be listed")
    for path in sorted(directory.glob("*.yaml")):
        if path.name == KUSTOMIZATION:
            continue
        if is_example(path):
            for doc in load_docs(path):
                problems += [f"{doc.ref}: {p}" for p in _example_problems(doc)]
        elif path.name not in listed:
            problems.append(f"{directory.name}: {path.name} is not listed in {KUSTOMIZATION}")
    return problems


def _example_problems(doc: Doc) -> list[str]:
    problems = []
    if doc.body.get("metadata", {}).get("annotations", {}).get(EXAMPLE_ANNOTATION) != "true":
        problems.append(f"an example must be annotated {EXAMPLE_ANNOTATION}: 'true'")
    values = {**doc.body.get("data", {}), **doc.body.get("stringData", {})}
    for key, value in values.items():
        if PLACEHOLDER not in str(value):
            problems.append(f"example value {key} is not a {PLACEHOLDER} placeholder")
    return problems


def _labels(doc: Doc) -> dict[str, str]:
    template = pod_template(doc)
    return {} if template is None else template.get("metadata", {}).get("labels", {})


def selector_problems(manifests: ManifestSet) -> list[str]:
    problems = []
    templates = [(doc, _labels(doc)) for doc, _ in workloads(manifests)]
    for doc, labels in templates:
        selector = doc.body["spec"].get("selector", {}).get("matchLabels", {})
        if doc.kind != "Job" and not selects(selector, labels):
            problems.append(f"{doc.ref}: selector {selector} does not match its pods {labels}")
    for doc in manifests.of_kind("Service") + manifests.of_kind("PodDisruptionBudget"):
        spec = doc.body["spec"]
        selector = spec.get("selector", {})
        selector = selector.get("matchLabels", selector) if doc.kind != "Service" else selector
        if not any(selects(selector, labels) for _, labels in templates):
            problems.append(f"{doc.ref}: selector {selector} matches no pod template")
    for doc in manifests.of_kind("StatefulSet"):
        governing = manifests.defined("Service", doc.body["spec"].get("serviceName", ""))
        if governing is None or governing.body["spec"].get("clusterIP") != "None":
            problems.append(f"{doc.ref}: serviceName must name a headless Service of the set")
    return problems


def _resolve_port(container: Obj, port: object) -> int | None:
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return int(declared["containerPort"])
    return None


def _probes(container: Obj) -> Iterator[tuple[str, Obj]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in container:
            yield kind, container[kind]


def _config_values(manifests: ManifestSet, container: Obj) -> dict[str, str]:
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config = manifests.defined("ConfigMap", source["configMapRef"]["name"])
            values.update(config.body.get("data", {}) if config else {})
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return values


def port_problems(manifests: ManifestSet) -> list[str]:
    problems = []
    for doc, spec in workloads(manifests):
        for container in containers(spec):
            where = f"{doc.ref} container {container['name']}"
            for kind, probe in _probes(container):
                action = probe.get("httpGet") or probe.get("tcpSocket") or {}
                if action and _resolve_port(container, action["port"]) is None:
                    problems.append(f"{where}: {kind} port {action['port']} is not declared")
        for service in manifests.of_kind("Service"):
            if not selects(service.body["spec"].get("selector", {}), _labels(doc)):
                continue
            for port in service.body["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                resolved = [_resolve_port(c, target) for c in spec.get("containers", [])]
                if port["port"] not in resolved:
                    problems.append(
                        f"{service.ref}: port {port['port']} -> {target} does not reach "
                        f"the same containerPort of {doc.ref}"
                    )
    for doc, container in trellis_containers(manifests):
        if container.get("args", [None])[0] != "serve":
            continue
        configured = _config_values(manifests, container).get("TRELLIS_PORT")
        if configured is None or _resolve_port(container, "https") != int(configured):
            problems.append(
                f"{doc.ref}: TRELLIS_PORT {configured} is not the https containerPort "
                f"{_resolve_port(container, 'https')}"
            )
    return problems


def probe_problems(manifests: ManifestSet, public_paths: set[str]) -> list[str]:
    """Probes hit unauthenticated paths the API really serves; a server has both probes."""
    problems = []
    for doc, container in trellis_containers(manifests):
        where = f"{doc.ref} container {container['name']}"
        for kind, probe in _probes(container):
            path = probe.get("httpGet", {}).get("path")
            if path is not None and path not in public_paths:
                problems.append(f"{where}: {kind} path {path} is not a public API route")
        if container.get("args", [None])[0] != "serve":
            continue
        for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            action = container.get(kind, {}).get("httpGet", {})
            if action.get("path") != path or action.get("scheme") != "HTTPS":
                problems.append(f"{where}: {kind} must be an HTTPS GET of {path}")
    return problems


def _references(spec: Obj) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every Secret and ConfigMap a pod spec uses."""
    for container in containers(spec):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"], None
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"], None
        for variable in container.get("env", []):
            value_from = variable.get("valueFrom", {})
            if "configMapKeyRef" in value_from:
                ref = value_from["configMapKeyRef"]
                yield "ConfigMap", ref["name"], ref["key"]
            if "secretKeyRef" in value_from:
                ref = value_from["secretKeyRef"]
                yield "Secret", ref["name"], ref["key"]
    for volume in spec.get("volumes", []):
        sources = [volume, *volume.get("projected", {}).get("sources", [])]
        for source in sources:
            if "configMap" in source:
                items = source["configMap"].get("items", [{}])
                for item in items:
                    yield "ConfigMap", source["configMap"]["name"], item.get("key")
            if "secret" in source:
                name = source["secret"].get("secretName") or source["secret"].get("name")
                for item in source["secret"].get("items", [{}]):
                    yield "Secret", name, item.get("key")


def reference_problems(manifests: ManifestSet) -> list[str]:
    problems = []
    used: set[tuple[str, str]] = set()
    for doc, spec in workloads(manifests):
        for kind, name, key in _references(spec):
            used.add((kind.lower(), name))
            target = manifests.defined(kind, name)
            if target is None:
                problems.append(
                    f"{doc.ref}: {kind} {name} is neither in the set nor operator-provided "
                    "with an example"
                )
            elif key is not None and key not in {
                **target.body.get("data", {}),
                **target.body.get("stringData", {}),
            }:
                problems.append(f"{doc.ref}: {kind} {name} has no key {key}")
        account = spec.get("serviceAccountName")
        if account and manifests.defined("ServiceAccount", account) is None:
            problems.append(f"{doc.ref}: ServiceAccount {account} is not in the set")
        volumes = {v["name"] for v in spec.get("volumes", [])} | {
            claim["metadata"]["name"] for claim in doc.body["spec"].get("volumeClaimTemplates", [])
        }
        for container in containers(spec):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{doc.ref}: volumeMount {mount['name']} has no volume")
    for kind, name in sorted(manifests.operator_provided - used):
        problems.append(f"{manifests.name}: operator-provided {kind}/{name} is never used")
    return problems


def security_problems(manifests: ManifestSet) -> list[str]:
    problems = []
    for doc, spec in workloads(manifests):
        pod = spec.get("securityContext", {})
        if pod.get("runAsUser", 1) == 0 or pod.get("runAsGroup", 1) == 0:
            problems.append(f"{doc.ref}: the pod runs as root")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{doc.ref}: automountServiceAccountToken must be false")
        for container in containers(spec):
            where = f"{doc.ref} container {container['name']}"
            context = container.get("securityContext", {})
            merged = {**pod, **context}
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if merged.get("runAsUser", 1) == 0:
                problems.append(f"{where}: runAsUser is 0")
            if merged.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if "ALL" not in context.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities do not drop ALL")
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                if set(resources.get(bound, {})) < {"cpu", "memory"}:
                    problems.append(f"{where}: resources.{bound} needs cpu and memory")
    return problems


def image_problems(manifests: ManifestSet, version: str) -> list[str]:
    problems = []
    for doc, spec in workloads(manifests):
        for container in containers(spec):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            if "@sha256:" in image:
                continue
            if not name or "/" in tag or tag in ("", "latest"):
                problems.append(f"{doc.ref}: image {image} needs a fixed tag")
            elif is_trellis_image(image) and tag != version:
                problems.append(f"{doc.ref}: image {image} is not the project version {version}")
    return problems


def env_problems(manifests: ManifestSet, settings_fields: set[str]) -> list[str]:
    """TRELLIS_* names are real settings; Service links cannot inject TRELLIS_* variables."""
    problems = []
    names: list[tuple[str, str]] = []
    for doc in manifests.of_kind("ConfigMap"):
        names += [(doc.ref, key) for key in doc.body.get("data", {})]
    for doc, spec in workloads(manifests):
        for container in containers(spec):
            names += [(doc.ref, variable["name"]) for variable in container.get("env", [])]
            for variable in container.get("env", []):
                secret_like = any(w in variable["name"] for w in ("PASSPHRASE", "TOKEN", "URL"))
                if secret_like and "value" in variable and variable["name"] != "TRELLIS_PUBLIC_URL":
                    problems.append(f"{doc.ref}: {variable['name']} must come from a Secret")
    for where, name in names:
        if not name.startswith("TRELLIS_") or name in NON_SETTINGS_VARIABLES:
            continue
        if name.removeprefix("TRELLIS_").lower() not in settings_fields:
            problems.append(f"{where}: {name} is not a Trellis setting")
    linked = [
        s.name
        for s in manifests.of_kind("Service")
        if s.name.upper().replace("-", "_").startswith("TRELLIS")
    ]
    for doc, spec in workloads(manifests):
        has_trellis = any(is_trellis_image(c["image"]) for c in containers(spec))
        if linked and has_trellis and spec.get("enableServiceLinks") is not False:
            problems.append(
                f"{doc.ref}: enableServiceLinks must be false: Service {linked[0]} would inject "
                "TRELLIS_* variables such as TRELLIS_PORT=tcp://..."
            )
    return problems
