"""Retrieval quality on planted-fact cases: is the chunk that holds the fact in the top-k?"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from redknot_rag.evaluation.planted_facts import PlantedCase, corpus_documents
from redknot_rag.retrieval.chunker import Chunker, Tokenizer
from redknot_rag.retrieval.docdb import DocDB
from redknot_rag.retrieval.embedder import Embedder
from redknot_rag.retrieval.retriever import Retriever, rrf_fuse


@dataclass(frozen=True)
class RecallReport:
    """recall_at[k]: share of questions whose fact-holding chunk ranks within the top k."""

    num_cases: int
    num_docs: int
    num_chunks: int
    recall_at: dict[int, float]
    misses: list[str] = field(default_factory=list)  # case_ids missed at the largest k
    ingest_s: float = 0.0
    search_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall_at"] = {str(k): v for k, v in self.recall_at.items()}
        return d


def measure_recall(
    retriever: Retriever, namespace: str, cases: Sequence[PlantedCase], ks: Sequence[int] = (1, 5)
) -> RecallReport:
    """Search every case's question in `namespace` (already holding the cases' docs)."""
    max_k = max(ks)
    t0 = time.perf_counter()
    results = retriever.search_batch(namespace, [c.question for c in cases], top_k=max_k)
    search_s = time.perf_counter() - t0
    ranks = []
    for case, hits in zip(cases, results, strict=True):
        rank = next(
            (r for r, h in enumerate(hits) if h.chunk.doc_id == case.answer_doc_id and case.answer in h.chunk.text),
            None,
        )
        ranks.append(rank)
    recall = {k: sum(1 for r in ranks if r is not None and r < k) / len(cases) for k in ks}
    misses = [c.case_id for c, r in zip(cases, ranks, strict=True) if r is None]
    return RecallReport(
        num_cases=len(cases),
        num_docs=0,
        num_chunks=retriever.num_vectors(namespace),
        recall_at=recall,
        misses=misses,
        search_s=search_s,
    )


@dataclass(frozen=True)
class FusionPoint:
    """Recall of hybrid search at one fusion setting, next to the single modes'."""

    rrf_k: float
    dense_weight: float
    recall_at: dict[int, float]
    is_at_least_single: bool  # recall@k >= max(dense, lexical) at every k

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall_at"] = {str(k): v for k, v in self.recall_at.items()}
        return d


