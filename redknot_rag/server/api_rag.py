"""The RAG routes: `/query` (answer + sources + timing, optionally streamed), `/retrieve` (chunks
and the exact context text that automatic reuse recognizes), `/ingest`, `/documents`.

Every route names a namespace; namespaces are isolated (an unknown one answers 404, and so does one
the caller's key is not bound to). /ingest and the /documents routes need the admin key. Questions
are checked once, by the service (`RagService.question_ids`: blank 400, over the context 413), before
any retrieval or KV work; the route checks only the server's character limit (413) first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HttpRequest

from redknot_rag.engine import AssemblyCancelled
from redknot_rag.limits import InputLimits, TooLargeError
from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
from redknot_rag.rag.ingest import IngestCancelled, IngestSummary
from redknot_rag.rag.service import Prepared, RagService, Source
from redknot_rag.retrieval.docdb import NAMESPACE_PATTERN
from redknot_rag.retrieval.parser import parse_binary
from redknot_rag.server.api_sglang import SSE_DONE, SSE_HEADERS, sse
from redknot_rag.server.auth import principal_of, require_admin
from redknot_rag.server.errors import ApiError
from redknot_rag.server.request_body import read_model
from redknot_rag.server.runtime import Job, Runtime, sampling_from_fields
from redknot_rag.server.schemas import IngestRequest, QueryRequest, RetrieveRequest
from redknot_rag.server.spec import request_body

NamespaceParam = Annotated[str, Query(pattern=NAMESPACE_PATTERN)]
log = logging.getLogger("redknot.server")
_DISCONNECT_POLL_S = 0.5


def _source(src: Source) -> dict[str, Any]:
    return {
        "doc_id": src.doc_id,
        "chunk_id": src.chunk_id,
        "score": src.score,
        "text": src.text,
        "char_start": src.char_start,
        "char_end": src.char_end,
    }


def _decode_file(doc_id: str, content_base64: str, limits: InputLimits) -> bytes:
    """An uploaded file's bytes: bad base64 is 400, a file over the document limit 413."""
    try:
        data = base64.b64decode(content_base64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"document {doc_id!r}: content_base64 is not valid base64 ({e})") from None
    if len(data) > limits.max_document_bytes:
        raise TooLargeError(
            f"document {doc_id!r}: {len(data)} bytes exceeds the limit of {limits.max_document_bytes} bytes"
        )
    return data


def confine_paths(raw: list[str], root: Path | None) -> list[Path]:
    """`paths` of an /ingest, resolved (symlinks too; relative ones against `root`): 403 without an ingest
    root or for anything that resolves outside it, also a file or folder a directory's symlink leads to;
    400 for a path that does not exist. The parser then reads these resolved paths only."""
    if not raw:
        return []
    if root is None:
        raise ApiError(403, "paths ingest is off on this server: start it with --ingest-root DIR, or send documents")
    base = root.resolve()
    out: list[Path] = []
    missing: list[str] = []
    for text in raw:
        p = (base / text).resolve()
        if not p.is_relative_to(base):
            raise ApiError(403, f"path {text!r} is outside the ingest root")
        if not p.exists():
            missing.append(text)
            continue
        walked = [*p.rglob("*")] if p.is_dir() else []
        link = next((w for w in walked if not w.resolve().is_relative_to(base)), None)
        if link is not None:
            raise ApiError(403, f"{str(link)!r} (under {text!r}) leads outside the ingest root")
        out.append(p)
    if missing:
        raise ApiError(400, f"paths not found on the server: {', '.join(missing[:5])}")
    return out


def _rag(rt: Runtime) -> RagService:
    if rt.rag is None:
        raise ApiError(503, "RAG is not enabled on this server")
    return rt.rag


def check_question_chars(rt: Runtime, question: str) -> None:
    """413 over the server's character limit (before the service tokenizes it)."""
    if len(question) > rt.settings.max_question_chars:
        raise ApiError(413, f"question of {len(question)} chars exceeds the limit of {rt.settings.max_question_chars}")


