"""``trellis istio root-configmap`` and ``mesh-config``: YAML a cluster applies as-is."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from cryptography import x509

from ca.authority import active_issuer
from ca.config import Context
from ca.root_rotation import rotate_root
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import Cli

pytestmark = SQLITE_ONLY


def load(text: str) -> dict[str, Any]:
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def test_root_configmap(ctx: Context, cli: Cli) -> None:
    document = load(cli.ok("istio", "root-configmap"))
    assert document["apiVersion"] == "v1" and document["kind"] == "ConfigMap"
    assert document["metadata"] == {"name": "istio-ca-root-cert", "namespace": "istio-system"}
    assert document["data"]["root-cert.pem"].encode() == active_issuer(ctx).bundle_pem
    other = load(cli.ok("istio", "root-configmap", "--namespace", "sleep"))
    assert other["metadata"]["namespace"] == "sleep"


@pytest.mark.parametrize(
    "namespace",
    ["Bad_NS", "", "a" * 64, "-sleep", "sleep-", "sle.ep", "sleep\nkind: Secret"],
    ids=["fail/upper-and-underscore", "fail/empty", "fail/64-chars", "fail/leading-dash",
         "fail/trailing-dash", "fail/dot", "fail/newline"],
)  # fmt: skip
def test_root_configmap_refuses_a_namespace_kubernetes_would(cli: Cli, namespace: str) -> None:
    """A namespace is an RFC 1123 label (1 to 63 of a-z, 0-9, '-'): anything else is a
    ConfigMap the API server refuses."""
    result = cli("istio", "root-configmap", "--namespace", namespace)
    assert result.code == 2, result
    assert result.out == ""
    (line,) = result.err.strip().splitlines()
    assert "--namespace is a DNS label (RFC 1123)" in line, line


def test_root_configmap_takes_a_63_character_namespace(cli: Cli) -> None:
    namespace = "a" + "-0" * 31
    assert load(cli.ok("istio", "root-configmap", "--namespace", namespace))["metadata"] == {
        "name": "istio-ca-root-cert",
        "namespace": namespace,
    }


def test_root_configmap_holds_both_roots_during_rotation(ctx: Context, cli: Cli) -> None:
    """A -> A+B -> B: while the new root is published, workloads trust both."""
    rotate_root(ctx)
    document = load(cli.ok("istio", "root-configmap"))
    roots = x509.load_pem_x509_certificates(document["data"]["root-cert.pem"].encode())
    assert len(roots) == 2 and roots[0].public_key() != roots[1].public_key()


def test_mesh_config_with_the_bundle_inline(ctx: Context, cli: Cli) -> None:
    mesh = load(cli.ok("istio", "mesh-config"))["meshConfig"]
    assert mesh["trustDomain"] == "example.org"
    (source,) = mesh["caCertificates"]
    bundle = active_issuer(ctx).bundle_pem.decode()
    assert source == {"pem": bundle, "trustDomains": ["example.org"]}


def test_mesh_config_polls_the_bundle_endpoint(
    ctx: Context, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_PUBLIC_URL", "https://trellis.example.org:8443/")
    mesh = load(cli.ok("istio", "mesh-config"))["meshConfig"]
    assert mesh["caCertificates"] == [
        {
            "spiffeBundleUrl": "https://trellis.example.org:8443/v1/bundle.jwks",
            "trustDomains": ["example.org"],
        }
    ]


def test_mesh_config_writes_an_https_scheme_istiod_recognises(
    ctx: Context, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """istiod (pkg/spiffe) tests for "https://" case-sensitively and puts https:// before
    anything else: HTTPS://X was fetched from https://HTTPS://X, a host named "https"."""
    monkeypatch.setenv("TRELLIS_PUBLIC_URL", "HTTPS://Trellis.Example.ORG:8443/Pki")
    mesh = load(cli.ok("istio", "mesh-config"))["meshConfig"]
    assert mesh["caCertificates"] == [
        {
            "spiffeBundleUrl": "https://trellis.example.org:8443/Pki/v1/bundle.jwks",
            "trustDomains": ["example.org"],
        }
    ]


def test_mesh_config_refuses_an_http_public_url(
    ctx: Context, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """istiod puts https:// before a spiffeBundleUrl that does not start with it: an http://
    one would be fetched from the host "http", and the mesh would have no trust anchors."""
    monkeypatch.setenv("TRELLIS_PUBLIC_URL", "http://ca.example.org")
    result = cli("istio", "mesh-config")
    assert result.code == 2, result
    assert result.out == ""
    (line,) = result.err.strip().splitlines()
    assert "'http://ca.example.org' is not https://" in line and "TRELLIS_PUBLIC_URL=" in line
    monkeypatch.setenv("TRELLIS_PUBLIC_URL", "")  # the way out the message gives
    assert "pem" in load(cli.ok("istio", "mesh-config"))["meshConfig"]["caCertificates"][0]
