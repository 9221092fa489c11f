"""SGLang's native HTTP API, as `sgl.RuntimeEndpoint` uses it (see shared SGLANG.md).

`/generate` takes text or input_ids, single or batch, SGLang's sampling field names, `n`,
regex/json_schema/ebnf constraints and logprob options; it answers `{"text", "output_ids",
"meta_info"}` (a list for batches or n > 1) or streams SSE with the cumulative text; a streamed
chunk's `output_token_logprobs` holds the tokens since the previous chunk, and
`output_token_logprobs_length` the running count (as SGLang streams them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HttpRequest

from redknot_rag.server.auth import Principal, principal_of, require_admin
from redknot_rag.server.errors import ApiError
from redknot_rag.server.request_body import read_model
from redknot_rag.server.runtime import GenInput, Job, Runtime, sampling_from_fields
from redknot_rag.server.schemas import AbortRequest, GenerateRequest, SglSamplingParams
from redknot_rag.server.spec import request_body

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _per_item(value: Any, i: int, n: int, name: str) -> Any:
    if isinstance(value, list):
        if len(value) != n:
            raise ApiError(400, f"{name} has {len(value)} entries for a batch of {n}")
        return value[i]
    return value


def logprob_list(rt: Runtime, items: list[tuple[float, int]], with_text: bool) -> list[list[Any]]:
    """[(logprob, id)] → SGLang's [[logprob, id, text|None], ...]."""
    return [[lp, tid, rt.decode_one(tid) if with_text else None] for lp, tid in items]


def top_list(rt: Runtime, items: list[list[tuple[float, int]]], with_text: bool) -> list[Any]:
    return [logprob_list(rt, row, with_text) if row else None for row in items]


def meta_info(
    rt: Runtime, job: Job, with_text: bool, t0: float, logprobs: bool, since: int = 0, upto: int | None = None
) -> dict[str, Any]:
    """SGLang's meta_info. With `logprobs`, output logprobs of tokens [since, upto) (a stream chunk's new
    tokens) and input logprobs when `since == 0`."""
    r = job.req
    n = len(r.output_ids) if upto is None else upto
    meta: dict[str, Any] = {
        "id": job.public_rid,
        "finish_reason": job.finish_reason,
        "prompt_tokens": r.prompt_len,
        "completion_tokens": n,
        "cached_tokens": r.cached_tokens,
        "e2e_latency": round(time.perf_counter() - t0, 6),
    }
    if job.error:
        meta["error"] = job.error
    if logprobs:
        if since == 0:
            meta["input_token_logprobs"] = logprob_list(rt, r.input_token_logprobs, with_text)
        meta["output_token_logprobs"] = logprob_list(rt, r.output_token_logprobs[since:n], with_text)
        meta["output_token_logprobs_length"] = n
        if r.top_logprobs_num > 0:
            if since == 0:
                meta["input_top_logprobs"] = top_list(rt, r.input_top_logprobs, with_text)
            meta["output_top_logprobs"] = top_list(rt, r.output_top_logprobs[since:n], with_text)
    return meta


async def build_inputs(rt: Runtime, body: GenerateRequest, who: Principal | None = None) -> tuple[list[GenInput], bool]:
    """Expand a /generate body to one GenInput per (prompt, sample). Returns (inputs, is_batch)."""
    if (body.text is None) == (body.input_ids is None):
        raise ApiError(400, "give exactly one of 'text' or 'input_ids'")
    prompts: list[list[int]]
    if body.text is not None:
        is_batch = isinstance(body.text, list)
        texts = body.text if isinstance(body.text, list) else [body.text]
        prompts = [await rt.tokenize(t) for t in texts]
    else:
        ids: Any = body.input_ids
        is_batch = bool(ids) and isinstance(ids[0], list)
        prompts = ids if is_batch else [ids]
    if not prompts:
        raise ApiError(400, "empty batch")
    if len(prompts) > rt.settings.max_batch_size:
        raise ApiError(413, f"batch of {len(prompts)} prompts exceeds the limit of {rt.settings.max_batch_size}")
    inputs: list[GenInput] = []
    for i, ids_i in enumerate(prompts):
        sp = _per_item(body.sampling_params, i, len(prompts), "sampling_params") or SglSamplingParams()
        fields = sp.model_dump()
        stop_regex = fields.pop("stop_regex")
        seed = fields.pop("sampling_seed")
        if fields.get("seed") is None:
            fields["seed"] = seed
        for k in ("spaces_between_special_tokens", "no_stop_trim"):
            fields.pop(k)
        if isinstance(fields.get("json_schema"), dict):
            fields["json_schema"] = json.dumps(fields["json_schema"])
        params = sampling_from_fields(fields)
        want_lp = bool(_per_item(body.return_logprob, i, len(prompts), "return_logprob"))
        start = _per_item(body.logprob_start_len, i, len(prompts), "logprob_start_len")
        top = _per_item(body.top_logprobs_num, i, len(prompts), "top_logprobs_num") or 0
        rid = _per_item(body.rid, i, len(prompts), "rid")
        n = params.n  # 1..16 (schema)
        for j in range(n):
            pj = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
            inputs.append(
                GenInput(
                    list(ids_i),
                    replace(pj, n=1),
                    return_logprob=want_lp,
                    logprob_start_len=(start if start is not None else (0 if want_lp else -1)) if want_lp else -1,
                    top_logprobs_num=top if want_lp else 0,
                    stop_regex=tuple([stop_regex] if isinstance(stop_regex, str) else (stop_regex or ())),
                    rid=(f"{rid}-{j}" if n > 1 else rid) if rid else None,
                    namespaces=who.namespaces if who is not None else None,
                    owner=who.name if who is not None else "",
                )
            )
    return inputs, is_batch or len(inputs) > 1


