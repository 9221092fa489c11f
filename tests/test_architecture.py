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
    lower = (
        "redknot_rag.runner",
        "redknot_rag.model",
        "redknot_rag.kvcache",
        "redknot_rag.attention",
        "redknot_rag.graphs",
    )
    for low in [m for m in edges if m.startswith(lower)]:
        bad = [t for t in edges[low] if t.startswith(upper)]
        assert not bad, f"{low} imports {bad}"


def _project_imports(path: Path) -> list[str]:
    """Imports in one file that reach the project: `redknot_rag...` or `kernels...`, any relative import
    other than `from . import` of a sibling file that exists, lazy ones included."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] in ("redknot_rag", "kernels", "retrieval")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and mod.split(".")[0] in ("redknot_rag", "kernels", "retrieval"):
                bad.append(mod)
            elif node.level:
                names = [mod.split(".")[0]] if mod else [a.name for a in node.names]
                if node.level > 1 or not all((path.parent / f"{n}.py").exists() for n in names):
                    bad.append("." * node.level + (mod or ",".join(names)))
    return bad


def test_kernels_import_nothing_from_the_project():
    """`kernels/` holds kernels only: plain tensors in, plain tensors out; backends and planners that
    know batches, pools or models live in `redknot_rag.attention`."""
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert any(f.name == "paged_attention.py" for f in files)
    bad = {f.name: b for f in files if (b := _project_imports(f))}
    assert not bad, f"kernels/ imports the project: {bad}"


def test_kernel_import_check_can_fail(tmp_path):
    (tmp_path / "k.py").write_text("import torch\nfrom .sib import x\nfrom . import gone\n")
    (tmp_path / "sib.py").write_text("def f():\n    from redknot_rag.batch import ForwardBatch\n")
    assert _project_imports(tmp_path / "k.py") == [".gone"]
    assert _project_imports(tmp_path / "sib.py") == ["redknot_rag.batch"]
