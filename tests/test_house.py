"""The house rules of issue 13, checked on every run: small functions and classes, and arrows that point
down only (tools/ never imports server/, the engine imports no transport and no MCP SDK)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250
FACE = {"app", "mcp_tools", "resources", "notify", "schema", "task_extension", "web", "stdio", "auth", "limits",
        "events", "client_log", "completions", "signals", "cli", "sdk_compat", "demo", "__main__",
        "worker"}  # fmt: skip
"""server/ modules that speak MCP or a transport; every other server/ module is the engine."""


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", _modules("server") + _modules("tools"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_functions_and_classes_are_small_enough_to_read_at_once(path: Path) -> None:
    too_big = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            most = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines > most:
                too_big.append(f"{node.name}: {lines} lines (most {most})")
    assert too_big == []


@pytest.mark.parametrize("path", _modules("tools"), ids=lambda p: p.name)
def test_tools_never_import_server(path: Path) -> None:
    assert [m for m in _imports(path) if m == "server" or m.startswith("server.")] == []


@pytest.mark.parametrize(
    "path", [p for p in _modules("server") if p.stem not in FACE and p.stem != "__init__"], ids=lambda p: p.name
)
def test_the_engine_imports_no_transport_and_no_mcp_sdk(path: Path) -> None:
    face = {f"server.{name}" for name in FACE}
    wrong = [m for m in _imports(path) if m in face or m == "mcp" or m.startswith(("mcp.", "mcp_types"))]
    assert wrong == []
