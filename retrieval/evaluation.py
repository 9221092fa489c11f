"""Retrieval quality on planted-fact cases: is the chunk that holds the fact in the top-k?"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from redknot_rag.retrieval.chunker import Chunker, Tokenizer
from redknot_rag.retrieval.docdb import DocDB
from redknot_rag.retrieval.embedder import Embedder
from redknot_rag.retrieval.planted_facts import PlantedCase, corpus_documents
from redknot_rag.retrieval.retriever import Retriever


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
            (
                r
                for r, h in enumerate(hits)
                if h.chunk.doc_id == case.answer_doc_id and case.answer in h.chunk.text
            ),
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
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        db = DocDB(Path(tmp) / "docs.sqlite")
        retriever = Retriever(db, Path(tmp) / "index", embedder)
        docs = corpus_documents(cases)
        t0 = time.perf_counter()
        retriever.ingest("planted", docs, Chunker(tokenizer, chunk_tokens, overlap_tokens))
        ingest_s = time.perf_counter() - t0
        for mode in modes:
            retriever.mode = mode
            report = measure_recall(retriever, "planted", cases, ks)
            reports[mode] = replace(report, num_docs=len(docs), ingest_s=ingest_s)
        db.close()
    return reports
