"""deploy/docker/Dockerfile, parsed (dockerfile-parse) and checked instruction by instruction,
and against the Kubernetes manifests that run the image. No Docker engine is needed."""

from __future__ import annotations

import re

import pytest

from ca.config import Settings
from tests.deploy.dockerfile import (
    FINAL,
    IGNORE_FILE,
    PYPROJECT,
    TEXT,
    copied_sources,
    dockerfile_problems,
    env,
    healthcheck_command,
    values,
)
from tests.deploy.manifests import K8S, REPO, load_set, trellis_containers, workloads


def test_the_dockerfile_passes_every_check() -> None:
    assert dockerfile_problems(TEXT) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param("USER 10001:10001", "USER root", "numeric non-root", id="fail/user-root"),
        pytest.param("USER 10001:10001", "USER 0", "numeric non-root", id="fail/user-zero"),
        pytest.param(
            "python:3.12-slim-bookworm AS runtime",
            "python:latest AS runtime",
            "fixed tag",
            id="fail/latest",
        ),
        pytest.param(
            "python:3.12-slim-bookworm AS build", "python AS build", "fixed tag", id="fail/untagged"
        ),
        pytest.param("HEALTHCHECK", "# HEALTHCHECK", "HEALTHCHECK", id="fail/no-healthcheck"),
        pytest.param(
            'ENTRYPOINT ["trellis"]', "ENTRYPOINT trellis", "ENTRYPOINT", id="fail/shell-entrypoint"
        ),
        pytest.param("EXPOSE 8443", "EXPOSE 8080", "EXPOSE", id="fail/port"),
        pytest.param('VOLUME ["/var/lib/trellis"]', 'VOLUME ["/data"]', "VOLUME", id="fail/volume"),
        pytest.param("TMPDIR=/var/lib/trellis", "TMPDIR=/tmp", "TMPDIR", id="fail/tmpdir"),
        pytest.param(
            "PYTHONUNBUFFERED=1",
            "PYTHONUNBUFFERED=1 TRELLIS_KEY_PASSPHRASE=x",
            "looks like a secret",
            id="fail/secret-env",
        ),
        pytest.param(
            "COPY cli/ cli/", "COPY client/ client/", "does not exist", id="fail/copy-missing"
        ),
        pytest.param(
            "--mount=type=bind,from=build,",
            "--mount=type=bind,",
            "nothing from",
            id="fail/not-using-build-stage",
        ),
    ],
)
def test_a_broken_dockerfile_is_caught(old: str, new: str, expected: str) -> None:
    assert old in TEXT
    problems = dockerfile_problems(TEXT.replace(old, new))
    assert any(expected in problem for problem in problems), problems


def test_single_stage_is_caught() -> None:
    single = TEXT[TEXT.index("FROM python:3.12-slim-bookworm AS runtime") :]
    assert dockerfile_problems(single) == [
        "not multi-stage: build the wheel in one stage, install it in another"
    ]


def test_the_build_copies_the_whole_package() -> None:
    """pyproject.toml, its readme and every top-level package setuptools includes."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], *packages} <= copied_sources(TEXT)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern that matches a
    directory matches everything below it."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            result = not negate
    return result


def test_the_ignore_file_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in IGNORE_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied_sources(TEXT):
        assert not _ignored(source, patterns), source
        if (REPO / source).is_dir():
            assert not _ignored(f"{source}/module.py", patterns), source
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "var/admin-token",
        "tests/conftest.py",
        "ca/__pycache__/x.pyc",
        "deploy/k8s/ha/secret-example.yaml",
    ):
        assert _ignored(dropped, patterns), dropped


def _uid_gid() -> tuple[int, int]:
    uid, _, gid = values(FINAL, "USER")[-1].partition(":")
    return int(uid), int(gid)


@pytest.mark.parametrize("directory", ["single", "ha"])
def test_kubernetes_runs_the_image_as_its_user_on_its_data_dir(directory: str) -> None:
    uid, gid = _uid_gid()
    manifests = load_set(K8S / directory)
    for _, spec in workloads(manifests):
        context = spec["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)
    data_dir = env(FINAL)["TRELLIS_DATA_DIR"]
    config = manifests.defined("ConfigMap", "trellis-config")
    assert config is not None and config.body["data"]["TRELLIS_DATA_DIR"] == data_dir
    for doc, container in trellis_containers(manifests):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert data_dir in mounts, doc.ref
        assert container["securityContext"]["runAsUser"] == uid


def test_port_and_version_agree_with_the_project() -> None:
    assert values(FINAL, "EXPOSE") == [str(Settings().port)]
    labels = " ".join(values(FINAL, "LABEL"))
    assert f'org.opencontainers.image.version="{PYPROJECT["project"]["version"]}"' in labels


def test_healthcheck_verifies_the_server_against_the_bundle() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "bundle.pem" in command[2] and "TRELLIS_DATA_DIR" in command[2]
    assert "create_default_context" in command[2]  # verifies the certificate and the name
