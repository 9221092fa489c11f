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


# ---- DESIGN's nevers besides "no cycles" ---------------------------------------------------------
def _arrow_violations(edges: dict[str, set[str]], sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    """`module -> target` for every import from a module under `sources` into one under `targets`."""
    return sorted(f"{m} -> {t}" for m in edges if m.startswith(sources) for t in edges[m] if t.startswith(targets))


def test_engine_does_not_import_the_server():
    """The engine schedules; grammars, sampling and stops live below it, never in `server/`."""
    edges = _edges(_modules())
    assert "redknot_rag.engine" in edges
    assert _arrow_violations(edges, ("redknot_rag.engine",), ("redknot_rag.server",)) == []


def _is_cli(path: Path) -> bool:
    """A CLI module: the `redknot` entry point, its shared flags, or a module that registers a subcommand."""
    if path.name in ("cli.py", "options.py") and path.parent.name == "redknot_rag":
        return True
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "register_cli" for n in tree.body)


def _library_to_cli(mods: dict[str, Path]) -> list[str]:
    cli = {m for m, p in mods.items() if _is_cli(p)}
    edges = _edges(mods)
    return sorted(f"{m} -> {t}" for m in mods if m not in cli for t in edges[m] if t in cli)


def test_library_does_not_import_cli_modules():
    """CLI modules turn flags into settings; library code (the harness, profiling, the server) never
    imports them, so nothing but the `redknot` command depends on argparse flags."""
    mods = _modules()
    assert {"redknot_rag.cli", "redknot_rag.ingest_cli", "redknot_rag.server.serve_cli"} <= {
        m for m, p in mods.items() if _is_cli(p)
    }
    assert _library_to_cli(mods) == []


def test_one_composition_root():
    """`rag.factory.build_service` is the only place that builds a RagService (the server, ingest,
    query, demo and eval all go through it)."""
    builders = _rag_service_builders(_modules())
    assert builders == ["redknot_rag.rag.factory"], builders


def _rag_service_builders(mods: dict[str, Path]) -> list[str]:
    """Modules that call `RagService(...)`."""
    out = []
    for m, path in sorted(mods.items()):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "RagService":
                out.append(m)
    return out


# Pool and allocator: only the runner (and kvcache, which defines them) touch KV memory; the store, the
# reuse policies, the engine and the server go through the runner's KV-memory API. What remains, by file and
# count of `.pool`/`.allocator` attribute accesses: the attention backends and the graphs read the pool the
# runner hands them (the forward half of the runner, below it in the arrows). The list may only shrink: a
# file over its count, or a file not listed, fails; a listed file that no longer touches them is reported
# (`stale_kv_memory_entries`).
KV_MEMORY_OWNERS = ("redknot_rag/runner.py", "redknot_rag/kvcache.py")
KV_MEMORY_ALLOWED = {
    "redknot_rag/attention/backend.py": 1,
    "redknot_rag/attention/flashinfer_backend.py": 36,
    "redknot_rag/attention/probe.py": 2,
    "redknot_rag/attention/torch_backend.py": 9,
    "redknot_rag/attention/triton_backend.py": 10,
    "redknot_rag/graphs/decode.py": 1,
}


def _kv_memory_accesses(files: list[Path], root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        n = sum(
            isinstance(a, ast.Attribute) and a.attr in ("pool", "allocator") for a in ast.walk(ast.parse(f.read_text()))
        )
        if n:
            out[f.relative_to(root).as_posix()] = n
    return out


def _kv_memory_violations(found: dict[str, int], allowed: dict[str, int], owners: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{f}: {n} accesses (allowed {allowed.get(f, 0)})"
        for f, n in found.items()
        if f not in owners and n > allowed.get(f, 0)
    )


def stale_kv_memory_entries(found: dict[str, int], allowed: dict[str, int]) -> list[str]:
    """Allow-list entries whose file no longer touches pool/allocator: delete them from the list."""
    return sorted(f for f in allowed if f not in found)


def test_only_the_runner_touches_pool_and_allocator():
    files = [p for base, _ in PACKAGES for p in (ROOT / base).rglob("*.py")]
    found = _kv_memory_accesses(files, ROOT)
    assert "redknot_rag/runner.py" in found  # the rule sees the owner's own accesses
    assert _kv_memory_violations(found, KV_MEMORY_ALLOWED, KV_MEMORY_OWNERS) == []
    # the list only shrinks: an entry for a file that no longer touches them must go
    assert stale_kv_memory_entries(found, KV_MEMORY_ALLOWED) == []


def _synthetic(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    """A fake project: {"redknot_rag/x.py": source} -> the module map `_edges` reads."""
    mods = {}
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        parts = Path(rel).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def test_each_rule_fails_when_violated(tmp_path):
    mods = _synthetic(
        tmp_path,
        {
            "redknot_rag/engine/driver.py": "def f():\n    from redknot_rag.server.errors import ApiError\n",
            "redknot_rag/server/errors.py": "class ApiError(Exception): ...\n",
            "redknot_rag/harness.py": "from redknot_rag.ingest_cli import open_service\n",
            "redknot_rag/ingest_cli.py": "def register_cli(sub):\n    pass\n",
            "redknot_rag/store/cache.py": "def put(runner):\n    return runner.pool.k_slots, runner.allocator\n",
            "redknot_rag/runner.py": "class R:\n    def f(self):\n        return self.pool\n",
            "redknot_rag/rag/factory.py": "def build_service(s):\n    return RagService(s)\n",
            "redknot_rag/server/serve_cli.py": "def make_rag(e):\n    return RagService(e)\n",
        },
    )
    edges = _edges(mods)
    assert _arrow_violations(edges, ("redknot_rag.engine",), ("redknot_rag.server",)) == [
        "redknot_rag.engine.driver -> redknot_rag.server.errors"
    ]
    assert _library_to_cli(mods) == ["redknot_rag.harness -> redknot_rag.ingest_cli"]
    assert _rag_service_builders(mods) == ["redknot_rag.rag.factory", "redknot_rag.server.serve_cli"]
    found = _kv_memory_accesses(sorted(mods.values()), tmp_path)
    assert found == {"redknot_rag/store/cache.py": 2, "redknot_rag/runner.py": 1}
    assert _kv_memory_violations(found, {}, ("redknot_rag/runner.py",)) == [
        "redknot_rag/store/cache.py: 2 accesses (allowed 0)"
    ]
    assert _kv_memory_violations(found, {"redknot_rag/store/cache.py": 1}, ("redknot_rag/runner.py",)) == [
        "redknot_rag/store/cache.py: 2 accesses (allowed 1)"  # a count may only go down
    ]
    assert _kv_memory_violations(found, {"redknot_rag/store/cache.py": 2}, ()) == [
        "redknot_rag/runner.py: 1 accesses (allowed 0)"
    ]
    assert stale_kv_memory_entries(found, {"redknot_rag/store/cache.py": 2, "redknot_rag/x.py": 1}) == [
        "redknot_rag/x.py"
    ]
