"""Import cycles between the modules of qsmprep, function-level imports included.

Usage: ``python tools/import_cycles.py [--edges]``. Reads the sources with :mod:`ast` (imports
nothing), builds the graph "module A imports module B" from every ``import`` and
``from ... import`` statement, wherever it stands (a function-level import hides a cycle from
the interpreter, not from this graph), and prints each cycle (a strongly connected component of
two or more modules) with its edges. Exit status 1 when there is a cycle.

An edge goes to the module named, or to the submodule when ``from package import name`` names
one; the implicit import of a package's ``__init__`` is not an edge.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path = ROOT, package: str = "qsmprep") -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module of ``package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def import_graph(root: Path = ROOT, package: str = "qsmprep") -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``."""
    mods = modules(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up) + ("." + base if base else "")
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            for target in targets:
                module = resolve(target)
                if module and module != name:
                    graph[name].add(module)
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan), sorted."""
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print the whole graph too")
    args = parser.parse_args(argv)
    graph = import_graph()
    if args.edges:
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"{a} -> {b}")
    n_edges = sum(len(v) for v in graph.values())
    print(f"{len(modules())} modules, {n_edges} import edges")
    found = cycles(graph)
    for comp in found:
        print("cycle: " + " ".join(comp))
        members = set(comp)
        for a in comp:
            for b in sorted(graph.get(a, set()) & members):
                print(f"    {a} -> {b}")
    print(f"{len(found)} cycle(s)" if found else "no cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
