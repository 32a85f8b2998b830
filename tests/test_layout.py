"""The codebase's shape: no import cycles between modules, command-line modules kept small."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

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


def test_no_module_imports_itself_back():
    mods = _modules()
    graph = nx.DiGraph({m: _module_level_imports(m, f, set(mods)) for m, f in mods.items()})
    assert graph.number_of_nodes() > 50 and set(graph["sntfx.study.runner"]) >= {"sntfx.study.report", "sntfx.study.stats"}
    assert nx.is_directed_acyclic_graph(graph), f"import cycle: {nx.find_cycle(graph)}"


def test_command_line_modules_stay_small():
    sizes = {f.name: len(f.read_text().splitlines()) for f in (ROOT / "sntfx" / "cli").glob("*.py")}
    assert len(sizes) >= 6 and max(sizes.values()) <= 300, sizes