def make_router(rt: Runtime) -> APIRouter:
    router = APIRouter()
    limit = rt.settings.max_request_bytes
    limits = InputLimits(rt.settings.max_document_bytes, rt.settings.max_question_chars)

    @router.post("/query", openapi_extra=request_body(QueryRequest))
    async def query(request: HttpRequest):
        rag = _rag(rt)
        body = await read_model(request, QueryRequest, limit)
        principal_of(request).require_namespace(body.namespace)
        check_question_chars(rt, body.question)
        q_ids = await rt.run_blocking(rag.question_ids, body.question)  # the one check, before any other
        params = sampling_from_fields(
            {
                "max_new_tokens": body.max_new_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "stop": QUERY_DEFAULTS.stop if body.stop is None else body.stop,
                "repetition_penalty": QUERY_DEFAULTS.repetition_penalty
                if body.repetition_penalty is None
                else body.repetition_penalty,
                "seed": body.seed,
            }
        )
        rt.check_limits_params(params)
        if rt.draining:
            raise ApiError(503, "server is shutting down")
        cancel = threading.Event()  # set when the client leaves: the assembly stops at its next stage
        preparing = asyncio.ensure_future(
            rt.run_blocking(
                rag.prepare,
                body.question,
                top_k=body.top_k,
                namespace=body.namespace,
                reuse_policy=body.reuse_policy or None,
                params=params,
                question_ids=q_ids,
                cancel=cancel,
            )
        )
        while not (await asyncio.wait({preparing}, timeout=0.25))[0]:
            if await request.is_disconnected():
                cancel.set()
        try:
            prepared = preparing.result()
        except AssemblyCancelled:
            raise ApiError(400, "request cancelled: the client left") from None
        (job,) = await rt.submit([Job(prepared.request, owner=principal_of(request).name)])
        sources = [_source(s) for s in prepared.sources]
        if body.stream:
            return StreamingResponse(
                _stream_query(rt, job, prepared, sources, request), media_type="text/event-stream", headers=SSE_HEADERS
            )
        await rt.wait(job, request)
        rt.raise_if_failed([job])
        return JSONResponse(_final(job, prepared, sources))

    @router.post("/retrieve", openapi_extra=request_body(RetrieveRequest))
    async def retrieve(request: HttpRequest):
        rag = _rag(rt)
        body = await read_model(request, RetrieveRequest, limit)
        principal_of(request).require_namespace(body.namespace)
        check_question_chars(rt, body.question)
        t0 = time.perf_counter()
        sources = await rt.run_blocking(rag.retrieve, body.question, top_k=body.top_k, namespace=body.namespace)
        return {
            "namespace": body.namespace,
            "chunks": [_source(s) for s in sources],
            "context": rag.format_context(sources),
            "system": rag.system_prompt,
            "retrieve_ms": round((time.perf_counter() - t0) * 1e3, 2),
        }

    @router.get("/rag_info")
    async def rag_info():
        rag = rt.rag
        return {
            "enabled": rag is not None,
            "system": rag.system_prompt if rag is not None else None,
            "reuse_policy": rag.default_policy if rag is not None else None,
        }

    @router.post("/ingest", openapi_extra=request_body(IngestRequest))
    async def ingest(request: HttpRequest):
        require_admin(principal_of(request))
        rag = _rag(rt)
        body = await read_model(request, IngestRequest, limit)
        if not body.documents and not body.paths:
            raise ApiError(400, "give 'documents' (a list of {doc_id, text}) or 'paths'")
        for d in body.documents or []:
            if d.text is not None:
                limits.check_text(d.doc_id, d.text)  # TooLargeError → 413
        uploads = [d for d in body.documents or [] if d.content_base64 is not None]
        files = {d.doc_id: _decode_file(d.doc_id, d.content_base64 or "", limits) for d in uploads}
        paths = await rt.run_blocking(confine_paths, body.paths or [], rt.settings.ingest_root)
        await rt.run_blocking(limits.check_paths, paths)
        out: dict[str, Any] = {"namespace": body.namespace}
        docs = []
        for d in body.documents or []:  # every upload and every path parsed (IngestError → 400) before any write
            text, info = d.text, dict[str, Any]()
            if d.format is not None:
                text, info = await rt.run_blocking(parse_binary, files[d.doc_id], d.format, d.doc_id)
            docs.append({"doc_id": d.doc_id, "text": text, "metadata": {**info, **(d.metadata or {})}})
        from_docs, from_paths = await _ingest_while_connected(rt, rag, request, docs, paths, body.namespace)
        if from_docs is not None:
            out["documents"] = dataclasses.asdict(from_docs)
        if from_paths is not None:
            out["paths"] = dataclasses.asdict(from_paths)
        return out

    @router.get("/documents")
    async def list_documents(request: HttpRequest, namespace: NamespaceParam = "default"):
        require_admin(principal_of(request))
        rag = _rag(rt)
        docs = await rt.run_blocking(rag.list_documents, namespace)
        return {"namespace": namespace, "documents": docs}

    async def delete(request: HttpRequest, namespace: str, doc_id: str) -> dict[str, Any]:
        require_admin(principal_of(request))
        rag = _rag(rt)
        if not await rt.run_blocking(rag.delete_document, namespace, doc_id):
            raise ApiError(404, f"document {doc_id!r} not found in namespace {namespace!r}")
        return {"namespace": namespace, "doc_id": doc_id, "deleted": True}

    @router.delete("/documents/{doc_id:path}")
    async def delete_document(request: HttpRequest, doc_id: str, namespace: NamespaceParam = "default"):
        """Ids may hold "/" (send them as-is or percent-encoded); where a client's URL handling would
        rewrite an id (dot segments such as "a/../b"), use `DELETE /documents?doc_id=...`."""
        return await delete(request, namespace, doc_id)

    @router.delete("/documents")
    async def delete_document_by_query(
        request: HttpRequest,
        doc_id: Annotated[str, Query(min_length=1)],
        namespace: NamespaceParam = "default",
    ):
        return await delete(request, namespace, doc_id)

    return router


