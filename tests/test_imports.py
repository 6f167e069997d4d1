"""The package's import graph, read statically from the source (every `import` and `from`,
function-level ones included): no cycles between modules, and layers import downwards only.

Layers (DESIGN.md): cli -> areas (trainer, registry, merge, eval, hub, serve, demo) ->
format, fingerprint, provenance -> utilities. A module below `cli` never imports it, and
the shared lower layers never import an area.
"""

from __future__ import annotations

import ast
from pathlib import Path

import adapterhub_local

ROOT = Path(adapterhub_local.__file__).resolve().parent.parent
PKG = "adapterhub_local"
# source folder -> package name (trainer/ and registry/ are mapped into our namespace)
SOURCES = {ROOT / PKG: PKG, ROOT / "trainer": f"{PKG}.trainer", ROOT / "registry": f"{PKG}.registry"}
AREAS = {"trainer", "registry", "merge", "eval", "hub", "serve", "demo"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, name in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join((name, *rel))] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import a.b.c` where c is a name: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in AREAS | {"cli"} else None


def test_the_graph_is_read():
    # a walker that finds nothing would pass everything: check what it must find
    assert f"{PKG}.trainer.loop" in MODULES and f"{PKG}.registry.core" in MODULES
    assert f"{PKG}.trainer.data" in GRAPH[f"{PKG}.trainer.loop"]  # from . import data as data_mod
    assert f"{PKG}.errors" in GRAPH[f"{PKG}.trainer.loop"]  # from ..errors import ...
    assert f"{PKG}.registry" in GRAPH[f"{PKG}.trainer.publish"]  # a function-level import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Known, owned elsewhere, being removed: each entry must still exist (a fixed one fails
# here until it is deleted), so this list only shrinks. Nothing may be added to it.
KNOWN_CYCLES: list[list[str]] = []
KNOWN_UPWARD: list[str] = []


def _describe(cycle: list[str]) -> str:
    return " <-> ".join(cycle) + "\n    " + "; ".join(
        f"{m} -> {', '.join(sorted(GRAPH[m] & set(cycle)))}" for m in cycle)


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(_describe(c) for c in new)
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"fixed, now delete from KNOWN_CYCLES: {gone}"


def test_nothing_below_cli_imports_cli():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if _area(m) != "cli"
           for t in ts if _area(t) == "cli"]
    assert not bad, "lower layers importing the CLI:\n" + "\n".join(bad)


def test_shared_layers_import_no_area():
    """format, fingerprint, provenance, card and the utilities sit below every area."""
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if _area(m) is None and m != PKG
           for t in ts if _area(t) in AREAS and not _allowed_upward(m, t)]
    new = [b for b in bad if b not in KNOWN_UPWARD]
    assert not new, "shared modules importing an area:\n" + "\n".join(new)
    gone = [k for k in KNOWN_UPWARD if k not in bad]
    assert not gone, f"fixed, now delete from KNOWN_UPWARD: {gone}"


def _allowed_upward(module: str, target: str) -> bool:
    # refs resolves `name@3` through the registry: it is the registry's front door, not a
    # utility; kept here by name so a new exception is a visible decision
    return module == f"{PKG}.refs" and _area(target) == "registry"


def _private_imports() -> list[str]:
    """`from X import _name` where X is a module of another package: a private name used
    across a package boundary should be public (or live where it is used)."""
    out = []
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                src = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                if not private or src not in MODULES or f"{src}.{a.name}" in MODULES:
                    continue
                if MODULES[src].name == "__init__.py" and any(MODULES[src].parent.glob(a.name + ".*")):
                    continue  # a private submodule that is no .py file (the C extension)
                if src.rpartition(".")[0] != package:
                    out.append(f"{name} imports {src}.{a.name}")
    return out


KNOWN_PRIVATE: list[str] = []


def test_no_private_names_across_packages():
    found = _private_imports()
    new = [p for p in found if p not in KNOWN_PRIVATE]
    assert not new, "private names imported across packages:\n" + "\n".join(new)
    gone = [k for k in KNOWN_PRIVATE if k not in found]
    assert not gone, f"fixed, now delete from KNOWN_PRIVATE: {gone}"
