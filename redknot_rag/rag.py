"""The RAG service: ingestion with chunk-KV precompute, retrieval, and queries that reuse stored KV.

Prompt layout (fixed; stored KV depends on it): `[anchor][chunk_1 "\\n\\n"]...[chunk_k "\\n\\n"][question]`
where the anchor is the chat template up to the user's content, with the fixed system preamble.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from redknot_rag.chat import DEFAULT_SYSTEM, ChatFormat, encode
from redknot_rag.chunkkv import ChunkPrefiller, SegmentCache, chunk_key, make_fingerprint
from redknot_rag.request import Request
from redknot_rag.reuse import ReuseInput, make_policy
from redknot_rag.sampling import SamplingParams
from redknot_rag.store import ChunkKVStore

log = logging.getLogger("redknot.rag")

CHUNK_SEPARATOR = "\n\n"
QUESTION_TEMPLATE = "Question: {question}"
DEFAULT_POLICY = "redknot"
_MATCH_BLOCK = 16  # tokens hashed to find stored chunks inside arbitrary prompts


@dataclass(frozen=True)
class Source:
    doc_id: str
    chunk_id: str
    score: float
    text: str
    char_start: int
    char_end: int
    namespace: str = "default"


@dataclass
class IngestSummary:
    namespace: str
    documents: int = 0
    changed_documents: int = 0
    chunks: int = 0
    tokens: int = 0
    kv_chunks: int = 0
    kv_bytes: int = 0
    removed_chunks: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Prepared:
    """A query whose request is already submitted; `finalize()` after it finished gives the timing."""

    request: Request
    sources: list[Source]
    timing: dict[str, float]
    policy: str
    t_start: float
    t_submit: float
    stats: dict = field(default_factory=dict)

    def finalize(self) -> dict[str, float]:
        r = self.request
        out = dict(self.timing)
        if r.first_token_time is not None:
            out["question_prefill_ms"] = (r.first_token_time - self.t_submit) * 1e3
            out["ttft_ms"] = (r.first_token_time - self.t_start) * 1e3
            if r.finish_time is not None:
                out["decode_ms"] = (r.finish_time - r.first_token_time) * 1e3
        return {k: round(v, 3) for k, v in out.items()}


@dataclass
class RagResult:
    answer: str
    sources: list[Source]
    usage: dict[str, int]
    timing: dict[str, float]
    finish_reason: dict | None = None


class RagService:
    """Documents → chunks → KV (stored per KV head) → queries that assemble prompts from stored KV."""

    def __init__(
        self,
        engine,
        data_dir: Path | str,
        default_policy: str = DEFAULT_POLICY,
        *,
        system_prompt: str = DEFAULT_SYSTEM,
        chunk_tokens: int = 256,
        overlap_tokens: int = 32,
        store_memory_bytes: int = 256 << 20,
        redis_url: str | None = None,
        embedder=None,
    ) -> None:
        from redknot_rag.retrieval.chunker import Chunker
        from redknot_rag.retrieval.docdb import DocDB
        from redknot_rag.retrieval.retriever import Retriever

        self.engine = engine
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        make_policy(default_policy)  # validate early
        self.default_policy = default_policy
        self.system_prompt = system_prompt
        tok = engine.tokenizer
        self.format = ChatFormat.from_tokenizer(tok, system_prompt)
        self.anchor_ids = encode(tok, self.format.prefix)
        a, b = encode(tok, "a"), encode(tok, "b")
        mid = encode(tok, "a" + CHUNK_SEPARATOR + "b")
        self._sep_ids = mid[len(a) : len(mid) - len(b)]
        self.db = DocDB(self.data_dir / "docs.sqlite")
        self.retriever = Retriever(self.db, self.data_dir / "index", embedder=embedder)
        self.chunker = Chunker(tok, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
        self.fingerprint = make_fingerprint(engine, self.anchor_ids)
        cold = None
        if redis_url:
            import redis

            from redknot_rag.store.redis_tier import RedisTier

            cold = RedisTier(redis.Redis.from_url(redis_url), self.fingerprint)
        self.store = ChunkKVStore(self.data_dir / "kv", self.fingerprint, store_memory_bytes, device="cpu", cold=cold)
        self.retriever.embedder.embed(["warm-up"])  # load the embedder now, not on the first query
        self.prefiller: ChunkPrefiller = engine.call(lambda: ChunkPrefiller(engine, self.anchor_ids))
        self.cache = SegmentCache(engine.pool, engine.allocator, max_pages=engine.pool.num_pages // 2)
        self._lock = threading.Lock()
        self._blocks: dict[tuple[int, ...], list[list[int]]] = {}  # first block → chunk token ids
        self._load_block_index()

    # ---- tokens ---------------------------------------------------------------------------
    def chunk_token_ids(self, text: str) -> list[int]:
        """A chunk's tokens exactly as they appear inside a prompt: its stripped text, then the separator
        tokenized mid-text (BPE merges a trailing "\n\n" differently at the end of a string)."""
        return encode(self.engine.tokenizer, text.strip()) + self._sep_ids

    def question_ids(self, question: str) -> list[int]:
        return encode(self.engine.tokenizer, QUESTION_TEMPLATE.format(question=question) + self.format.suffix)

    def format_context(self, sources: Sequence[Source]) -> str:
        """Chunk texts exactly as prompts carry them (what automatic reuse recognizes)."""
        return "".join(s.text.strip() + CHUNK_SEPARATOR for s in sources)

    def _index_chunk(self, ids: list[int]) -> None:
        if len(ids) >= _MATCH_BLOCK:
            lst = self._blocks.setdefault(tuple(ids[:_MATCH_BLOCK]), [])
            if ids not in lst:
                lst.append(ids)

    def _load_block_index(self) -> None:
        for ns in self.db.list_namespaces():
            for cid in self.db.all_chunk_ids(ns):
                for c in self.db.get_chunks(ns, [cid]):
                    self._index_chunk(self.chunk_token_ids(c.text))

    # ---- ingestion ------------------------------------------------------------------------
    def ingest_paths(
        self,
        paths: Sequence[str | Path],
        namespace: str = "default",
        *,
        with_kv: bool = True,
        progress: Callable[[str, int, int, int], None] | None = None,
    ) -> IngestSummary:
        from redknot_rag.retrieval.parser import parse_paths

        docs = parse_paths([Path(p) for p in paths])
        return self._ingest(docs, namespace, with_kv, progress)

    def ingest_texts(self, docs: Sequence[dict], namespace: str = "default", *, with_kv: bool = True) -> IngestSummary:
        from redknot_rag.retrieval.parser import Document, content_hash

        parsed = []
        for i, d in enumerate(docs):
            text = d.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"document {i}: 'text' must be a non-empty string")
            doc_id = str(d.get("doc_id") or d.get("id") or f"doc-{content_hash(text)[:16]}")
            parsed.append(Document(doc_id, text, "", dict(d.get("metadata") or {}), content_hash(text)))
        return self._ingest(parsed, namespace, with_kv, None)

    def _ingest(self, docs, namespace: str, with_kv: bool, progress) -> IngestSummary:
        t0 = time.perf_counter()
        summary = IngestSummary(namespace, documents=len(docs))
        self.db.create_namespace(namespace)
        old_keys: set[str] = set()
        for d in docs:
            row = self.db.get_document(namespace, d.doc_id)
            if row is not None and row.content_hash != d.content_hash:
                old_keys |= {
                    chunk_key(self.chunk_token_ids(c.text)) for c in self.db.chunks_for_doc(namespace, d.doc_id)
                }
        report = self.retriever.ingest(namespace, docs, self.chunker)
        summary.changed_documents = report.num_changed
        summary.removed_chunks = len(report.removed_ids)
        new_rows = self.db.get_chunks(namespace, list(report.added_ids))
        summary.chunks = len(new_rows)
        summary.tokens = sum(r.num_tokens for r in new_rows)
        for r in new_rows:
            self._index_chunk(self.chunk_token_ids(r.text))
        if with_kv:
            todo = self.db.chunks_missing_kv(namespace)  # also finishes what a killed ingest left
            n, nbytes = self.precompute_kv(todo, progress)
            summary.kv_chunks, summary.kv_bytes = n, nbytes
        live = {
            chunk_key(self.chunk_token_ids(c.text)) for d in docs for c in self.db.chunks_for_doc(namespace, d.doc_id)
        }
        for key in old_keys - live:
            self.store.delete(key)
            self.engine.call(lambda k=key: self.cache.drop(k))
        summary.seconds = time.perf_counter() - t0
        return summary

    def precompute_kv(self, rows, progress=None, batch_tokens: int = 2048) -> tuple[int, int]:
        """Prefill chunks behind the anchor and store their KV; marks each chunk done when durable."""
        done, nbytes, i = 0, 0, 0
        total_tokens = sum(r.num_tokens for r in rows)
        tokens = 0
        while i < len(rows):
            batch: list = []
            ids: list[list[int]] = []
            n = 0
            while i < len(rows) and (not batch or n + rows[i].num_tokens <= batch_tokens):
                cids = self.chunk_token_ids(rows[i].text)
                batch.append(rows[i])
                ids.append(cids)
                n += len(cids)
                i += 1
            fresh = [(r, c) for r, c in zip(batch, ids) if not self.store.contains(chunk_key(c))]
            if fresh:
                kvs = self.engine.call(lambda f=fresh: self.prefiller.prefill([c for _, c in f]))
                for (_, c), (k, v) in zip(fresh, kvs):
                    self.store.put(chunk_key(c), k.cpu(), v.cpu(), keep_in_memory=False)
                    nbytes += k.numel() * k.element_size() * 2
            for r in batch:
                self.db.mark_kv_done(r.id)
            done += len(batch)
            tokens += sum(r.num_tokens for r in batch)
            if progress is not None:
                progress("kv", done, tokens, total_tokens)
        return done, nbytes

    def list_documents(self, namespace: str = "default") -> list[dict]:
        self.db.require_namespace(namespace)
        return [asdict(d) for d in self.db.list_documents(namespace)]

    def delete_document(self, namespace: str, doc_id: str) -> bool:
        self.db.require_namespace(namespace)
        rows = self.db.chunks_for_doc(namespace, doc_id)
        if self.db.get_document(namespace, doc_id) is None:
            return False
        keys = {chunk_key(self.chunk_token_ids(r.text)) for r in rows}
        self.retriever.delete_document(namespace, doc_id)
        for key in keys:
            self.store.delete(key)
            self.engine.call(lambda k=key: self.cache.drop(k))
        return True

    def flush_cache(self) -> None:
        self.engine.call(self.cache.clear)

    # ---- queries --------------------------------------------------------------------------
    def retrieve(self, question: str, *, top_k: int = 6, namespace: str = "default") -> list[Source]:
        if not question or not question.strip():
            raise ValueError("empty question")
        if not 1 <= top_k <= 64:
            raise ValueError(f"top_k must be in [1, 64], got {top_k}")
        self.db.require_namespace(namespace)
        hits = self.retriever.search(namespace, question, top_k=top_k)
        return [
            Source(
                h.chunk.doc_id,
                h.chunk.chunk_id,
                float(h.score),
                h.chunk.text,
                h.chunk.char_start,
                h.chunk.char_end,
                namespace,
            )
            for h in hits
        ]

    def _segment(self, ids: list[int], timing: dict[str, float]):
        """Pool-resident segment of a chunk: hot cache → store → (miss) prefill now and store. Engine thread."""
        key = chunk_key(ids)

        def load():
            got = self.store.get(key)
            if got is not None:
                return got.k, got.v
            t = time.perf_counter()
            k, v = self.prefiller.prefill([ids])[0]
            self.store.put(key, k.cpu(), v.cpu())
            timing["kv_miss_prefill_ms"] += (time.perf_counter() - t) * 1e3
            return k, v

        return self.cache.get(key, load)

    def _assemble_request(
        self,
        chunk_ids: list[list[int]],
        tail_ids: list[int],
        policy_name: str,
        params: SamplingParams,
        timing: dict[str, float],
        **kw,
    ) -> tuple[Request, dict]:
        """Engine thread: load segments, run the policy, build (not submit) the request."""
        e = self.engine
        prompt = list(self.anchor_ids)
        for c in chunk_ids:
            prompt.extend(c)
        prompt.extend(tail_ids)
        policy = make_policy(policy_name, e)
        if policy.name == "full":
            return e.make_request(prompt, params, **kw), {}
        t = time.perf_counter()
        segs = [self._segment(c, timing) for c in chunk_ids]
        timing["kv_load_ms"] = (time.perf_counter() - t) * 1e3 - timing.get("kv_miss_prefill_ms", 0.0)
        inp = ReuseInput(self.anchor_ids, self.prefiller.anchor.segment, chunk_ids, segs, tail_ids)
        t = time.perf_counter()
        asm = policy.assemble(e, inp)
        timing["recompute_ms"] = (time.perf_counter() - t) * 1e3
        try:
            req = e.make_request(
                prompt, params, prebuilt_kv=asm.kv, prebuilt_len=asm.context_len, reused_tokens=asm.reused_tokens, **kw
            )
        except BaseException:
            if asm.kv is not None:
                asm.kv.release(e.allocator)
            raise
        return req, {"reused_tokens": asm.reused_tokens, "recomputed_tokens": asm.recomputed_tokens, **asm.stats}

    def prepare(
        self,
        question: str,
        *,
        top_k: int = 6,
        namespace: str = "default",
        reuse_policy: str | None = None,
        params: SamplingParams | None = None,
        sources: list[Source] | None = None,
    ) -> Prepared:
        t0 = time.perf_counter()
        params = params or SamplingParams(max_new_tokens=64)
        timing = {"retrieve_ms": 0.0, "kv_load_ms": 0.0, "kv_miss_prefill_ms": 0.0, "recompute_ms": 0.0}
        if sources is None:
            sources = self.retrieve(question, top_k=top_k, namespace=namespace)
        timing["retrieve_ms"] = (time.perf_counter() - t0) * 1e3
        ordered = list(reversed(sources))  # most relevant chunk closest to the question
        chunk_ids = [self.chunk_token_ids(s.text) for s in ordered]
        name = reuse_policy or self.default_policy
        req, stats = self.engine.call(
            lambda: self._assemble_request(chunk_ids, self.question_ids(question), name, params, timing)
        )
        t_submit = time.perf_counter()
        self.engine.submit(req)
        return Prepared(req, sources, timing, name, t0, t_submit, stats)

    def query(self, question: str, **kw) -> RagResult:
        prep = self.prepare(question, **kw)
        r = prep.request
        if self.engine._thread is None:
            while not r.is_finished:
                self.engine.step()
        r.done.wait()
        if r.error:
            raise RuntimeError(r.error)
        usage = {
            "prompt_tokens": r.prompt_len,
            "completion_tokens": len(r.output_ids),
            "cached_tokens": r.cached_tokens,
        }
        return RagResult(r.output_text, prep.sources, usage, prep.finalize(), r.finish_reason)

    # ---- automatic reuse for any prompt ---------------------------------------------------
    def match_chunks(self, prompt_ids: list[int]) -> tuple[list[list[int]], int]:
        """Stored chunks that follow the anchor at the start of `prompt_ids`: (chunk ids, end index)."""
        a = len(self.anchor_ids)
        if prompt_ids[:a] != self.anchor_ids:
            return [], 0
        found, p = [], a
        while True:
            cands = self._blocks.get(tuple(prompt_ids[p : p + _MATCH_BLOCK]), [])
            hit = next((c for c in sorted(cands, key=len, reverse=True) if prompt_ids[p : p + len(c)] == c), None)
            if hit is None or p + len(hit) >= len(prompt_ids):
                break
            found.append(hit)
            p += len(hit)
        return found, p

    def build_request(self, prompt_ids: list[int], params: SamplingParams, **kw) -> Request:
        """A request for any prompt; stored chunks found in it are reused (not submitted)."""
        chunks, end = self.match_chunks(prompt_ids)
        if not chunks:
            return self.engine.make_request(prompt_ids, params, **kw)
        timing = {"kv_load_ms": 0.0, "kv_miss_prefill_ms": 0.0, "recompute_ms": 0.0}
        req, _ = self.engine.call(
            lambda: self._assemble_request(chunks, prompt_ids[end:], self.default_policy, params, timing, **kw)
        )
        return req

    def discard(self, req: Request) -> None:
        if req.prebuilt_kv is not None:
            kv = req.prebuilt_kv
            req.prebuilt_kv = None
            self.engine.call(lambda: kv.release(self.engine.allocator))