async def _ingest_while_connected(
    rt: Runtime, rag: RagService, request: HttpRequest, docs: list[dict[str, Any]], paths: list[Path], namespace: str
) -> tuple[IngestSummary | None, IngestSummary | None]:
    """The ingest on an executor thread, cancelled (between stages and KV batches) once the client leaves:
    polled every `_DISCONNECT_POLL_S`; the handler's own cancellation cancels it too."""
    cancel = threading.Event()
    work = asyncio.ensure_future(rt.run_blocking(rag.ingest_texts_and_paths, docs, paths, namespace, cancel))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                log.warning("ingest client left: cancelling", extra={"namespace": namespace})
                cancel.set()
        return work.result()
    except IngestCancelled as e:
        raise ApiError(499, str(e)) from None  # nobody reads it: the client is gone
    finally:
        cancel.set()  # no-op once done; stops the worker if this handler was cancelled


def _final(job: Job, prepared: Prepared, sources: list[dict[str, Any]]) -> dict[str, Any]:
    r = job.req
    return {
        "id": r.rid,
        "answer": job.text,
        "sources": sources,
        "finish_reason": job.finish_reason,
        "usage": {
            "prompt_tokens": r.prompt_len,
            "completion_tokens": len(r.output_ids),
            "cached_tokens": r.cached_tokens,
        },
        "timing": prepared.finalize(),
        "reuse": {"policy": prepared.policy, **prepared.stats},
    }


async def _stream_query(
    rt: Runtime, job: Job, prepared: Prepared, sources: list[dict[str, Any]], request: HttpRequest
) -> AsyncIterator[bytes]:
    """SSE: `{"type": "sources"}`, then `{"type": "token", "text": delta}`..., then `{"type": "done", ...}`."""
    yield sse({"type": "sources", "id": job.rid, "sources": sources})
    async for ev in rt.events(job, request):
        if ev.text and not ev.finished:
            yield sse({"type": "token", "text": ev.text})
    if job.error:
        yield sse(job.error_body())
    else:
        yield sse({"type": "done", **_final(job, prepared, sources)})
    yield SSE_DONE
