"""Retriever: the document DB + one vector index per namespace + the embedder.

Index files live at `<index_dir>/<namespace>.faiss`. Every mutation takes an exclusive
`flock` on `<namespace>.lock`, reloads the index if another process saved it meanwhile,
applies the change and saves atomically, so concurrent ingesting processes never lose each
other's vectors. The DB is the source of truth: `sync` makes the index hold exactly the DB's
chunks (embedding any that are missing), which also repairs a crash between the DB commit
and the index save.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redknot_rag.retrieval.chunker import Chunker
from redknot_rag.retrieval.docdb import ChunkRow, DocDB
from redknot_rag.retrieval.embedder import Embedder, get_embedder
from redknot_rag.retrieval.index import DEFAULT_HNSW_THRESHOLD, VectorIndex
from redknot_rag.retrieval.parser import Document

_EMBED_BATCH = 256
_OVERFETCH = 8  # extra rows read from the DB in case some index ids are stale
SEARCH_MODES = ("hybrid", "dense", "lexical")
# Each mode ranks this many candidates whatever top_k is, so a chunk's hybrid rank never depends
# on top_k (the server caps top_k at 64).
NUM_CANDIDATES = 100
# Weighted reciprocal rank fusion, chosen by measurement (bench/retrieval, `fusion_sweep`: the
# setting that gives dense search the most say while matching or beating the better single mode
# at recall@1/5/10 on the tuning seed; reported on another seed). Sentence embeddings blur rare
# names, so on planted facts a same-template fact about another place ranks high densely; dense
# search mostly re-orders lexical's runners-up and decides alone where no query word matches.
RRF_K = 1.0
DENSE_WEIGHT = 0.2


@dataclass(frozen=True)
class RetrievedChunk:
    """A hit. `score` ranks hits: the fused reciprocal-rank score in hybrid mode, else the
    cosine (dense) or BM25 (lexical) score."""

    chunk: ChunkRow
    score: float
    cosine: float | None = None  # dense similarity, if the chunk was a dense candidate
    lexical: float | None = None  # BM25 score, if the chunk was a lexical candidate


@dataclass(frozen=True)
class IngestReport:
    """Outcome of `Retriever.ingest`: ids to prefill (added) and whose KV to drop (removed)."""

    num_docs: int
    num_changed: int
    added_ids: tuple[int, ...]
    removed_ids: tuple[int, ...]

    @property
    def num_unchanged(self) -> int:
        return self.num_docs - self.num_changed


class Retriever:
    """Args:
    db: the document DB (source of truth for chunks).
    index_dir: folder of the per-namespace vector index files.
    embedder: default: the process-wide `get_embedder()`.
    mode: "hybrid" fuses the dense (cosine) and lexical (BM25, SQLite FTS5) rankings by
        weighted reciprocal rank fusion (`rrf_fuse`); rare names and codes, which sentence
        embedders blur, still match exactly. "dense" or "lexical" use one ranking alone.
    dense_weight: weight of the dense ranking in hybrid mode (lexical gets 1 - dense_weight).
    rrf_k: the fusion's rank offset (small: top ranks dominate).
    num_candidates: candidates each mode ranks, independent of top_k; top_k may not exceed it.
    """

    def __init__(
        self,
        db: DocDB,
        index_dir: str | Path,
        embedder: Embedder | None = None,
        hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
        mode: str = "hybrid",
        dense_weight: float = DENSE_WEIGHT,
        rrf_k: float = RRF_K,
        num_candidates: int = NUM_CANDIDATES,
    ) -> None:
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if not 0.0 <= dense_weight <= 1.0 or rrf_k < 0 or num_candidates < 1:
            raise ValueError("need 0 <= dense_weight <= 1, rrf_k >= 0 and num_candidates >= 1")
        self.mode = mode
        self.dense_weight = dense_weight
        self.rrf_k = rrf_k
        self.num_candidates = num_candidates
        self.db = db
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder if embedder is not None else get_embedder()
        self.hnsw_threshold = hnsw_threshold
        self._cache: dict[str, tuple[tuple[int, int, int] | None, VectorIndex]] = {}

    def index_path(self, namespace: str) -> Path:
        return self.index_dir / f"{namespace}.faiss"

    # -- writes ------------------------------------------------------------------------

    def ingest(self, namespace: str, docs: Sequence[Document], chunker: Chunker) -> IngestReport:
        """Chunk, store and index documents; unchanged documents cost one hash compare."""
        self.db.create_namespace(namespace)
        added: list[int] = []
        removed: list[int] = []
        num_changed = 0
        for doc in docs:
            existing = self.db.get_document(namespace, doc.doc_id)
            if existing is not None and existing.content_hash == doc.content_hash:
                continue  # skip chunking; upsert would be a no-op too
            result = self.db.upsert_document(namespace, doc, chunker.chunk(doc))
            if result.is_changed:
                num_changed += 1
                added.extend(result.added_ids)
                removed.extend(result.removed_ids)
        self.sync(namespace)
        return IngestReport(len(docs), num_changed, tuple(added), tuple(removed))

    def add_chunks(self, namespace: str, chunks: Sequence[ChunkRow]) -> int:
        """Embed and index stored chunks (re-adding an id replaces its vector). Returns count."""
        self.db.require_namespace(namespace)
        for c in chunks:
            if c.namespace != namespace:
                raise ValueError(f"chunk {c.id} is in namespace {c.namespace!r}, not {namespace!r}")
        if not chunks:
            return 0
        ids = np.array([c.id for c in chunks], dtype=np.int64)  # [n]
        vecs = self._embed([c.text for c in chunks])  # [n, 384]
        with self._locked(namespace) as index:
            index.add(ids, vecs)
        return len(chunks)

    def remove(self, namespace: str, ids: Sequence[int] | np.ndarray) -> int:
        """Drop vectors by chunk row id. Returns the number removed."""
        self.db.require_namespace(namespace)
        if len(ids) == 0:
            return 0
        with self._locked(namespace) as index:
            return index.remove(np.asarray(ids, dtype=np.int64))

    def sync(self, namespace: str) -> tuple[int, int]:
        """Make the index hold exactly the DB's chunks. Returns (num_added, num_removed)."""
        db_ids = np.array(self.db.all_chunk_ids(namespace), dtype=np.int64)  # [n_db]
        index_ids = self._load(namespace).ids()  # [n_index]
        if len(index_ids) == len(db_ids) and np.isin(db_ids, index_ids).all() and self._stamp(namespace):
            return 0, 0
        with self._locked(namespace) as index:
            index_ids = index.ids()  # [n_index]
            stale = index_ids[~np.isin(index_ids, db_ids)]
            missing = db_ids[~np.isin(db_ids, index_ids)]
            num_removed = index.remove(stale) if len(stale) else 0
            for i in range(0, len(missing), _EMBED_BATCH * 16):
                rows = self.db.get_chunks(namespace, missing[i : i + _EMBED_BATCH * 16].tolist())
                if rows:
                    vecs = self._embed([r.text for r in rows])  # [n, 384]
                    index.add(np.array([r.id for r in rows], dtype=np.int64), vecs)
        return len(missing), num_removed

    def delete_document(self, namespace: str, doc_id: str) -> list[int]:
        """Delete a document from the DB and its vectors from the index. Returns chunk ids."""
        ids = self.db.delete_document(namespace, doc_id)
        self.remove(namespace, ids)
        return ids

    # -- reads -------------------------------------------------------------------------

    def search(self, namespace: str, query: str, top_k: int = 5) -> list[RetrievedChunk]:
        """The top_k chunks of `namespace` most similar to `query`, best first."""
        return self.search_batch(namespace, [query], top_k)[0]

    def search_batch(self, namespace: str, queries: Sequence[str], top_k: int = 5) -> list[list[RetrievedChunk]]:
        """Per query, the top_k hits best first. top_k may not exceed `num_candidates`."""
        if top_k > self.num_candidates:
            raise ValueError(f"top_k={top_k} exceeds the candidate pool of {self.num_candidates}")
        self.db.require_namespace(namespace)
        if not queries or top_k <= 0:
            return [[] for _ in queries]
        return [
            self._rank(namespace, dense_hits, lexical_hits, top_k)
            for dense_hits, lexical_hits in self.candidates(namespace, queries)
        ]

    def candidates(
        self, namespace: str, queries: Sequence[str]
    ) -> list[tuple[list[tuple[int, float]], list[tuple[int, float]]]]:
        """Per query, (dense hits, lexical hits): up to `num_candidates` (chunk id, score) each,
        best first; a mode this retriever does not use gives []. Ids may be stale."""
        self.db.require_namespace(namespace)
        dense: list[list[tuple[int, float]]] = [[] for _ in queries]
        if self.mode != "lexical" and queries:
            vecs = self._embed(list(queries))  # [q, 384]
            dense = self._load(namespace).search_batch(vecs, self.num_candidates)
        lexical = [
            self.db.search_text(namespace, q, self.num_candidates) if self.mode != "dense" else [] for q in queries
        ]
        return list(zip(dense, lexical, strict=True))

    def _rank(
        self,
        namespace: str,
        dense_hits: list[tuple[int, float]],
        lexical_hits: list[tuple[int, float]],
        top_k: int,
    ) -> list[RetrievedChunk]:
        fused: dict[int, float]
        if self.mode == "dense":
            fused = dict(dense_hits)
        elif self.mode == "lexical":
            fused = dict(lexical_hits)
        else:
            fused = rrf_fuse(dense_hits, lexical_hits, self.dense_weight, self.rrf_k)
        order = sorted(fused, key=lambda i: (-fused[i], i))
        rows = {r.id: r for r in self.db.get_chunks(namespace, order[: top_k + _OVERFETCH])}
        cosine, lexical = dict(dense_hits), dict(lexical_hits)
        found = [RetrievedChunk(rows[i], fused[i], cosine.get(i), lexical.get(i)) for i in order if i in rows]
        return found[:top_k]

    def num_vectors(self, namespace: str) -> int:
        return self._load(namespace).num_vectors

    # -- internals ---------------------------------------------------------------------

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)  # [n, 384] float32, unit rows

    def _stamp(self, namespace: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.index_path(namespace))
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, namespace: str) -> VectorIndex:
        stamp = self._stamp(namespace)
        cached = self._cache.get(namespace)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if stamp is None:
            index = VectorIndex(dim=self.embedder.dim, hnsw_threshold=self.hnsw_threshold)
        else:
            index = VectorIndex.load(self.index_path(namespace), hnsw_threshold=self.hnsw_threshold)
        self._cache[namespace] = (stamp, index)
        return index

    @contextmanager
    def _locked(self, namespace: str) -> Iterator[VectorIndex]:
        """Exclusive, cross-process read-modify-write of one namespace's index."""
        lock_path = self.index_dir / f"{namespace}.lock"
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                index = self._load(namespace)
                try:
                    yield index
                except BaseException:
                    self._cache.pop(namespace, None)  # may be half-mutated; disk is intact
                    raise
                index.save(self.index_path(namespace))
                self._cache[namespace] = (self._stamp(namespace), index)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def rrf_fuse(
    dense_hits: Sequence[tuple[int, float]],
    lexical_hits: Sequence[tuple[int, float]],
    dense_weight: float = DENSE_WEIGHT,
    rrf_k: float = RRF_K,
) -> dict[int, float]:
    """Weighted reciprocal rank fusion of two best-first (id, score) lists:
    `w / (rrf_k + rank_dense) + (1 - w) / (rrf_k + rank_lexical)`, ranks from 1, a list that
    misses an id adds 0. Uses ranks only, so BM25's unbounded scale needs no normalization."""
    fused: dict[int, float] = {}
    for weight, hits in ((dense_weight, dense_hits), (1.0 - dense_weight, lexical_hits)):
        for rank, (i, _) in enumerate(hits, start=1):
            fused[i] = fused.get(i, 0.0) + weight / (rrf_k + rank)
    return fused
