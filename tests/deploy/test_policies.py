"""Network policies (Kubernetes and Calico) and the Istio samples.

The Kubernetes NetworkPolicy is schema-checked with the other manifests; here it is checked for
what it admits. Calico's and Istio's CRDs are not core Kubernetes: their shape is checked with
small JSON schemas below (unknown fields refused), then their meaning against the manifests.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
import yaml

from ca.identity import SpiffeId
from tests.deploy.manifests import DEPLOY, K8S, load_docs, load_set, selects, workloads

POLICY = load_docs(K8S / "network-policy.yaml")[0].body
CALICO = load_docs(K8S / "calico" / "network-policy.yaml")[0].body
ISTIO = [doc.body for path in sorted((DEPLOY / "istio").glob("*.yaml")) for doc in load_docs(path)]
CLIENT_LABEL = ("trellis.dev/client", "true")


def _config(directory: str) -> dict[str, str]:
    config = load_set(K8S / directory).defined("ConfigMap", "trellis-config")
    assert config is not None
    data: dict[str, str] = config.body["data"]
    return data


PORT = int(_config("single")["TRELLIS_PORT"])
TRUST_DOMAIN = _config("single")["TRELLIS_TRUST_DOMAIN"]


def _ports(rules: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for rule in rules for p in rule.get("ports", [])}


@pytest.mark.parametrize("directory", ["single", "ha"])
def test_network_policy_selects_the_trellis_pods(directory: str) -> None:
    manifests = load_set(K8S / directory)
    selector = POLICY["spec"]["podSelector"]["matchLabels"]
    labels = [doc.body["spec"]["template"]["metadata"]["labels"] for doc, _ in workloads(manifests)]
    assert labels and all(selects(selector, pod) for pod in labels)
    assert POLICY["metadata"]["namespace"] == manifests.kustomization["namespace"]


def test_network_policy_admits_only_the_api_port_from_client_namespaces() -> None:
    spec = POLICY["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    [rule] = spec["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": dict([CLIENT_LABEL])}}]
    assert _ports([rule]) == {("TCP", PORT)}


def test_network_policy_egress_is_dns_postgresql_and_vault_only() -> None:
    assert _ports(POLICY["spec"]["egress"]) == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 5432),
        ("TCP", 8200),
    }
    for rule in POLICY["spec"]["egress"]:
        assert rule["to"], "an egress rule without peers would admit every destination"


def test_the_agent_examples_namespace_is_a_client_namespace() -> None:
    [namespace] = load_set(K8S / "agent").of_kind("Namespace")
    key, value = CLIENT_LABEL
    assert namespace.body["metadata"]["labels"][key] == value


_SELECTOR = {"type": "string", "minLength": 1}
_ENTITY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "selector": _SELECTOR,
        "namespaceSelector": _SELECTOR,
        "nets": {"type": "array", "items": {"type": "string"}},
        "ports": {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {"type": "integer", "minimum": 1, "maximum": 65535},
                    {"type": "string", "pattern": r"^(\d+:\d+|[a-z0-9-]+)$"},
                ]
            },
        },
    },
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["action"],
    "properties": {
        "action": {"enum": ["Allow", "Deny", "Log", "Pass"]},
        "protocol": {"enum": ["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite"]},
        "source": _ENTITY,
        "destination": _ENTITY,
        "metadata": {"type": "object"},
    },
}
CALICO_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "projectcalico.org/v3"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "types"],
            "properties": {
                "order": {"type": "number"},
                "selector": _SELECTOR,
                "types": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": _RULE},
                "egress": {"type": "array", "items": _RULE},
            },
        },
    },
}


def test_calico_policy_has_calicos_shape() -> None:
    jsonschema.validate(CALICO, CALICO_SCHEMA)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda p: p["spec"].update({"podSelector": {}}), id="fail/k8s-field"),
        pytest.param(
            lambda p: p["spec"]["ingress"][0].update({"action": "allow"}), id="fail/action"
        ),
        pytest.param(
            lambda p: p["spec"]["ingress"][0]["destination"].update({"ports": ["x y"]}),
            id="fail/port",
        ),
    ],
)
def test_calico_shape_check_rejects_a_broken_copy(edit: Any) -> None:
    broken = copy.deepcopy(CALICO)
    edit(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CALICO_SCHEMA)


def _calico_ports(rules: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(r["protocol"], p) for r in rules for p in r["destination"].get("ports", [])}


def test_calico_policy_is_the_kubernetes_policy() -> None:
    spec = CALICO["spec"]
    assert CALICO["metadata"] == {
        "name": POLICY["metadata"]["name"],
        "namespace": POLICY["metadata"]["namespace"],
    }
    assert spec["types"] == POLICY["spec"]["policyTypes"]
    wanted = POLICY["spec"]["podSelector"]["matchLabels"]
    assert set(re.findall(r"([\w./-]+) == '([^']*)'", spec["selector"])) == set(wanted.items())
    [rule] = spec["ingress"]
    assert rule["action"] == "Allow"
    assert rule["source"]["namespaceSelector"] == "{} == '{}'".format(*CLIENT_LABEL)
    assert _calico_ports(spec["ingress"]) == _ports(POLICY["spec"]["ingress"])
    assert _calico_ports(spec["egress"]) == _ports(POLICY["spec"]["egress"])


_ISTIO_SCHEMAS: dict[str, dict[str, Any]] = {
    "PeerAuthentication": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"]},
            "mtls": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"mode": {"enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]}},
            },
            "portLevelMtls": {"type": "object"},
        },
    },
    "AuthorizationPolicy": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"]},
            "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
            "rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "from": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "source": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            k: {"type": "array", "items": {"type": "string"}}
                                            for k in (
                                                "principals",
                                                "notPrincipals",
                                                "namespaces",
                                                "notNamespaces",
                                                "ipBlocks",
                                                "requestPrincipals",
                                            )
                                        },
                                    }
                                },
                            },
                        },
                        "to": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "operation": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            k: {"type": "array", "items": {"type": "string"}}
                                            for k in (
                                                "hosts",
                                                "ports",
                                                "methods",
                                                "paths",
                                                "notHosts",
                                                "notPorts",
                                                "notMethods",
                                                "notPaths",
                                            )
                                        },
                                    }
                                },
                            },
                        },
                        "when": {"type": "array"},
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("body", ISTIO, ids=lambda b: f"{b['kind']}/{b['metadata']['name']}")
def test_istio_resource_has_istios_shape(body: dict[str, Any]) -> None:
    assert body["apiVersion"] == "security.istio.io/v1"
    assert set(body) == {"apiVersion", "kind", "metadata", "spec"}
    assert body["metadata"]["namespace"]
    jsonschema.validate(body["spec"], _ISTIO_SCHEMAS[body["kind"]])


def test_peer_authentication_is_strict() -> None:
    modes = [b["spec"]["mtls"]["mode"] for b in ISTIO if b["kind"] == "PeerAuthentication"]
    assert modes == ["STRICT"]


def _principals() -> list[str]:
    return [
        principal
        for body in ISTIO
        if body["kind"] == "AuthorizationPolicy"
        for rule in body["spec"].get("rules", [])
        for source in rule.get("from", [])
        for principal in source["source"].get("principals", [])
    ]


def test_istio_principals_are_trellis_identities_without_the_scheme() -> None:
    principals = _principals()
    assert principals
    for principal in principals:
        assert not principal.startswith("spiffe://"), principal
        identity = SpiffeId.parse("spiffe://" + principal)
        assert str(identity.trust_domain) == TRUST_DOMAIN
        assert re.fullmatch(r"/ns/[a-z0-9-]+/sa/[a-z0-9-]+", identity.path), principal


def test_trellis_stays_out_of_the_mesh() -> None:
    for directory in ("single", "ha"):
        for doc, _ in workloads(load_set(K8S / directory)):
            annotations = doc.body["spec"]["template"]["metadata"]["annotations"]
            assert annotations["sidecar.istio.io/inject"] == "false", doc.ref


def _optional_egress(path: Any) -> list[dict[str, Any]]:
    """The commented egress rules at the end of a policy, uncommented as an operator would."""
    text = path.read_text()
    begin, end = "# --- optional egress: begin ---\n", "# --- optional egress: end ---"
    assert begin in text and end in text, "no commented egress rules for federation and Istio"
    block = text.split(begin, 1)[1].split(end, 1)[0]
    lines = [re.sub(r"^(\s*)# ?", r"\1", line) for line in block.splitlines()]
    rules = yaml.safe_load("\n".join(lines))
    assert isinstance(rules, list) and rules
    return rules


def test_the_commented_egress_rules_admit_federation_and_istio_targets() -> None:
    """As shipped, both policies blocked the federation refresh's bundle fetches and an Istio
    kubectl target's deliveries, and docs/deploy.md said only to edit the database and Vault
    peers. Each now ends with commented rules for them that are valid once uncommented."""
    rules = _optional_egress(K8S / "network-policy.yaml")
    assert _ports(rules) == {("TCP", 443), ("TCP", 8443), ("TCP", 6443)}
    assert all(peer.keys() == {"ipBlock"} for rule in rules for peer in rule["to"])

    calico_rules = _optional_egress(K8S / "calico" / "network-policy.yaml")
    calico = copy.deepcopy(CALICO)
    calico["spec"]["egress"].extend(calico_rules)
    jsonschema.validate(calico, CALICO_SCHEMA)
    ports = {port for rule in calico_rules for port in rule["destination"]["ports"]}
    assert ports == {443, 8443, 6443}
    assert all(rule["destination"]["nets"] for rule in calico_rules)
