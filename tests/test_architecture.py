"""The package's architecture, checked from its source: no import cycle (imports inside
functions included), dependencies flowing one way between the folders, small modules and
functions. Reads the files with ``ast``; imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sae_lens_itda"
PKG = "sae_lens_itda"

# Each part may import only parts of a lower rank, and modules of its own folder.
RANKS = {
    "core": 0,
    "io": 1,
    "itda": 2,
    "sources": 2,
    "splinterp": 3,
    "training": 3,
    "registration": 4,
    "evaluation": 4,
    "analysis": 5,
    "experiments": 5,
    "__init__": 6,
    "cli": 7,
    "__main__": 8,
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join((PKG, *parts))
        out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported dotted name belongs to (a name inside a module maps to the module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    """Every package module ``module`` imports, at the top or inside functions."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name) for a in node.names if a.name.split(".")[0] == PKG}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != PKG:
                continue
            for a in node.names:
                out.add(_resolve(f"{src}.{a.name}"))
    out.discard(module)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_has_a_rank():
    assert {_part(m) for m in MODULES} <= set(RANKS)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_dependencies_flow_one_way():
    bad = [
        f"{m} ({_part(m)}) imports {n} ({_part(n)})"
        for m, deps in GRAPH.items()
        for n in deps
        if _part(n) != _part(m) and RANKS[_part(n)] >= RANKS[_part(m)]
    ]
    assert bad == []


def test_modules_and_functions_are_small():
    long_modules = [f"{p.relative_to(ROOT)}: {n}" for p in MODULES.values()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for p in MODULES.values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long_modules == [] and long_functions == []
