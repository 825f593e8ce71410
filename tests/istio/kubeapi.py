"""A loopback STAND-IN for the Kubernetes API server, for driving the real ``kubectl`` in tests.

This is not kube-apiserver (none can be run on the test machines: no binary in PyPI, Debian or
npm, no container engine). It is a small HTTPS server on 127.0.0.1 (a kernel-chosen port, the
certificate from ``tests.tlsfiles``, a bearer token) that answers exactly what
``kubectl apply --server-side`` asks for, learnt by logging kubectl's requests:

- legacy discovery: ``GET /api``, ``GET /api/v1`` (only ``secrets`` and ``namespaces``) and
  ``GET /apis`` (no groups); the aggregated-discovery ``Accept`` is answered with the legacy
  document, which kubectl accepts (it falls back on the content type);
- ``GET /openapi/v3`` (an empty path list), which kubectl fetches unless it runs with
  ``--validate=false``, as Trellis runs it (``ca.kubectl``: Debian 12's kubectl 1.20 would
  want protobuf OpenAPI v2 instead); both kubectl 1.32 and 1.20 were run against this;
- ``GET`` and ``PATCH`` (``application/apply-patch+yaml`` only) of Secrets in a namespace.

Server-side apply is imitated at the granularity that matters for Secrets: each field manager
owns the ``data``/``stringData`` keys it applied; a manager's next apply removes the keys it owned
and left out, and takes over keys owned by others (kubectl always sends ``force=true`` here). The
real API server tracks ownership of every field (``managedFields``), validates the object against
its schema, and runs admission; none of that is imitated.

Every request is logged (method, path, query, content type, body) in ``requests`` so tests can
assert what crossed the wire, and what did not (the key only in a request body).
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.tlsfiles import loopback_server_tls

__all__ = ["KubeApi", "Request", "kubeconfig"]

TOKEN = "stand-in-bearer-token"  # a test credential for a loopback stand-in
_SECRETS = {
    "name": "secrets",
    "singularName": "secret",
    "namespaced": True,
    "kind": "Secret",
    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
}
_NAMESPACES = {
    "name": "namespaces",
    "singularName": "namespace",
    "namespaced": False,
    "kind": "Namespace",
    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
    "shortNames": ["ns"],
}


# Just enough OpenAPI v3 for kubectl to see that PATCH of a Secret takes ``fieldValidation``, so
# it leaves validation to the server (``fieldValidation=Strict``) instead of validating the
# object against a schema on the client.
_OPENAPI_V1 = {
    "openapi": "3.0.0",
    "info": {"title": "Kubernetes (stand-in)", "version": "v1.32.0"},
    "paths": {
        "/api/v1/namespaces/{namespace}/secrets/{name}": {
            "patch": {
                "parameters": [
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                    {"name": "force", "in": "query", "schema": {"type": "boolean"}},
                ],
                "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": "Secret"},
                "x-kubernetes-action": "patch",
            }
        }
    },
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: bytes


@dataclass
class KubeApi:
    """The stand-in's state: stored Secrets by (namespace, name), and every request seen."""

    url: str = ""
    ca_pem: bytes = b""
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    owners: dict[tuple[str, str], dict[str, set[str]]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, namespace: str, name: str, manager: str, applied: dict[str, Any]) -> int:
        """Server-side apply of a Secret by ``manager``; 201 when created, else 200."""
        key = (namespace, name)
        created = key not in self.secrets
        stored = self.secrets.setdefault(
            key,
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": {}},
        )
        stored["metadata"]["namespace"] = namespace
        meta = applied.get("metadata", {})
        for part in ("labels", "annotations"):
            if part in meta:
                stored["metadata"].setdefault(part, {}).update(meta[part])
        if "type" in applied:
            if not created and stored.get("type", "Opaque") != applied["type"]:
                return 422  # a Secret's type is immutable
            stored["type"] = applied["type"]
        owners = self.owners.setdefault(key, {})
        data = dict(applied.get("data") or {})
        data.update(
            {k: _b64(v) for k, v in (applied.get("stringData") or {}).items()}  # as the server
        )
        for gone in owners.get(manager, set()) - set(data):
            if not any(gone in keys for m, keys in owners.items() if m != manager):
                stored["data"].pop(gone, None)
        for keys in owners.values():
            keys -= set(data)
        owners[manager] = set(data)
        stored["data"].update(data)
        stored["metadata"]["managedFields"] = [
            {"manager": m, "operation": "Apply", "fieldsV1": {"f:data": sorted(keys)}}
            for m, keys in sorted(owners.items())
            if keys
        ]
        return 201 if created else 200


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the requests are kept in ``KubeApi.requests`` instead."""

    def _send(self, code: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> tuple[Request, bool]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = Request(
            self.command,
            parts.path,
            parse_qs(parts.query),
            self.headers.get("Content-Type", ""),
            body,
        )
        api = self.server.api
        with api.lock:
            api.requests.append(request)
        authorised = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        return request, authorised

    def do_GET(self) -> None:
        request, authorised = self._record()
        if not authorised:
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        api, path = self.server.api, request.path.rstrip("/")
        if path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": []})  # fmt: skip
        elif path == "/api/v1":
            self._send(200, {"kind": "APIResourceList", "groupVersion": "v1",
                             "resources": [_SECRETS, _NAMESPACES]})  # fmt: skip
        elif path == "/apis":
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        elif path == "/version":
            self._send(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-stand-in"})
        elif path == "/openapi/v3":
            self._send(200, {"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1"}}})
        elif path == "/openapi/v3/api/v1":
            self._send(200, _OPENAPI_V1)
        elif (target := _secret_path(path)) is not None:
            with api.lock:
                stored = api.secrets.get(target)
            if stored is None:
                self._send(404, _status(404, "NotFound", f'secrets "{target[1]}" not found'))
            else:
                self._send(200, stored)
        else:
            self._send(404, _status(404, "NotFound", "the server could not find the resource"))

    def do_PATCH(self) -> None:
        request, authorised = self._record()
        if not authorised:
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        target = _secret_path(request.path)
        if target is None:
            self._send(404, _status(404, "NotFound", "the server could not find the resource"))
            return
        if request.content_type != "application/apply-patch+yaml":
            self._send(415, _status(415, "UnsupportedMediaType", request.content_type))
            return
        manager = request.query.get("fieldManager", [""])[0]
        applied = yaml.safe_load(request.body)
        if not manager or not isinstance(applied, dict) or applied.get("kind") != "Secret":
            self._send(400, _status(400, "BadRequest", "fieldManager and a Secret are required"))
            return
        if applied.get("metadata", {}).get("name") != target[1]:
            self._send(400, _status(400, "BadRequest", "the name in the body must match"))
            return
        api = self.server.api
        with api.lock:
            code = api.apply(*target, manager, applied)
            stored = api.secrets[target]
        if code == 422:
            self._send(422, _status(422, "Invalid", "field is immutable: type"))
        else:
            self._send(code, stored)


def _secret_path(path: str) -> tuple[str, str] | None:
    parts = path.strip("/").split("/")
    if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
        return parts[3], parts[5]
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: KubeApi


def serve(directory: Path) -> tuple[KubeApi, _Server]:
    """Start the stand-in on 127.0.0.1; the caller shuts the server down."""
    ca, chain, key = loopback_server_tls(directory, ca_name="kube stand-in CA")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    host, port = server.server_address[:2]
    server.api = KubeApi(url=f"https://{host!s}:{port}", ca_pem=ca.read_bytes())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.api, server


def kubeconfig(path: Path, url: str, ca_pem: bytes, context: str = "stand-in") -> Path:
    """A kubeconfig for ``url``: one cluster, one user with the stand-in's bearer token."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "stand-in",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "trellis", "user": {"token": TOKEN}}],
        "contexts": [{"name": context, "context": {"cluster": "stand-in", "user": "trellis"}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path
