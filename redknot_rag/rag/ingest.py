"""Ingestion: parse → chunk → embed → index → document DB → chunk KV (prefilled behind the anchor, stored
per KV head).

Shared chunk KV is reference-counted by the document DB: every chunk row records its `kv_key`; a chunk's
stored KV is deleted only when no chunk row in any namespace still names its key.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from redknot_rag.engine import Engine
from redknot_rag.limits import MAX_DOCUMENT_TOKENS, TooLargeError
from redknot_rag.rag.assemble import Assembler
from redknot_rag.rag.layout import ChunkMatcher, PromptLayout, chunk_key
from redknot_rag.store import ChunkKVStore

log = logging.getLogger("redknot.rag")
Progress = Callable[[str, int, int, int], None]  # (stage, chunks done, tokens done, tokens total)


class IngestCancelled(RuntimeError):
    """The ingest's caller left (`cancel` was set). What was written stays consistent: documents and
    chunks committed so far are searchable, chunks without KV are the backlog the next ingest finishes
    (and says so: `IngestSummary.resumed_kv_chunks`)."""


@dataclass
class IngestSummary:
    namespace: str
    documents: int = 0
    changed_documents: int = 0
    chunks: int = 0
    tokens: int = 0
    kv_chunks: int = 0
    kv_bytes: int = 0
    resumed_kv_chunks: int = 0  # of kv_chunks: chunks an earlier, interrupted ingest left without KV
    removed_chunks: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Ingestor:
    """Writes documents, their chunks and the chunks' KV; deletes them again."""

    def __init__(
        self,
        engine: Engine,
        layout: PromptLayout,
        db,
        retriever,
        chunker,
        store: ChunkKVStore,
        assembler: Assembler,
        matcher: ChunkMatcher,
        max_document_tokens: int = MAX_DOCUMENT_TOKENS,
    ) -> None:
        self.engine = engine
        self.max_document_tokens = max_document_tokens
        self.layout = layout
        self.db = db
        self.retriever = retriever
        self.chunker = chunker
        self.store = store
        self.assembler = assembler
        self.matcher = matcher

    def key_of(self, row) -> str:
        """The chunk's KV key (recorded in the DB; computed for rows written before it was recorded)."""
        return row.kv_key or chunk_key(self.layout.chunk_ids(row.text))

    def check_tokens(self, docs) -> None:
        """`TooLargeError` (413) for a document over `max_document_tokens` tokens, before anything is
        written. Tokens, not characters, bound a document's KV: 1.8 MB of zero-width characters is ~600k
        tokens (~14 GB of bf16 KV on the default model) though it passes the byte limit."""
        tok = self.engine.tokenizer
        for d in docs:
            n = len(tok(d.text, add_special_tokens=False)["input_ids"])
            if n > self.max_document_tokens:
                raise TooLargeError(
                    f"document {d.doc_id!r}: {n} tokens exceeds the limit of {self.max_document_tokens} tokens"
                )

    def ingest(
        self,
        docs,
        namespace: str,
        with_kv: bool,
        progress: Progress | None,
        cancel: threading.Event | None = None,
        *,
        checked: bool = False,
    ) -> IngestSummary:
        """Write `docs` (parsed) into `namespace`. `checked`: `check_tokens` already ran on them. Once
        `cancel` is set (the HTTP client left) the ingest stops between stages and KV batches with
        `IngestCancelled`."""
        if not checked:
            self.check_tokens(docs)
        t0 = time.perf_counter()
        summary = IngestSummary(namespace, documents=len(docs))
        self.db.create_namespace(namespace)
        old_rows = []
        for d in docs:
            row = self.db.get_document(namespace, d.doc_id)
            if row is not None and row.content_hash != d.content_hash:
                old_rows.extend(self.db.chunks_for_doc(namespace, d.doc_id))
        old_keys = {self.key_of(r) for r in old_rows}
        _check(cancel)
        report = self.retriever.ingest(namespace, docs, self.chunker)
        summary.changed_documents = report.num_changed
        summary.removed_chunks = len(report.removed_ids)
        for r in old_rows:
            self.matcher.remove(self.layout.chunk_ids(r.text), namespace)
        new_rows = self.db.get_chunks(namespace, list(report.added_ids))
        summary.chunks = len(new_rows)
        summary.tokens = sum(r.num_tokens for r in new_rows)
        for r in new_rows:
            ids = self.layout.chunk_ids(r.text)
            self.db.set_kv_key(r.id, chunk_key(ids))
            self.matcher.add(ids, namespace)
        if with_kv:
            todo = self.db.chunks_missing_kv(namespace)  # also finishes what a killed ingest left
            new_ids = {r.id for r in new_rows}
            summary.resumed_kv_chunks = sum(1 for r in todo if r.id not in new_ids)
            if summary.resumed_kv_chunks:
                log.warning(
                    "finishing chunk KV an interrupted ingest left",
                    extra={"namespace": namespace, "chunks": summary.resumed_kv_chunks},
                )
            summary.kv_chunks, summary.kv_bytes = self.precompute_kv(todo, progress, cancel=cancel)
        self.drop_unreferenced(old_keys)
        summary.seconds = time.perf_counter() - t0
        return summary

    def precompute_kv(
        self,
        rows: Sequence,
        progress: Progress | None = None,
        batch_tokens: int = 2048,
        cancel: threading.Event | None = None,
    ) -> tuple[int, int]:
        """Prefill chunks behind the anchor and store their KV; marks each chunk done when durable.
        Returns (chunks done, bytes of KV stored: as the store holds them, not as prefilled)."""
        done, nbytes, i, tokens = 0, 0, 0, 0
        total_tokens = sum(r.num_tokens for r in rows)
        if progress is not None:
            progress("kv", 0, 0, total_tokens)
        prefiller = self.assembler.prefiller
        while i < len(rows):
            _check(cancel)
            batch: list = []
            ids: list[list[int]] = []
            n = 0
            while i < len(rows) and (not batch or n + rows[i].num_tokens <= batch_tokens):
                cids = self.layout.chunk_ids(rows[i].text)
                batch.append(rows[i])
                ids.append(cids)
                n += len(cids)
                i += 1
            fresh = [c for c in ids if not self.store.contains(chunk_key(c))]
            if fresh:
                kvs = self.engine.run_store_work(functools.partial(prefiller.prefill, fresh))
                for c, (k, v) in zip(fresh, kvs):
                    nbytes += self.store.put(chunk_key(c), k.cpu(), v.cpu(), keep_in_memory=False)
            for r, c in zip(batch, ids):
                self.db.mark_kv_done(r.id, chunk_key(c))
            done += len(batch)
            tokens += sum(r.num_tokens for r in batch)
            if progress is not None:
                progress("kv", done, tokens, total_tokens)
        return done, nbytes

    def drop_unreferenced(self, keys: set[str]) -> None:
        """Delete the stored and pool-resident KV of `keys` that no chunk row (any namespace) still uses."""
        for key in keys - self.db.kv_keys_in_use(keys):
            self.store.delete(key)
            self.engine.run_store_work(functools.partial(self.assembler.drop_chunk, key))

    def delete_document(self, namespace: str, doc_id: str) -> bool:
        self.db.require_namespace(namespace)
        if self.db.get_document(namespace, doc_id) is None:
            return False
        rows = self.db.chunks_for_doc(namespace, doc_id)
        keys = {self.key_of(r) for r in rows}
        self.retriever.delete_document(namespace, doc_id)
        for r in rows:
            self.matcher.remove(self.layout.chunk_ids(r.text), namespace)
        self.drop_unreferenced(keys)
        return True


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise IngestCancelled("ingest cancelled: the client left")


def parse_paths(paths: Sequence[str | Path]):
    from redknot_rag.retrieval.parser import parse_paths as parse

    return parse([Path(p) for p in paths])


def parse_texts(docs: Sequence[dict]):
    """Documents from `{text, doc_id?, metadata?}` dicts (ValueError for an empty or missing text)."""
    from redknot_rag.retrieval.parser import Document, content_hash

    parsed = []
    for i, d in enumerate(docs):
        text = d.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"document {i}: 'text' must be a non-empty string")
        doc_id = str(d.get("doc_id") or d.get("id") or f"doc-{content_hash(text)[:16]}")
        parsed.append(Document(doc_id, text, "", dict(d.get("metadata") or {}), content_hash(text)))
    return parsed
