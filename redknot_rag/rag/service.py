"""The RAG service: a facade over ingestion, retrieval and request assembly. It never submits.

`prepare` retrieves and assembles a `/query` request; `build_request` does automatic reuse for a prompt
from any API. Both return unsubmitted requests: the caller (the server's runtime, the CLI, the harness)
submits them to the engine the same way as any other request, and `discard`s those it drops.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from redknot_rag.chat import DEFAULT_SYSTEM
from redknot_rag.engine import Engine
from redknot_rag.heads import HeadProfile, load_profile_for
from redknot_rag.limits import MAX_DOCUMENT_TOKENS, TooLargeError, is_blank
from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
from redknot_rag.rag.assemble import Assembler, Timing
from redknot_rag.rag.ingest import Ingestor, IngestSummary, Progress, parse_paths, parse_texts
from redknot_rag.rag.layout import ChunkMatcher, PromptLayout, chunk_key, make_fingerprint
from redknot_rag.request import Request
from redknot_rag.reuse import make_policy
from redknot_rag.sampling import SamplingParams
from redknot_rag.store import ChunkKVStore
from redknot_rag.store.store_config import StoreConfig

log = logging.getLogger("redknot.rag")

DEFAULT_POLICY = "redknot"  # used when the model's head profile records no measured default


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
class Prepared:
    """An assembled, not yet submitted `/query` request; `finalize()` after it finished gives the timing."""

    request: Request
    sources: list[Source]
    timing: dict[str, float]
    policy: str
    t_start: float
    t_ready: float
    stats: dict = field(default_factory=dict)

    def finalize(self) -> dict[str, float]:
        """Timing split in ms. Question prefill counts from the end of assembly (submission follows it)."""
        r = self.request
        out = dict(self.timing)
        if r.first_token_time is not None:
            out["question_prefill_ms"] = (r.first_token_time - self.t_ready) * 1e3
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
        engine: Engine,
        data_dir: Path | str,
        default_policy: str | None = None,
        *,
        system_prompt: str = DEFAULT_SYSTEM,
        chunk_tokens: int = 256,
        overlap_tokens: int = 32,
        store_memory_bytes: int = 256 << 20,
        redis_url: str | None = None,
        embedder=None,
        profile: HeadProfile | None = None,
        store_config: StoreConfig | None = None,
        max_document_tokens: int = MAX_DOCUMENT_TOKENS,
    ) -> None:
        from redknot_rag.retrieval.chunker import Chunker
        from redknot_rag.retrieval.docdb import DocDB
        from redknot_rag.retrieval.retriever import Retriever

        self.engine = engine
        runner = engine.runner
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if default_policy is None:  # the model's measured default (recorded with its head profile)
            prof = profile or load_profile_for(runner.name, runner.weights_fingerprint)
            default_policy = (prof.reuse_default.get("policy") if prof is not None else None) or DEFAULT_POLICY
        make_policy(default_policy)  # validate early
        self.default_policy = default_policy
        log.info("default reuse policy: %s", default_policy)
        self.system_prompt = system_prompt
        self.layout = PromptLayout.for_tokenizer(engine.tokenizer, system_prompt)
        self.db = DocDB(self.data_dir / "docs.sqlite")
        self.retriever = Retriever(self.db, self.data_dir / "index", embedder=embedder)
        self.chunker = Chunker(engine.tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
        self.fingerprint = make_fingerprint(self.layout, runner.weights_fingerprint, runner.dtype)
        cfg = store_config or StoreConfig(host_bytes=store_memory_bytes)
        if redis_url and not cfg.redis_url:
            cfg = dataclasses.replace(cfg, redis_url=redis_url)
        self.store = ChunkKVStore(self.data_dir / "kv", self.fingerprint, device="cpu", config=cfg)
        self.retriever.embedder.embed(["warm-up"])  # load the embedder now, not on the first query
        self.assembler = Assembler(engine, self.layout, self.store, profile=profile)
        self.matcher = ChunkMatcher(self.layout)
        self.ingestor = Ingestor(
            engine,
            self.layout,
            self.db,
            self.retriever,
            self.chunker,
            self.store,
            self.assembler,
            self.matcher,
            max_document_tokens=max_document_tokens,
        )
        self._lock = threading.Lock()
        for ns in self.db.list_namespaces():
            # a kill between the document DB's commit and the vector index's save left chunks without
            # vectors (retrieval keyword-only for them): the index is brought back to the DB's chunks here
            added, removed = self.retriever.sync(ns)
            if added or removed:
                log.warning("vector index recovered", extra={"namespace": ns, "added": added, "removed": removed})
            for c in self.db.get_chunks(ns, self.db.all_chunk_ids(ns)):
                self.matcher.add(self.layout.chunk_ids(c.text), ns)

    # ---- prompt contract (kept for callers that format contexts themselves) --------------------
    def chunk_token_ids(self, text: str) -> list[int]:
        return self.layout.chunk_ids(text)

    def question_ids(self, question: str) -> list[int]:
        """The question's tokens in its prompt frame, validated: the one check of every entry point (HTTP
        `/query` and `/retrieve`, CLI, harness). ValueError when it is blank (only whitespace, NUL,
        zero-width or BOM characters), `TooLargeError` (413) when the frame with it leaves no room in the
        model context for one answer token."""
        if not isinstance(question, str) or is_blank(question):
            raise ValueError("empty question (only whitespace, control or zero-width characters)")
        ids = self.layout.question_ids(question)
        if len(ids) + self.layout.num_anchor + 1 >= self.engine.max_context:
            raise TooLargeError(
                f"question has {len(ids)} tokens; with the prompt frame it does not fit the "
                f"{self.engine.max_context}-token context"
            )
        return ids

    def format_context(self, sources: Sequence[Source]) -> str:
        """Chunk texts exactly as prompts carry them (what automatic reuse recognizes)."""
        return self.layout.context_text(s.text for s in sources)

    # ---- ingestion ------------------------------------------------------------------------
    def ingest_paths(
        self,
        paths: Sequence[str | Path],
        namespace: str = "default",
        *,
        with_kv: bool = True,
        progress: Progress | None = None,
    ) -> IngestSummary:
        return self.ingestor.ingest(parse_paths(paths), namespace, with_kv, progress)

    def ingest_texts(
        self,
        docs: Sequence[dict],
        namespace: str = "default",
        *,
        with_kv: bool = True,
        progress: Progress | None = None,
    ) -> IngestSummary:
        return self.ingestor.ingest(parse_texts(docs), namespace, with_kv, progress)

    def ingest_texts_and_paths(
        self,
        docs: Sequence[dict],
        paths: Sequence[str | Path],
        namespace: str = "default",
        cancel: threading.Event | None = None,
    ) -> tuple[IngestSummary | None, IngestSummary | None]:
        """Both kinds in one call, all or nothing at parsing: every text and every file is parsed and its
        tokens counted before anything is written, so a bad file (IngestError), text (ValueError) or a
        document over the token limit (TooLargeError) leaves the store as it was. `cancel`: see
        `Ingestor.ingest`."""
        parsed_docs = parse_texts(docs) if docs else None
        parsed_paths = parse_paths(paths) if paths else None
        self.ingestor.check_tokens([*(parsed_docs or ()), *(parsed_paths or ())])
        ing = functools.partial(self.ingestor.ingest, namespace=namespace, with_kv=True, progress=None, cancel=cancel)
        out_docs = ing(parsed_docs, checked=True) if parsed_docs else None
        out_paths = ing(parsed_paths, checked=True) if parsed_paths else None
        return out_docs, out_paths

    def list_documents(self, namespace: str = "default") -> list[dict]:
        self.db.require_namespace(namespace)
        return [asdict(d) for d in self.db.list_documents(namespace)]

    def delete_document(self, namespace: str, doc_id: str) -> bool:
        return self.ingestor.delete_document(namespace, doc_id)

    def flush_cache(self) -> None:
        self.engine.run_store_work(self.assembler.flush)

    # ---- queries --------------------------------------------------------------------------
    def retrieve(self, question: str, *, top_k: int = 6, namespace: str = "default") -> list[Source]:
        """The `top_k` chunks of `namespace` nearest the question (validated: `question_ids`)."""
        self.question_ids(question)
        return self._search(question, top_k, namespace)

    def _search(self, question: str, top_k: int, namespace: str) -> list[Source]:
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

    def prepare(
        self,
        question: str,
        *,
        top_k: int = 6,
        namespace: str = "default",
        reuse_policy: str | None = None,
        params: SamplingParams | None = None,
        sources: list[Source] | None = None,
        question_ids: list[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> Prepared:
        """Retrieve and assemble a `/query` request (not submitted). The question is validated before any
        work (`question_ids`; a caller that validated it first passes the ids); a policy name is parsed
        where it enters (the HTTP schema, `ServiceSettings`) and looked up here by the assembler. The
        assembly runs on the engine thread in stages between its steps; once `cancel` is set (the client
        left) it stops and `AssemblyCancelled` is raised."""
        t0 = time.perf_counter()
        params = params or QUERY_DEFAULTS
        name = reuse_policy or self.default_policy
        q_ids = question_ids if question_ids is not None else self.question_ids(question)
        if sources is None:
            sources = self._search(question, top_k, namespace)
        timing = Timing()
        retrieve_ms = (time.perf_counter() - t0) * 1e3
        ordered = list(reversed(sources))  # most relevant chunk closest to the question
        chunk_ids = [self.layout.chunk_ids(s.text) for s in ordered]
        if name != "full":  # start reading the chunks' blocks (layer-major) while the engine thread is busy
            self.store.prefetch([chunk_key(c) for c in chunk_ids if chunk_key(c) not in self.assembler.cache])
        req = self.engine.assemble(self.assembler.build_stages(chunk_ids, q_ids, name, params, timing), cancel)
        stats = {}
        if req.reuse is not None:
            stats = {
                "reused_tokens": req.reuse.reused_tokens,
                "recomputed_tokens": req.reuse.recomputed_tokens,
                **req.reuse.stats,
            }
        return Prepared(
            req, sources, {"retrieve_ms": retrieve_ms, **timing.as_dict()}, name, t0, time.perf_counter(), stats
        )

    def build_request(
        self, prompt_ids: list[int], params: SamplingParams, *, namespaces: set[str] | None = None, **kw
    ) -> Request:
        """A request for any prompt (not submitted); stored chunks found in it are reused.

        `namespaces` limits matching to chunks those namespaces hold (None: any), so a caller bound to a
        tenant cannot learn whether a text exists in another tenant's store.
        """
        chunks, end = self.matcher.match(prompt_ids, namespaces)
        if not chunks:
            return self.engine.make_request(prompt_ids, params, **kw)
        return self.engine.assemble(
            self.assembler.build_stages(chunks, prompt_ids[end:], self.default_policy, params, **kw)
        )

    def discard(self, req: Request) -> None:
        """Release what an unsubmitted request holds (its assembled context KV)."""
        self.engine.discard(req)

    def close(self) -> None:
        self.engine.run_store_work(self.assembler.close)


def run_query(service: RagService, question: str, **kw) -> RagResult:
    """Prepare, submit and wait for one query (CLI, demo and tests; the server streams instead)."""
    engine = service.engine
    prep = service.prepare(question, **kw)
    r = engine.submit(prep.request)
    if not engine.is_looping:
        while not r.is_finished:
            engine.step()
    r.done.wait()
    if r.error:
        raise RuntimeError(r.error)
    usage = {"prompt_tokens": r.prompt_len, "completion_tokens": len(r.output_ids), "cached_tokens": r.cached_tokens}
    return RagResult(r.output_text, prep.sources, usage, prep.finalize(), r.finish_reason)
