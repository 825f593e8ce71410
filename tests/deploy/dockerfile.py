"""deploy/docker/Dockerfile, parsed with dockerfile-parse, and the checks its instructions must
pass. Each check returns problems (empty: fine), so tests can break a copy and see it caught."""

from __future__ import annotations

import io
import json
import re
import shlex
import tomllib

from dockerfile_parse import DockerfileParser

from tests.deploy.manifests import DEPLOY, REPO

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
IGNORE_FILE = DEPLOY / "docker" / "Dockerfile.dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SECRET_WORDS = re.compile(r"PASSPHRASE|PASSWORD|SECRET|TOKEN|PRIVATE|_KEY\b|DATABASE_URL")

Instruction = dict[str, str]


def stages(text: str) -> list[list[Instruction]]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    result: list[list[Instruction]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            result.append([])
        if result and instruction["instruction"] != "COMMENT":
            result[-1].append(instruction)
    return result


def values(stage: list[Instruction], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def env(stage: list[Instruction]) -> dict[str, str]:
    pairs = [shlex.split(value) for value in values(stage, "ENV")]
    return dict(item.split("=", 1) for items in pairs for item in items)


def _image_problem(reference: str, stage_names: set[str]) -> str | None:
    if reference in stage_names or "@sha256:" in reference:
        return None
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag or tag in ("", "latest"):
        return f"base image {reference} needs a fixed tag (not latest)"
    return None


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    all_stages = stages(text)
    if len(all_stages) < 2:
        return ["not multi-stage: build the wheel in one stage, install it in another"]
    names: set[str] = set()
    for stage in all_stages:
        image, _, alias = stage[0]["value"].partition(" AS ")
        if (problem := _image_problem(image.strip(), names)) is not None:
            problems.append(problem)
        names.add(alias.strip())
    final = all_stages[-1]
    body = "\n".join(i["value"] for i in final)
    if not any(f"from={name}" in body or f"--from={name}" in body for name in names if name):
        problems.append("the final stage takes nothing from the build stage")
    users = values(final, "USER")
    if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
        problems.append(f"USER must be a numeric non-root uid[:gid], not {users[-1:]}")
    healthchecks = values(final, "HEALTHCHECK")
    if not healthchecks or "CMD" not in healthchecks[-1] or "/healthz" not in healthchecks[-1]:
        problems.append("HEALTHCHECK must probe /healthz")
    if _exec_form(values(final, "ENTRYPOINT")[-1] if values(final, "ENTRYPOINT") else "") != [
        "trellis"
    ]:
        problems.append('ENTRYPOINT must be ["trellis"]')
    if _exec_form(values(final, "CMD")[-1] if values(final, "CMD") else "") != [
        "serve",
        "--host",
        "0.0.0.0",
    ]:
        problems.append('CMD must be ["serve", "--host", "0.0.0.0"]')
    if "8443" not in " ".join(values(final, "EXPOSE")).split():
        problems.append("EXPOSE 8443 missing")
    variables = env(final)
    data_dir = variables.get("TRELLIS_DATA_DIR", "")
    volumes = [v for value in values(final, "VOLUME") for v in (_exec_form(value) or [value])]
    if not data_dir or data_dir not in volumes:
        problems.append("TRELLIS_DATA_DIR must be set and be a VOLUME")
    for name in ("HOME", "TMPDIR"):
        if not data_dir or not variables.get(name, "").startswith(data_dir):
            problems.append(f"{name} must point into the data volume (read-only root)")
    for stage in all_stages:
        for name in env(stage):
            if SECRET_WORDS.search(name):
                problems.append(f"ENV {name} looks like a secret: pass it at run time")
        for value in values(stage, "ARG"):
            if SECRET_WORDS.search(value.split("=")[0]):
                problems.append(f"ARG {value} looks like a secret")
    for stage in all_stages:
        for value in values(stage, "COPY") + values(stage, "ADD"):
            words = [w for w in value.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in value.split()):
                continue
            for source in words[:-1]:
                if not (REPO / source).exists():
                    problems.append(f"COPY source {source} does not exist in the repository")
    return problems


def copied_sources(text: str) -> set[str]:
    sources = set()
    for stage in stages(text):
        for value in values(stage, "COPY"):
            if "--from" not in value:
                sources |= {w.rstrip("/") for w in value.split()[:-1] if not w.startswith("--")}
    return sources


TEXT = DOCKERFILE.read_text()
FINAL = stages(TEXT)[-1]


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form command (used by the runtime test as well)."""
    value = values(FINAL, "HEALTHCHECK")[-1]
    command = _exec_form(value[value.index("CMD") + 3 :].strip())
    assert command is not None, "HEALTHCHECK must use the exec form"
    return command
