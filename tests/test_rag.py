"""RAG service on the default model: ingest with chunk KV, query with reuse, re-ingest, delete, bad input,
and crash safety of ingestion under SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from redknot_rag.rag import RagService, chunk_key, run_query
from redknot_rag.retrieval.docdb import UnknownNamespaceError
from redknot_rag.retrieval.parser import IngestError
from redknot_rag.sampling import SamplingParams

DOCS = {
    "lighthouse.md": "# Varn Island\n\nThe lighthouse on Varn Island was built in 1887. Its lamp burns whale oil.\n",
    "archive.txt": "The access code for the Dorbrecht archive is 4578. Visitors must sign the ledger first.\n",
    "ferry.txt": "The Mirdell ferry departs from pier 7 every morning at six, except on Sundays.\n",
}


@pytest.fixture(scope="module")
def rag(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    svc = RagService(engine, root / "data", "naive")
    svc.docs_dir = docs
    s = svc.ingest_paths([docs], "t1")
    assert s.documents == 3 and s.chunks == 3 and s.kv_chunks == 3 and s.kv_bytes > 0
    return svc


def test_query_reuses_stored_kv_and_cites_sources(rag):
    alloc, cache = rag.engine.runner.allocator, rag.assembler.cache
    free, cached = alloc.num_free, cache.num_pages  # the session engine is shared: count relative to now
    res = run_query(
        rag,
        "What is the access code for the Dorbrecht archive?",
        top_k=2,
        namespace="t1",
        params=SamplingParams(max_new_tokens=16),
    )
    assert any(s.doc_id.endswith("archive.txt") for s in res.sources)
    assert res.usage["cached_tokens"] > 0
    assert {"retrieve_ms", "kv_load_ms", "recompute_ms", "question_prefill_ms", "ttft_ms"} <= set(res.timing)
    # the finished request gave back every page; only segments the pool cache newly holds stay taken
    assert alloc.num_free + (cache.num_pages - cached) == free


def test_reingest_unchanged_is_noop_and_changed_replaces_kv(rag):
    s = rag.ingest_paths([rag.docs_dir], "t1")
    assert s.changed_documents == 0 and s.chunks == 0 and s.kv_chunks == 0
    path = rag.docs_dir / "ferry.txt"
    old_key = chunk_key(rag.chunk_token_ids(rag.db.chunks_for_doc("t1", _doc_id(rag, "ferry"))[0].text))
    path.write_text("The Mirdell ferry now departs from pier 9, at seven.\n")
    s = rag.ingest_paths([rag.docs_dir], "t1")
    assert s.changed_documents == 1 and s.removed_chunks == 1 and s.kv_chunks == 1
    assert not rag.store.contains(old_key)
    rows = rag.db.chunks_for_doc("t1", _doc_id(rag, "ferry"))
    assert "pier 9" in rows[0].text and rag.store.contains(chunk_key(rag.chunk_token_ids(rows[0].text)))


def _doc_id(rag, stem: str) -> str:
    return next(d["doc_id"] for d in rag.list_documents("t1") if stem in d["doc_id"])


def test_delete_and_namespace_isolation(rag):
    rag.ingest_texts([{"id": "x", "text": "Namespace two holds only this sentence about owls."}], "t2")
    assert [d["doc_id"] for d in rag.list_documents("t2")] == ["x"]
    assert all("owls" not in s.text for s in rag.retrieve("owls", top_k=3, namespace="t1"))
    assert rag.delete_document("t2", "x") and not rag.delete_document("t2", "x")
    with pytest.raises(UnknownNamespaceError):
        rag.retrieve("anything", namespace="nope")


def test_bad_input(rag, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe broken")
    for name in ("empty.txt", "bin.txt", "bad.txt"):
        with pytest.raises(IngestError):
            rag.ingest_paths([tmp_path / name], "t1")
    with pytest.raises((IngestError, FileNotFoundError)):
        rag.ingest_paths([tmp_path / "missing.txt"], "t1")
    with pytest.raises(ValueError):
        rag.ingest_texts([{"text": ""}], "t1")
    with pytest.raises(ValueError):
        rag.retrieve("", namespace="t1")
    assert len(rag.list_documents("t1")) == 3  # nothing lost


def _prompt_with_stored_chunks(rag):
    """A chat prompt that carries two retrieved chunks verbatim: (sources, token ids)."""
    sources = rag.retrieve("Dorbrecht archive code", top_k=2, namespace="t1")
    fmt = rag.layout.format
    text = fmt.prefix + rag.format_context(sources) + "Question: What is the code?" + fmt.suffix
    return sources, rag.engine.tokenizer.encode(text, add_special_tokens=False)


def test_automatic_reuse_from_prompt_text(rag):
    sources, ids = _prompt_with_stored_chunks(rag)
    req = rag.build_request(ids, SamplingParams(max_new_tokens=4))
    assert req.cached_tokens == sum(len(rag.chunk_token_ids(s.text)) for s in sources)
    rag.discard(req)


@pytest.mark.slow
def test_ingest_survives_sigkill(tmp_path):
    """Kill `redknot ingest` at random points; the store opens cleanly, keeps every committed chunk, and
    the next ingest completes the rest."""
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(0)
    words = "alpha beta gamma delta copper salt river lamp tower ledger archive pier".split()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)) + f" Doc {i}.\n")
    data = tmp_path / "data"
    cmd = [
        sys.executable,
        "-m",
        "redknot_rag.cli",
        "ingest",
        str(docs),
        "--data-dir",
        str(data),
        "--quiet",
        "--chunk-tokens",
        "128",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for delay in (9.0, 14.0):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay + rng.random() * 3)
        p.send_signal(signal.SIGKILL)
        p.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    from redknot_rag.retrieval.docdb import DocDB

    db = DocDB(data / "docs.sqlite")
    assert len(db.list_documents("default")) == 12
    assert db.chunks_missing_kv("default") == []
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["documents"] == 12
    assert not list((data / "kv").rglob("tmp/*"))


def test_shared_kv_survives_delete_in_other_namespace(rag):
    """Two namespaces hold the same text: one chunk KV, kept until the last chunk row naming it is gone."""
    text = "The Oskarsund bell tower rings eleven times at noon to mark the founding of the town."
    rag.ingest_texts([{"id": "bell", "text": text}], "share-a")
    rag.ingest_texts([{"id": "bell", "text": text}], "share-b")
    key = rag.db.chunks_for_doc("share-a", "bell")[0].kv_key
    assert key is not None and key == rag.db.chunks_for_doc("share-b", "bell")[0].kv_key
    assert rag.delete_document("share-a", "bell")
    assert rag.store.contains(key), "deleting in share-a must keep the KV share-b still uses"
    assert rag.delete_document("share-b", "bell")
    assert not rag.store.contains(key)


def test_automatic_reuse_is_limited_to_the_callers_namespaces(rag):
    _, ids = _prompt_with_stored_chunks(rag)
    other = rag.build_request(ids, SamplingParams(max_new_tokens=4), namespaces={"t2"})
    assert other.cached_tokens == 0 and other.reuse is None
    own = rag.build_request(ids, SamplingParams(max_new_tokens=4), namespaces={"t1"})
    assert own.cached_tokens > 0
    rag.discard(own)


def test_refused_submission_returns_every_page(rag, monkeypatch):
    """Assembly takes pages; if the engine refuses the request (queue full), they all come back."""
    from redknot_rag.engine import EngineOverloadedError

    engine = rag.engine
    alloc = engine.runner.allocator
    run_query(
        rag,
        "What is the access code?",
        top_k=2,
        namespace="t1",
        reuse_policy="redknot:0.2",
        params=SamplingParams(max_new_tokens=1),
    )  # fmt: skip  (warms the pool cache: its pages stay)
    free, refs = alloc.num_free, int(alloc.refcount.sum())
    prep = rag.prepare("What is the access code?", top_k=2, namespace="t1", reuse_policy="redknot:0.2")
    # the assembled context holds references to the chunks' shared pages (its recompute is still pending)
    assert prep.request.reuse is not None and int(alloc.refcount.sum()) > refs
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, max_queued_requests=0))
    with pytest.raises(EngineOverloadedError):
        engine.submit(prep.request)
    assert prep.request.reuse.kv is None
    assert alloc.num_free == free and int(alloc.refcount.sum()) == refs


def test_eval_quick_is_paired_and_reports_intervals(rag):
    """The fidelity harness's smoke run (`redknot eval --quick`): both generators, paired records, and
    `full` against itself has a zero difference with a zero-width interval."""
    from redknot_rag.evaluation.harness import QUICK_POLICIES, format_table, run_eval

    res = run_eval(rag, QUICK_POLICIES, n=2, set_name="all", max_new_tokens=4, progress=False)
    assert res["num_cases"] == 2 and res["sets"] == ["facts", "planted"]
    full = res["policies"]["full"]
    assert full["accuracy_diff"] == 0 and full["accuracy_diff_ci95"] == [0, 0] and full["first_token_kl"] < 1e-9
    assert full["agreement_32"] == 1.0 and full["recompute_fraction"] == 1.0
    naive = res["policies"]["naive"]
    assert naive["recompute_fraction"] == 0 and naive["first_token_kl"] >= 0
    assert set(res["per_set"]) == {"facts", "planted"}
    ch = res["default_choice"]  # the rule may find nothing on 2 cases; it still names the closest
    assert ch["closest"] in ("naive", "redknot:0.1") and res["default_policy"] in (None, ch["closest"])
    assert "| full |" in format_table(res)


def test_selection_is_deterministic(rag):
    """The same question over the same chunks recomputes the same tokens, policy by policy."""
    sources = rag.retrieve("Dorbrecht archive code", top_k=3, namespace="t1")
    for policy in ("epic:8", "boundary:4:16", "cacheblend:0.2", "redknot:0.2", "redknot:0.2:4:64:4"):
        seen = []
        for _ in range(2):
            prep = rag.prepare("What is the code?", reuse_policy=policy, sources=sources)
            seen.append(prep.stats["recomputed_positions"])
            rag.discard(prep.request)
        assert seen[0] == seen[1] and len(seen[0]) > 0, policy


def test_head_compressed_chunks_are_assembled_without_recompute(rag):
    """A chunk stored with local heads keeping only its tail window is served from the store (no prefill on
    the query path), and those heads never read the tokens their store dropped."""
    from redknot_rag.rag.assemble import Timing
    from redknot_rag.store.store_config import HeadCompression

    cfg = rag.engine.model_config
    classes = torch.ones(cfg.num_layers, cfg.num_kv_heads, dtype=torch.int64)
    classes[:, 0] = 0  # kv head 0 of every layer is local
    window = 8
    text = "The Hallerby tram depot keeps its oldest car, number 31, under a blue canvas roof near gate four."
    ids = rag.layout.chunk_ids(text)
    k, v = rag.assembler.prefiller.prefill([ids])[0]
    rag.store.put(chunk_key(ids), k.cpu(), v.cpu(), heads=HeadCompression.from_mask(classes, window))
    rag.flush_cache()
    timing = Timing()
    seg = rag.engine.run_store_work(lambda: rag.assembler.segment(ids, timing))
    assert timing.kv_miss_prefill_ms == 0, "a head-compressed chunk must not be re-prefilled"
    assert seg.visible is not None and seg.visible[:, 1:].all()
    assert seg.visible[:, 0, -window:].all() and not seg.visible[:, 0, :-window].any()
    q = rag.layout.question_ids("Which car does the Hallerby depot keep?")
    req = rag.engine.assemble(rag.assembler.build_stages([ids], q, "naive", SamplingParams(max_new_tokens=1)))
    kv = req.reuse.kv
    a = rag.layout.num_anchor
    assert not kv.visible[:, 0, a : a + len(ids) - window].any() and kv.visible[:, 1:, a : a + len(ids)].all()
    rag.discard(req)
