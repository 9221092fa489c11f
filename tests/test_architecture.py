"""The layout's one-way arrows: no import cycles among the project's modules, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (("redknot_rag", "redknot_rag"), ("kernels", "redknot_rag.kernels"), ("retrieval", "redknot_rag.retrieval"))


def _modules() -> dict[str, Path]:
    mods = {}
    for base, pkg in PACKAGES:
        root = ROOT / base
        for path in root.rglob("*.py"):
            if base == "redknot_rag" and path.relative_to(root).parts[0] in ("kernels", "retrieval"):
                continue  # symlinked views of the two mapped packages in some checkouts
            rel = path.relative_to(root).with_suffix("").parts
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            mods[".".join((pkg, *parts))] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):  # every import, function-local ones included
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m:
                    edges[m].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            trivial = len(comp) == 2 and (comp[0].startswith(comp[1] + ".") or comp[1].startswith(comp[0] + "."))
            if len(comp) > 1 and not trivial:  # a package re-exporting its own submodule is not a cycle
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    assert "redknot_rag.runner" in mods and "redknot_rag.rag.assemble" in mods
    assert _cycles(_edges(mods)) == []


def test_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_lower_rooms_do_not_import_upper_ones():
    edges = _edges(_modules())
    upper = ("redknot_rag.server", "redknot_rag.rag", "redknot_rag.engine", "redknot_rag.reuse")
    for low in ("redknot_rag.runner", "redknot_rag.model", "redknot_rag.kvcache", "redknot_rag.attention"):
        bad = [t for t in edges[low] if t.startswith(upper)]
        assert not bad, f"{low} imports {bad}"
