"""The package's imports run one way (DESIGN.md): no cycles, no private names across modules.

Read from the source (AST), so imports inside functions count too: a function-level import
hides a loop from Python's import machinery, not from this test.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from vpd.stages import STAGES

PKG = Path(__file__).resolve().parent.parent / "vpd"


def _stage_modules() -> set[str]:
    """The top-level modules of every registered stage's config classes and run functions."""
    return {
        obj.__module__.split(".")[1]
        for stage in STAGES.values()
        for runner in stage.runners
        for obj in (runner.config, runner.run)
    }


# DESIGN.md: cli -> pipeline/report/stages registry -> stages -> tools/llm/vlm ->
# store/records/errors. A module may import its own layer or a lower one (higher number),
# never a higher one. The stage layer is read from the registry, plus the modules at that
# layer that are no `vpd run` stage of their own (verify's judge, export, view).
LAYERS: dict[str, int] = {
    "cli": 0,
    "flags": 0,
    "pipeline": 1,
    "report": 1,
    "stages": 1,
    **dict.fromkeys(sorted(_stage_modules() | {"judge", "transfer", "export", "view"}), 2),
    "tools": 3,
    "llm": 3,
    "vlm": 3,
    **dict.fromkeys(
        ["store", "records", "errors", "progress", "options", "metrics", "runpaths", "cache"]
        + ["net", "images", "resources", "hardware"],
        4,
    ),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


@functools.cache
def import_graph() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """module -> {(imported vpd module, names taken from it)}, every import in the file."""
    mods = _modules()
    graph: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[tuple[str, tuple[str, ...]]] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update((a.name, ()) for a in node.names if a.name.split(".")[0] == "vpd")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "vpd":
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    edges.add((sub, ()) if sub in mods else (base, (a.name,)))
        graph[name] = {(m, n) for m, n in edges if m in mods and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_cycle_finder_finds_a_loop_and_a_self_contained_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles() -> None:
    graph = {m: {dep for dep, _ in edges} for m, edges in import_graph().items()}
    assert cycles(graph) == []


def test_no_private_names_across_modules() -> None:
    bad = [
        f"{m} imports {name} from {dep}"
        for m, edges in import_graph().items()
        for dep, names in edges
        for name in names
        if name.startswith("_")
    ]
    assert bad == []


def test_every_module_has_a_layer() -> None:
    missing = sorted({m.split(".")[1] for m in _modules() if "." in m} - set(LAYERS))
    assert missing == [], f"add {missing} to LAYERS (and to DESIGN.md's layering)"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_downward(module: str) -> None:
    mine = _layer(module)
    if mine is None:
        return
    upward = [
        dep
        for dep, _ in import_graph()[module]
        if (theirs := _layer(dep)) is not None and theirs < mine
    ]
    assert upward == [], f"{module} (layer {mine}) imports a higher layer: {upward}"
