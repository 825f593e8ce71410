"""Every `trellis` command line in deploy/ (container args, the image's ENTRYPOINT and CMD, the
systemd unit) is parsed by the real CLI: unknown options, missing required ones or bad values
fail here instead of in a crash-looping pod."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest
from typer.main import get_command

from cli.main import app
from tests.deploy.dockerfile import FINAL, values
from tests.deploy.manifests import K8S, kustomize_dirs, load_set, trellis_containers
from tests.deploy.unitfile import TEXT as UNIT_TEXT
from tests.deploy.unitfile import parse_unit


def parse(argv: list[str]) -> dict[str, Any]:
    """The parameters `trellis <argv>` would run with, without running it."""
    command: Any = get_command(app)
    while hasattr(command, "commands"):
        name, *argv = argv
        command = command.commands[name]
    params: dict[str, Any] = command.make_context(name, argv).params
    return params


def _invocations() -> list[tuple[str, list[str]]]:
    found = []
    for directory in kustomize_dirs():
        for doc, container in trellis_containers(load_set(directory)):
            found.append((f"{doc.ref} {container['name']}", list(container["args"])))
    entrypoint = json.loads(values(FINAL, "ENTRYPOINT")[-1])
    assert entrypoint == ["trellis"]
    found.append(("Dockerfile CMD", json.loads(values(FINAL, "CMD")[-1])))
    service = parse_unit(UNIT_TEXT)["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        for line in service.get(key, []):
            program, *args = shlex.split(line)
            assert program.endswith("/trellis"), line
            found.append((f"trellis.service {key}", args))
    return found


INVOCATIONS = _invocations()


def test_every_kind_of_invocation_is_found() -> None:
    commands = {args[0] for _, args in INVOCATIONS}
    assert commands == {"init", "serve", "agent"}


@pytest.mark.parametrize(("where", "argv"), INVOCATIONS, ids=[w for w, _ in INVOCATIONS])
def test_the_cli_accepts_it(where: str, argv: list[str]) -> None:
    parse(argv)


def test_agent_invocations_use_the_documented_layout() -> None:
    for where, argv in INVOCATIONS:
        if argv[0] != "agent":
            continue
        params = parse(argv)
        assert str(params["bundle"]) == "/etc/trellis/bundle/bundle.pem", where
        assert str(params["dir"]) == "/run/svid", where
        assert params["token"] is None, f"{where}: the join token comes from TRELLIS_JOIN_TOKEN"


def test_init_containers_and_sidecars_differ_only_as_intended() -> None:
    """The init container runs --once and no hook; the sidecar renews and runs the hook."""
    web = load_set(K8S / "agent").defined("Deployment", "web")
    assert web is not None
    spec = web.body["spec"]["template"]["spec"]
    init = parse(spec["initContainers"][0]["args"])
    sidecar = parse(next(c for c in spec["containers"] if c["name"] == "trellis-agent")["args"])
    assert init["once"] and init["exec_command"] is None
    assert not sidecar["once"] and sidecar["exec_command"]
    assert {k: v for k, v in init.items() if k not in ("once", "exec_command")} == {
        k: v for k, v in sidecar.items() if k not in ("once", "exec_command")
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(
            ["agent", "--server", "https://t:8443", "--bundle", "b", "--dir", "d", "--one"],
            "No such option",
            id="fail/misspelt-option",
        ),
        pytest.param(
            ["agent", "--server", "https://t:8443", "--dir", "d"],
            "Missing parameter: bundle",
            id="fail/missing-required",
        ),
        pytest.param(["serve", "--port", "https"], "valid integer", id="fail/bad-value"),
    ],
)
def test_a_broken_invocation_is_caught(argv: list[str], expected: str) -> None:
    with pytest.raises(Exception, match=expected):
        parse(argv)
