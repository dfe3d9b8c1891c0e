"""The import rules, read from the source without importing it (ast): no import cycle between modules, no
private name reached across modules, and imports only backwards along training -> export -> serving -> bench.

Function-level (lazy) imports count like module-level ones: a lazy import hides a cycle from the interpreter, not
from a reader. An edge goes to the module an import names (``from pkg import mod`` -> ``pkg.mod`` when that is a
module, else ``pkg``); the parent packages it runs implicitly are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("training", "export", "serving", "bench")  # a package may import only itself and those before it

# Known failures owned elsewhere, each named; the lead empties this list (an entry that no longer fails is an
# error too, so the list cannot go stale). Cycles are keyed by their sorted member modules.
KNOWN_CYCLES: frozenset[tuple[str, ...]] = frozenset()
KNOWN_PRIVATE: frozenset[tuple[str, str]] = frozenset()  # (importing module, "module._name")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (one of MODULES)
    line: int
    private: str | None = None  # "module._name" when a private name is taken from the target


def _package(mod: str) -> str:
    return mod if MODULES[mod].name == "__init__.py" else mod.rpartition(".")[0]


def _absolute(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package(mod).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _known(name: str) -> str | None:
    """The longest prefix of dotted ``name`` that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(mod: str) -> Iterator[Import]:
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    aliases: dict[str, str] = {}  # local name -> our module it is bound to (for ``alias._name`` access)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _known(a.name)
                if target:
                    yield Import(mod, target, node.lineno)
                    if a.asname:
                        aliases[a.asname] = target
                    elif a.name.split(".")[0] in MODULES:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(mod, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    yield Import(mod, sub, node.lineno)
                    aliases[a.asname or a.name] = sub
                elif (target := _known(base)) is not None:
                    yield Import(mod, target, node.lineno,
                                 f"{target}.{a.name}" if _private(a.name) and target != mod else None)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, v = [node.attr], node.value
            while isinstance(v, ast.Attribute):
                chain.append(v.attr)
                v = v.value
            if isinstance(v, ast.Name) and v.id in aliases:
                target = ".".join([aliases[v.id], *reversed(chain[1:])])
                owner = _known(target) or aliases[v.id]
                if owner != mod and target == owner:  # the private name is an attribute of a module, not of a class
                    yield Import(mod, owner, node.lineno, f"{owner}.{node.attr}")


ALL_IMPORTS = [imp for mod in MODULES for imp in imports_of(mod)]


def cycles() -> dict[tuple[str, ...], list[str]]:
    """Strongly connected components with more than one module (Tarjan), each with one cycle through them."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in ALL_IMPORTS:
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = {}
    for comp in found:
        start = min(comp)
        out[tuple(sorted(comp))] = _path_back(graph, comp, start)
    return out


def _path_back(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside ``comp`` (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_the_walk_sees_every_package_and_lazy_imports():
    assert {m.split(".")[0] for m in MODULES} == set(LAYERS)
    assert any(imp.source == "serving.server" and imp.target == "serving.repository" for imp in ALL_IMPORTS)


def test_no_import_cycle():
    found = cycles()
    new = {k: v for k, v in found.items() if k not in KNOWN_CYCLES}
    assert not new, "import cycles (one cycle per tangle, then all its modules):\n" + "\n".join(
        f"{' -> '.join(c)}   [{', '.join(k)}]" for k, c in new.items())
    stale = KNOWN_CYCLES - set(found)
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone (remove them): {sorted(stale)}"


def test_no_private_name_across_modules():
    found = {(imp.source, imp.private): imp for imp in ALL_IMPORTS if imp.private}
    new = sorted(f"{MODULES[s].relative_to(ROOT)}:{imp.line}: {s} takes {p}"
                 for (s, p), imp in found.items() if (s, p) not in KNOWN_PRIVATE)
    assert not new, "private names used across modules (give them a public name):\n" + "\n".join(new)
    stale = KNOWN_PRIVATE - set(found)
    assert not stale, f"KNOWN_PRIVATE lists uses that are gone (remove them): {sorted(stale)}"


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_only_go_backwards(layer):
    later = LAYERS[LAYERS.index(layer) + 1:]
    bad = sorted(f"{MODULES[imp.source].relative_to(ROOT)}:{imp.line}: {imp.source} imports {imp.target}"
                 for imp in ALL_IMPORTS if imp.source.split(".")[0] == layer and imp.target.split(".")[0] in later)
    assert not bad, f"{layer} imports forward along {' -> '.join(LAYERS)}:\n" + "\n".join(bad)