def make_router(rt: Runtime) -> APIRouter:
    router = APIRouter()

    @router.post("/generate", openapi_extra=request_body(GenerateRequest))
    async def generate(request: HttpRequest):
        body = await read_model(request, GenerateRequest, rt.settings.max_request_bytes)
        inputs, is_batch = await build_inputs(rt, body, principal_of(request))
        with_text = bool(body.return_text_in_logprobs)
        t0 = time.perf_counter()
        jobs = await rt.start(inputs)
        if body.stream:
            return StreamingResponse(
                _stream(rt, jobs, request, with_text, t0, is_batch),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        await rt.wait_all(jobs, request)
        rt.raise_if_failed(jobs)
        outs = [
            {
                "text": j.text,
                "output_ids": list(j.req.output_ids),
                "meta_info": meta_info(rt, j, with_text, t0, inp.return_logprob),
            }
            for j, inp in zip(jobs, inputs)
        ]
        return JSONResponse(outs if is_batch else outs[0])

    @router.get("/get_model_info")
    async def get_model_info():
        """`model_path` is a local Hugging Face directory a client can load the tokenizer from (SGLang's
        frontend does); `served_model_name` is the name /v1 answers to."""
        return {
            "model_path": rt.model_dir,
            "tokenizer_path": rt.model_dir,
            "served_model_name": rt.model_name,
            "weights": rt.weights_note,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": rt.engine.model_config.arch,
            "architectures": None,
        }

    async def server_info(request: HttpRequest):
        """Limits and load. Where the model lives on the server's disk (`model_path`) goes to admins only."""
        info = {
            "version": "redknot-rag",
            "model_path": rt.model_dir,
            "served_model_name": rt.model_name,
            "weights": rt.weights_note,
            "engine": rt.engine.info(),
            "max_running_requests": rt.engine.config.max_running_requests,
            "max_queued_requests": rt.engine.config.max_queued_requests,
            "max_new_tokens_limit": rt.settings.max_new_tokens_limit,
            "max_request_bytes": rt.settings.max_request_bytes,
            "reuse_policy": rt.default_policy,
            "rag": rt.rag is not None,
            "num_waiting": rt.engine.num_waiting,
            "num_running": rt.engine.num_running,
            "uptime_s": round(time.time() - rt.started, 1),
        }
        if not principal_of(request).is_admin:
            del info["model_path"]
        return info

    router.add_api_route("/server_info", server_info, methods=["GET"])
    router.add_api_route("/get_server_info", server_info, methods=["GET"])

    async def flush_cache(request: HttpRequest):
        """Empty the pool-resident chunk KV cache (admin: it is shared by every tenant)."""
        require_admin(principal_of(request))
        if rt.rag is not None:
            await rt.run_blocking(rt.rag.flush_cache)
        return JSONResponse({"message": "Cache flushed."})

    for method in ("POST", "GET"):
        router.add_api_route(
            "/flush_cache", flush_cache, methods=[method], operation_id=f"flush_cache_{method.lower()}"
        )

    @router.post("/abort_request", openapi_extra=request_body(AbortRequest))
    async def abort_request(request: HttpRequest):
        """Abort a request in flight that this key started (the admin key: any). Another key's request
        answers the same 404 as an unknown rid."""
        body = await read_model(request, AbortRequest, rt.settings.max_request_bytes)
        who = principal_of(request)
        prefix = body.rid + "-"  # `rid` with n > 1 names samples rid-0, rid-1, ...
        hits = [
            j
            for j in rt.jobs.values()
            if (r := j.public_rid) == body.rid or (r.startswith(prefix) and r[len(prefix) :].isdigit())
        ]
        mine = [j for j in hits if who.is_admin or j.owner == who.name]
        if not mine:
            raise ApiError(404, f"no request {body.rid!r} in flight")
        for j in mine:
            rt.engine.abort(j.rid)
        return {"rid": body.rid, "aborted": True}

    @router.get("/health_generate")
    async def health_generate(request: HttpRequest):
        if rt.draining:
            raise ApiError(503, "server is shutting down")
        from redknot_rag.sampling import SamplingParams

        ids = rt.engine.tokenizer.encode("ping", add_special_tokens=False)
        jobs = await rt.start([GenInput(ids, SamplingParams(max_new_tokens=1), allow_reuse=False)])
        try:
            await asyncio.wait_for(rt.wait_all(jobs, request), timeout=30)
        except asyncio.TimeoutError:
            raise ApiError(503, "engine did not produce a token within 30 s") from None
        rt.raise_if_failed(jobs)
        return {"status": "ok"}

    return router


async def _stream(
    rt: Runtime, jobs: list[Job], request: HttpRequest, with_text: bool, t0: float, is_batch: bool
) -> AsyncIterator[bytes]:
    """SSE: `data: {"text": cumulative, "meta_info": ..., "index": i}` per step, then `data: [DONE]`.
    A failed request (or one cancelled by shutdown) ends with its error event instead."""
    sent = [0] * len(jobs)  # output logprobs already sent, per job
    async for i, job, ev in rt.merged(jobs, request):
        if job.error:
            yield sse(job.error_body())
            continue
        if not ev.finished and job.req.is_finished:
            continue  # its finished event is queued next and carries this text too: one last chunk, as SGLang
        n = len(job.req.output_ids)  # logprobs are appended before output_ids (engine thread)
        chunk: dict[str, Any] = {
            "text": job.text,
            "output_ids": list(job.req.output_ids[:n]),
            "meta_info": meta_info(rt, job, with_text, t0, job.req.return_logprob, since=sent[i], upto=n),
        }
        sent[i] = n
        if is_batch:
            chunk["index"] = i
        yield sse(chunk)
    yield SSE_DONE