def sweep_fusion(
    retriever: Retriever,
    namespace: str,
    cases: Sequence[PlantedCase],
    grid: Sequence[tuple[float, float]],
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[dict[str, dict[int, float]], list[FusionPoint]]:
    """Recall@k of every (rrf_k, dense_weight) in `grid` from one candidate search per question.

    Returns ({"dense": recall_at, "lexical": recall_at}, points). The single modes are ranked
    from the same candidate pools, so every row compares like with like."""
    mode = retriever.mode
    retriever.mode = "hybrid"
    try:
        pools = retriever.candidates(namespace, [c.question for c in cases])
    finally:
        retriever.mode = mode
    all_ids = sorted({i for d, lx in pools for i, _ in [*d, *lx]})
    rows = {r.id: r for r in retriever.db.get_chunks(namespace, all_ids)}
    gold = [
        {i for i, _ in [*d, *lx] if i in rows and rows[i].doc_id == c.answer_doc_id and c.answer in rows[i].text}
        for c, (d, lx) in zip(cases, pools, strict=True)
    ]

    def recall(orders: list[list[int]]) -> dict[int, float]:
        ranks = [next((r for r, i in enumerate(o) if i in g), None) for o, g in zip(orders, gold, strict=True)]
        return {k: sum(1 for r in ranks if r is not None and r < k) / len(cases) for k in ks}

    def order(scores: dict[int, float]) -> list[int]:
        return [i for i in sorted(scores, key=lambda i: (-scores[i], i)) if i in rows]

    single = {
        "dense": recall([order(dict(d)) for d, _ in pools]),
        "lexical": recall([order(dict(lx)) for _, lx in pools]),
    }
    points = []
    for rrf_k, weight in grid:
        r = recall([order(rrf_fuse(d, lx, weight, rrf_k)) for d, lx in pools])
        is_ok = all(r[k] >= max(single["dense"][k], single["lexical"][k]) for k in ks)
        points.append(FusionPoint(rrf_k, weight, r, is_ok))
    return single, points


def choose_fusion(points: Sequence[FusionPoint]) -> FusionPoint:
    """Among settings at least as good as both single modes at every k, the best mean recall;
    ties go to the largest dense weight (fusion that still listens to dense), then larger rrf_k."""
    ok = [p for p in points if p.is_at_least_single] or list(points)
    return max(ok, key=lambda p: (round(sum(p.recall_at.values()), 9), p.dense_weight, p.rrf_k))


@contextmanager
def _ingested(
    cases: Sequence[PlantedCase],
    tokenizer: Tokenizer,
    embedder: Embedder,
    chunk_tokens: int,
    overlap_tokens: int,
    work_dir: str | Path | None,
) -> Iterator[tuple[Retriever, int, float]]:
    """A retriever over a fresh DB holding all cases' docs in namespace "planted":
    yields (retriever, num_docs, ingest seconds)."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        db = DocDB(Path(tmp) / "docs.sqlite")
        retriever = Retriever(db, Path(tmp) / "index", embedder)
        docs = corpus_documents(cases)
        t0 = time.perf_counter()
        retriever.ingest("planted", docs, Chunker(tokenizer, chunk_tokens, overlap_tokens))
        try:
            yield retriever, len(docs), time.perf_counter() - t0
        finally:
            db.close()


def evaluate_planted(
    cases: Sequence[PlantedCase],
    tokenizer: Tokenizer,
    embedder: Embedder,
    chunk_tokens: int = 256,
    overlap_tokens: int = 32,
    ks: Sequence[int] = (1, 5),
    work_dir: str | Path | None = None,
    modes: Sequence[str] = ("hybrid",),
) -> dict[str, RecallReport]:
    """Ingest all cases' docs once into a fresh DB and measure recall@k per search mode."""
    reports = {}
    with _ingested(cases, tokenizer, embedder, chunk_tokens, overlap_tokens, work_dir) as (retriever, n, ingest_s):
        for mode in modes:
            retriever.mode = mode
            report = measure_recall(retriever, "planted", cases, ks)
            reports[mode] = replace(report, num_docs=n, ingest_s=ingest_s)
    return reports


def evaluate_with_sweep(
    cases: Sequence[PlantedCase],
    tokenizer: Tokenizer,
    embedder: Embedder,
    grid: Sequence[tuple[float, float]],
    chunk_tokens: int = 256,
    overlap_tokens: int = 32,
    ks: Sequence[int] = (1, 5, 10),
    work_dir: str | Path | None = None,
) -> tuple[dict[str, RecallReport], list[FusionPoint]]:
    """One ingestion: per-mode reports (the retriever's own search) and the fusion grid."""
    reports = {}
    with _ingested(cases, tokenizer, embedder, chunk_tokens, overlap_tokens, work_dir) as (retriever, n, ingest_s):
        for mode in ("hybrid", "dense", "lexical"):
            retriever.mode = mode
            reports[mode] = replace(measure_recall(retriever, "planted", cases, ks), num_docs=n, ingest_s=ingest_s)
        _, points = sweep_fusion(retriever, "planted", cases, grid, ks)
    return reports, points


def sweep_planted(
    cases: Sequence[PlantedCase],
    tokenizer: Tokenizer,
    embedder: Embedder,
    grid: Sequence[tuple[float, float]],
    chunk_tokens: int = 256,
    overlap_tokens: int = 32,
    ks: Sequence[int] = (1, 5, 10),
    work_dir: str | Path | None = None,
) -> tuple[dict[str, dict[int, float]], list[FusionPoint]]:
    """`sweep_fusion` over a fresh DB holding the cases' docs."""
    with _ingested(cases, tokenizer, embedder, chunk_tokens, overlap_tokens, work_dir) as (retriever, _, _):
        return sweep_fusion(retriever, "planted", cases, grid, ks)
