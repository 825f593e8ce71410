"""``ca`` is the product; ``api`` and ``cli`` translate. The core must not import a transport.

Walks every module under ``ca/`` (migrations included) with ``ast``, so an import hidden in a
function body, a ``TYPE_CHECKING`` block or a relative form is caught as well.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import ca

CA_DIR = Path(ca.__file__).parent
FORBIDDEN = frozenset({"fastapi", "starlette", "typer", "uvicorn", "click", "api", "cli"})


def imported_roots(source: str, filename: str = "<string>") -> set[str]:
    """Top-level package names a module imports (absolute imports only; relative imports stay
    inside ``ca`` by construction)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
    return roots


MODULES = sorted(CA_DIR.rglob("*.py"))


def test_the_walk_sees_the_whole_package() -> None:
    names = {path.relative_to(CA_DIR).as_posix() for path in MODULES}
    assert {"issue.py", "keys/file.py", "store/db.py", "store/migrations/env.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=[p.relative_to(CA_DIR).as_posix() for p in MODULES])
def test_core_imports_no_transport(path: Path) -> None:
    leaked = imported_roots(path.read_text(encoding="utf-8"), str(path)) & FORBIDDEN
    assert not leaked, f"ca/{path.relative_to(CA_DIR)} imports {sorted(leaked)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("import fastapi", {"fastapi"}, id="import"),
        pytest.param("import starlette.responses as r", {"starlette"}, id="import-dotted"),
        pytest.param("from typer import Typer", {"typer"}, id="from-import"),
        pytest.param("def f():\n    import uvicorn\n", {"uvicorn"}, id="in-function"),
        pytest.param(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from click import Context\n",
            {"typing", "click"},
            id="type-checking-block",
        ),
        pytest.param(
            "import importlib\nimportlib.import_module('fastapi.routing')",
            {"importlib", "fastapi"},
            id="import-module",
        ),
        pytest.param("from api.problems import render", {"api"}, id="adapter-package"),
        pytest.param("from . import errors\nfrom .keys import KeyType", set(), id="relative"),
    ],
)
def test_the_detector_finds_imports(source: str, expected: set[str]) -> None:
    assert imported_roots(source) == expected


# Driven only by the CLI (no route reaches them): their input is the command line itself.
CLI_ONLY = frozenset({"agent.py", "istio.py", "kubectl.py", "serverconn.py", "workload.py"})
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def flags_in_raises(source: str) -> list[str]:
    """CLI flags in the text of what a scope raises: the string literals inside each ``raise``,
    and those assigned, in the same scope, to a name the ``raise`` reads (``fix = ...``). A
    function is walked on its own and as part of the module: each flag is named once."""
    found: set[str] = set()
    for scope in ast.walk(ast.parse(source)):
        if not isinstance(scope, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assigned: dict[str, list[str]] = {}
        raises: list[ast.Raise] = []
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).extend(_strings(node.value))
            elif isinstance(node, ast.Raise) and node.exc is not None:
                raises.append(node)
        for raised in raises:
            texts = _strings(raised)
            for name in ast.walk(raised):
                if isinstance(name, ast.Name):
                    texts += assigned.get(name.id, [])
            found |= {flag for text in texts for flag in _FLAG.findall(text)}
    return sorted(found)


def _strings(node: ast.AST) -> list[str]:
    return [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if p.relative_to(CA_DIR).as_posix() not in CLI_ONLY],
    ids=lambda p: p.relative_to(CA_DIR).as_posix(),
)
def test_core_errors_name_no_cli_flag(path: Path) -> None:
    """docs/architecture.md: a ``ca`` error reaches REST clients and the CLI alike, so it names
    the setting ("force", "the CA TTL"), never one adapter's spelling of it (``--force``)."""
    flags = flags_in_raises(path.read_text(encoding="utf-8"))
    assert not flags, f"ca/{path.relative_to(CA_DIR)} raises messages naming {flags}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("raise E('use --force')", ["--force"], id="literal"),
        pytest.param(
            "def f(x):\n    raise E(f'{x}: give --ca-ttl 6h')", ["--ca-ttl"], id="f-string"
        ),
        pytest.param(
            "def f():\n    fix = 'give --cn'\n    raise E(g(fix))", ["--cn"], id="via-name"
        ),
        pytest.param("argv = ['kubectl', '--context', c]", [], id="not-raised"),
        pytest.param("raise E('a -- b, x--y, the force')", [], id="no-flag"),
    ],
)
def test_the_flag_detector(source: str, expected: list[str]) -> None:
    assert flags_in_raises(source) == expected
