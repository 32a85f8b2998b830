"""The codebase's shape: no import cycles between modules, command-line modules kept small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sntfx": ROOT / "sntfx", "sntfx.passes": ROOT / "passes", "sntfx.exporters": ROOT / "exporters"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The sntfx modules ``name`` imports when it is imported (function-level imports run later)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out |= subs or ({target} & known)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & known
    return out - {name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_module_imports_itself_back():
    mods = _modules()
    graph = {m: _module_level_imports(m, f, set(mods)) for m, f in mods.items()}
    assert len(graph) > 50 and graph["sntfx.study.runner"] >= {"sntfx.study.report", "sntfx.study.stats"}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_command_line_modules_stay_small():
    sizes = {f.name: len(f.read_text().splitlines()) for f in (ROOT / "sntfx" / "cli").glob("*.py")}
    assert len(sizes) >= 6 and max(sizes.values()) <= 300, sizes
