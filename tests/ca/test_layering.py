"""``ca`` is the product; ``api`` and ``cli`` translate. The core must not import a transport.

Walks every module under ``ca/`` (migrations included) with ``ast``, so an import hidden in a
function body, a ``TYPE_CHECKING`` block or a relative form is caught as well.
"""

from __future__ import annotations

import ast
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
