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

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ca.errors import InvalidInput, Unavailable

__all__ = ["FIELD_MANAGER", "KubeTarget", "apply", "apply_argv", "dns_label"]

FIELD_MANAGER = "trellis"
TIMEOUT_SECONDS = 60
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
    executable = shutil.which(argv[0])
    if executable is None:
        raise Unavailable("kubectl is not installed (not found on PATH)")
    try:
        # A fixed argv, no shell; the manifest only on stdin.
        done = subprocess.run(
            [executable, *argv[1:]],
            input=manifest,
            capture_output=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Unavailable(
            f"kubectl apply ({target.describe()}) timed out after {TIMEOUT_SECONDS} s"
        ) from None
    except OSError as exc:
        raise Unavailable(f"kubectl could not be run: {exc.strerror}") from None
    if done.returncode != 0:
        reason = " ".join(done.stderr.decode(errors="replace").split())[:300]
        raise Unavailable(
            f"kubectl apply ({target.describe()}) failed (exit {done.returncode}): "
            f"{reason or 'no message'}"
        )
    return " ".join(done.stdout.decode(errors="replace").split())[:200]
