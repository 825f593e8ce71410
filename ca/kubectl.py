"""Delivering manifests to a Kubernetes cluster with the real ``kubectl`` binary.

Trellis speaks to clusters only through ``kubectl``, so every way a kubeconfig can authenticate
(client certificates, tokens, exec plug-ins for EKS/GKE/AKS) works unchanged. The manifest goes
on kubectl's stdin and nowhere else: never in argv (visible in ``/proc``), never in a temporary
file, never in a log line or an error message. kubectl's stderr describes the request, not the
body, so it is safe to pass on in errors.

Server-side apply (``--server-side --force-conflicts``) under a named field manager: the fields
Trellis applies are Trellis's, a later apply replaces them, and keys other managers added to
the object are left alone.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ca.errors import InvalidInput, Unavailable

__all__ = ["FIELD_MANAGER", "KubeTarget", "apply", "apply_argv", "check_target", "dns_label"]

FIELD_MANAGER = "trellis"
TIMEOUT_SECONDS = 60
# ``kubectl config view`` reads a local file and contacts nobody.
CONFIG_TIMEOUT_SECONDS = 15
_QUOTED = re.compile(r"`[^`]*`")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def dns_label(value: str, what: str) -> str:
    """``value`` if it is an RFC 1123 label as Kubernetes names namespaces (and Trellis names
    Istio clusters): 1 to 63 of a-z, 0-9 and '-', starting and ending with a letter or digit.
    Anything else would make a manifest the API server refuses (or, unchecked, one that names
    something else)."""
    if not _DNS_LABEL.fullmatch(value):
        raise InvalidInput(
            f"{what} is a DNS label (RFC 1123): 1 to 63 of a-z, 0-9 and '-', starting and "
            f"ending with a letter or digit, not {value[:70]!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class KubeTarget:
    """A cluster to apply to: a kubeconfig file and, optionally, a context in it (else the
    kubeconfig's ``current-context``)."""

    kubeconfig: Path
    context: str | None = None

    def __post_init__(self) -> None:
        if self.context is not None and not self.context.strip():
            raise InvalidInput("--kube-context must not be empty")

    def describe(self) -> str:
        where = f"kubeconfig {self.kubeconfig}"
        return f"{where}, context {self.context}" if self.context else where


def _kubectl() -> str:
    executable = shutil.which("kubectl")
    if executable is None:
        raise Unavailable("kubectl is not installed (not found on PATH)")
    return executable


def _run(
    argv: list[str], stdin: bytes | None, timeout: int, what: str
) -> subprocess.CompletedProcess[bytes]:
    """kubectl with ``argv`` (a fixed argv, no shell; a manifest only on stdin), its failures
    to run or to finish in time as ``Unavailable``: the scheduler records them and retries."""
    try:
        return subprocess.run(
            [_kubectl(), *argv], input=stdin, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what} timed out after {timeout} s") from None
    except OSError as exc:
        raise Unavailable(f"kubectl could not be run: {exc.strerror}") from None


def check_target(target: KubeTarget) -> None:
    """Refuse a target kubectl would refuse before it reaches the cluster: no kubectl on the
    PATH (``Unavailable``), a kubeconfig kubectl cannot load, a context not in it (the given
    one, else its ``current-context``), or one whose cluster it does not define with a server
    (``InvalidInput``). Only the cluster can tell whether it answers and lets us apply.

    Read with ``kubectl config view``, which parses the file as every later ``apply`` will
    (exec plug-ins and all) and contacts nobody; it prints credentials redacted, and only the
    names are looked at."""
    where = f"--kubeconfig {target.kubeconfig}"
    argv = ["--kubeconfig", str(target.kubeconfig), "config", "view", "-o", "json"]
    done = _run(argv, None, CONFIG_TIMEOUT_SECONDS, f"kubectl config view ({where})")
    if done.returncode != 0:
        reason = " ".join(done.stderr.decode(errors="replace").split()).removeprefix("error: ")
        # go-yaml quotes the value it could not read in backquotes: that could be a token.
        reason = _QUOTED.sub("`...`", reason)[:300]
        raise InvalidInput(f"{where}: kubectl cannot load it: {reason or 'no message'}")
    try:
        config = json.loads(done.stdout)
        contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
        clusters = {c["name"]: c.get("cluster") or {} for c in config.get("clusters") or []}
        current = config.get("current-context") or None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InvalidInput(f"{where}: kubectl config view printed no kubeconfig") from None
    named = target.context or current
    if named is None:
        raise InvalidInput(f"{where} has no current-context: give --kube-context")
    if named not in contexts:
        known = ", ".join(sorted(contexts)[:10]) or "none"
        which = "--kube-context" if target.context else "its current-context"
        raise InvalidInput(
            f"{where}: {which} {named[:100]!r} does not exist in it (contexts: {known[:300]})"
        )
    cluster = contexts[named].get("cluster")
    if not cluster or not (clusters.get(cluster) or {}).get("server"):
        raise InvalidInput(f"{where}: context {named[:100]!r} names no cluster with a server in it")


def apply_argv(target: KubeTarget, field_manager: str = FIELD_MANAGER) -> list[str]:
    """The command line: the manifest is read from stdin (``-f -``)."""
    argv = ["kubectl", "--kubeconfig", str(target.kubeconfig)]
    if target.context:
        argv += ["--context", target.context]
    argv += ["apply", "--server-side", f"--field-manager={field_manager}", "--force-conflicts"]
    # The manifest is Trellis's own (no stray fields for validation to catch). Without this,
    # kubectl first fetches the server's OpenAPI documents, in a form that depends on its
    # version: Debian 12's kubectl 1.20 wants protobuf OpenAPI v2, current ones v3.
    argv += ["--validate=false"]
    return [*argv, "-f", "-"]


def apply(target: KubeTarget, manifest: bytes, field_manager: str = FIELD_MANAGER) -> str:
    """``kubectl apply --server-side`` the manifest; returns kubectl's one-line summary.

    Raises ``Unavailable`` when kubectl is not installed, times out or fails (its stderr,
    shortened, is the detail), so the scheduler records the failure and tries again.
    """
    argv = apply_argv(target, field_manager)
    done = _run(argv[1:], manifest, TIMEOUT_SECONDS, f"kubectl apply ({target.describe()})")
    if done.returncode != 0:
        reason = " ".join(done.stderr.decode(errors="replace").split())[:300]
        raise Unavailable(
            f"kubectl apply ({target.describe()}) failed (exit {done.returncode}): "
            f"{reason or 'no message'}"
        )
    return " ".join(done.stdout.decode(errors="replace").split())[:200]
