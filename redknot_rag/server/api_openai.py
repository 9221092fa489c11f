"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models`, with streaming.

Chat requests go through the model's own chat template; a prompt that contains stored chunks
reuses their KV like any other (`usage.prompt_tokens_details.cached_tokens` reports it).
`model` must name the served model (or be left out): any other name answers 404. `tools` /
`tool_choice` follow the Hermes `<tool_call>` convention (server/tools.py): calls come back as
`message.tool_calls` with finish_reason `tool_calls`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HttpRequest

from redknot_rag.engine.grammar import JSON_OBJECT_SCHEMA
from redknot_rag.server.api_sglang import SSE_DONE, SSE_HEADERS, sse
from redknot_rag.server.auth import Principal, principal_of
from redknot_rag.server.errors import ApiError
from redknot_rag.server.request_body import read_model
from redknot_rag.server.runtime import GenInput, Job, Runtime, sampling_from_fields
from redknot_rag.server.schemas import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from redknot_rag.server.spec import request_body
from redknot_rag.server.token_text import num_chars, token_bytes, token_text
from redknot_rag.server.tools import ToolPlan, ToolStream, chat_ids, plan_tools

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _finish(job: Job) -> str | None:
    t = (job.finish_reason or {}).get("type")
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(t or "", None)


def _usage(jobs: list[Job], n: int) -> dict[str, Any]:
    """Token counts; the prompt of n samples is counted once (jobs come grouped by prompt)."""
    firsts = jobs[::n]
    prompt = sum(j.prompt_tokens for j in firsts)
    completion = sum(j.completion_tokens for j in jobs)
    cached = sum(j.cached_tokens for j in firsts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _params(body: _OpenAISampling, max_tokens: int | None, default_max: int) -> Any:
    if isinstance(body, CompletionRequest) and body.best_of is not None and body.best_of != (body.n or 1):
        raise ApiError(400, "best_of other than n is not supported")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported")
    fields = {
        "max_new_tokens": default_max if max_tokens is None else max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "regex": body.regex,
        "json_schema": json.dumps(body.json_schema) if isinstance(body.json_schema, dict) else body.json_schema,
        "ebnf": body.ebnf,
        "n": body.n,
    }
    return sampling_from_fields(fields)


def check_model(rt: Runtime, name: str | None) -> None:
    """404 for a model this server does not serve (OpenAI's `model_not_found`)."""
    if name is not None and name not in (rt.model_name, rt.model_dir):
        raise ApiError(404, f"model {name!r} not found; this server serves {rt.model_name!r} (see /v1/models)")


def default_max_tokens(rt: Runtime, prompt_len: int) -> int:
    """New tokens when a chat request gives no max_tokens: proportionate to the context (1/16 of it,
    512 for 8K), never more than the room left or the server's limit."""
    ctx = rt.engine.max_context
    base = rt.settings.default_max_tokens or max(16, ctx // 16)
    return max(0, min(base, rt.settings.max_new_tokens_limit, ctx - prompt_len - 1))


def _expand(
    prompts: list[list[int]], params: Any, logprobs: int | None, who: Principal, echo: bool = False
) -> list[GenInput]:
    """One GenInput per (prompt, sample); `echo` with logprobs also asks for the prompt's logprobs."""
    n = params.n  # 1..16 (schema)
    want = logprobs is not None
    out = []
    for ids in prompts:
        for j in range(n):
            p = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
            out.append(
                GenInput(
                    list(ids),
                    replace(p, n=1),
                    return_logprob=want,
                    logprob_start_len=0 if want and echo else -1,
                    top_logprobs_num=logprobs or 0,
                    namespaces=who.namespaces,
                    owner=who.name,
                )
            )
    return out


def make_router(rt: Runtime) -> APIRouter:
    router = APIRouter(prefix="/v1")

    def model_card() -> dict[str, Any]:
        return {
            "id": rt.model_name,
            "object": "model",
            "created": int(rt.started),
            "owned_by": "redknot-rag",
            "root": rt.model_name,
            "max_model_len": rt.engine.max_context,
        }

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str):
        """The served model (OpenAI's retrieve); any other id answers 404, as `model` in a request does."""
        check_model(rt, model_id)
        return model_card()

    @router.post("/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: HttpRequest):
        body = await read_model(request, CompletionRequest, rt.settings.max_request_bytes, schema_status=400)
        check_model(rt, body.model)
        if body.suffix:
            raise ApiError(400, "suffix is not supported")
        p = body.prompt
        if isinstance(p, str):
            prompts = [await rt.tokenize(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [await rt.tokenize(x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]  # type: ignore[arg-type]
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, or token ids")
        if len(prompts) > rt.settings.max_batch_size:
            raise ApiError(413, f"{len(prompts)} prompts exceed the limit of {rt.settings.max_batch_size}")
        params = _params(body, body.max_tokens, _DEFAULT_MAX_TOKENS)
        inputs = _expand(prompts, params, body.logprobs, principal_of(request), echo=bool(body.echo))
        echo = [rt.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(params.n)]
        jobs = await rt.start(inputs)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream_completion(rt, jobs, request, cid, created, echo, include_usage, params.n),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        await rt.wait_all(jobs, request)
        rt.raise_if_failed(jobs)
        choices = []
        for i, job in enumerate(jobs):
            choice: dict[str, Any] = {
                "index": i,
                "text": echo[i] + job.text,
                "finish_reason": _finish(job),
                "logprobs": None,
            }
            if body.logprobs is not None:
                choice["logprobs"] = _completion_logprobs(rt, job, echo=bool(body.echo))
            choices.append(choice)
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": rt.model_name,
                "choices": choices,
                "usage": _usage(jobs, params.n),
            }
        )

    @router.post("/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: HttpRequest):
        body = await read_model(request, ChatCompletionRequest, rt.settings.max_request_bytes, schema_status=400)
        check_model(rt, body.model)
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        messages: list[dict[str, Any]] = []
        for m in body.messages:
            content = (
                m.content
                if isinstance(m.content, str) or m.content is None
                else "".join(part.text for part in m.content)
            )
            role = "system" if m.role == "developer" else m.role
            msg: dict[str, Any] = {"role": role, "content": content or ""}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            messages.append(msg)
        ids = await rt.run_blocking(chat_ids, rt.tokenizer, messages, plan)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, max_tokens, default_max_tokens(rt, len(ids)))
        rf = body.response_format
        if rf is not None and rf.type != "text" and params.regex is None:
            if rf.type == "json_object":
                params = replace(params, json_schema=JSON_OBJECT_SCHEMA)
            else:
                schema = (rf.json_schema or {}).get("schema")
                if schema is None:
                    raise ApiError(400, "response_format.json_schema.schema is required")
                params = replace(params, json_schema=json.dumps(schema))
        tool_schema = plan.json_schema()
        if tool_schema is not None:
            if params.regex or params.json_schema or params.ebnf:
                raise ApiError(400, f"tool_choice {plan.mode!r} constrains the output; drop response_format/regex")
            params = replace(params, json_schema=tool_schema)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true")
        inputs = _expand([ids], params, (body.top_logprobs or 0) if body.logprobs else None, principal_of(request))
        jobs = await rt.start(inputs)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream_chat(rt, jobs, request, cid, created, include_usage, params.n, plan),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        await rt.wait_all(jobs, request)
        rt.raise_if_failed(jobs)
        choices = []
        for i, job in enumerate(jobs):
            content, calls = plan.read_output(job.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
            choice: dict[str, Any] = {
                "index": i,
                "message": message,
                "finish_reason": "tool_calls" if calls else _finish(job),
                "logprobs": None,
            }
            if body.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(rt, job)}
            choices.append(choice)
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": rt.model_name,
                "choices": choices,
                "usage": _usage(jobs, params.n),
            }
        )

    return router


def _num_shown(job: Job, upto: int | None = None) -> int:
    """Output tokens whose logprobs are shown, of the first `upto`: all but a stop token that ended the
    request (it is in no text, so OpenAI shows no logprob for it)."""
    r = job.req
    n = len(r.output_token_logprobs) if upto is None else min(upto, len(r.output_token_logprobs))
    matched = (r.finish_reason or {}).get("matched")
    if isinstance(matched, int) and not isinstance(matched, bool) and r.output_ids and r.output_ids[-1] == matched:
        n = min(n, len(r.output_ids) - 1)
    return n


def _token_entry(rt: Runtime, tid: int, lp: float) -> dict[str, Any]:
    """One token of chat `logprobs.content`: its text (`bytes:\\xNN` for part of a character) and real bytes."""
    return {"token": token_text(rt.tokenizer, tid), "logprob": lp, "bytes": list(token_bytes(rt.tokenizer, tid))}


def _chat_logprobs(rt: Runtime, job: Job, since: int = 0, upto: int | None = None) -> list[dict[str, Any]]:
    """`logprobs.content` of output tokens [since, upto) (a streamed chunk's new tokens)."""
    r = job.req
    out = []
    for k, (lp, tid) in enumerate(r.output_token_logprobs[since : _num_shown(job, upto)], since):
        tops = r.output_top_logprobs[k] if k < len(r.output_top_logprobs) else []
        out.append({**_token_entry(rt, tid, lp), "top_logprobs": [_token_entry(rt, t, v) for v, t in tops]})
    return out


def _completion_logprobs(
    rt: Runtime, job: Job, echo: bool = False, since: int = 0, upto: int | None = None, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy logprobs of output tokens [since, upto), `text_offset` counted from `offset` (a
    streamed chunk's new tokens and where its text starts). With `echo`, the prompt's tokens come first
    (the first one has no logprob: None, as OpenAI answers). `text_offset` is each token's first
    character in the text (the echoed prompt + completion), counted from the tokens' real bytes."""
    r = job.req
    tok = rt.tokenizer
    rows: list[tuple[float | None, int, dict[str, float] | None]] = []
    if echo:
        tops_in = r.input_top_logprobs
        for k, (lp, t) in enumerate(r.input_token_logprobs):
            top = {token_text(tok, i): v for v, i in tops_in[k]} if k < len(tops_in) and tops_in[k] else None
            rows.append((None if k == 0 else lp, t, None if k == 0 else top))
    tops_out = r.output_top_logprobs
    for k, (lp, t) in enumerate(r.output_token_logprobs[since : _num_shown(job, upto)], since):
        top = {token_text(tok, i): v for v, i in tops_out[k]} if k < len(tops_out) else None
        rows.append((lp, t, top))
    offsets, pos = [], offset
    for _, t, _ in rows:
        offsets.append(pos)
        pos += num_chars(token_bytes(tok, t))
    want_top = r.top_logprobs_num > 0
    return {
        "tokens": [token_text(tok, t) for _, t, _ in rows],
        "token_logprobs": [lp for lp, _, _ in rows],
        "top_logprobs": [top for _, _, top in rows] if want_top else None,
        "text_offset": offsets,
    }


async def _stream_completion(
    rt: Runtime,
    jobs: list[Job],
    request: HttpRequest,
    cid: str,
    created: int,
    echo: list[str],
    include_usage: bool,
    n: int,
) -> AsyncIterator[bytes]:
    """Text deltas per choice; with `logprobs`, each chunk carries those of the tokens since the last chunk
    (a token whose text is held back, a partial stop string or UTF-8 sequence, comes with the next one)."""
    base = {"id": cid, "object": "text_completion", "created": created, "model": rt.model_name}
    for i, e in enumerate(echo):
        if e:
            yield sse({**base, "choices": [{"index": i, "text": e, "finish_reason": None, "logprobs": None}]})
    sent, pos = [0] * len(jobs), [len(e) for e in echo]  # tokens whose logprobs went out; their text's end
    async for i, job, ev in rt.merged(jobs, request):
        if job.error:
            yield sse(job.error_body())
            continue
        logprobs = None
        if job.req.return_logprob:
            n = job.logprobs_upto(ev.finished)
            logprobs = _completion_logprobs(rt, job, since=sent[i], upto=n, offset=pos[i])
            shown = _num_shown(job, n)
            pos[i] += sum(
                num_chars(token_bytes(rt.tokenizer, t)) for _, t in job.req.output_token_logprobs[sent[i] : shown]
            )
            sent[i] = max(sent[i], shown)
        yield sse(
            {
                **base,
                "choices": [
                    {
                        "index": i,
                        "text": ev.text,
                        "logprobs": logprobs,
                        "finish_reason": _finish(job) if ev.finished else None,
                    }
                ],
            }
        )
    if include_usage:
        yield sse({**base, "choices": [], "usage": _usage(jobs, n)})
    yield SSE_DONE


async def _stream_chat(
    rt: Runtime,
    jobs: list[Job],
    request: HttpRequest,
    cid: str,
    created: int,
    include_usage: bool,
    n: int,
    plan: ToolPlan,
) -> AsyncIterator[bytes]:
    """Content deltas per choice; with tools, text that may be a `<tool_call>` is held back and the
    calls come as one `tool_calls` delta when the choice finishes (finish_reason `tool_calls`)."""
    tool_streams = [ToolStream(plan) for _ in jobs] if plan.mode != "none" else None
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": rt.model_name}
    sent = [0] * len(jobs)  # tokens whose logprobs went out (a held-back token's come with the next chunk)
    for i in range(len(jobs)):
        yield sse(
            {
                **base,
                "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
                ],
            }
        )
    async for i, job, ev in rt.merged(jobs, request):
        if job.error:
            yield sse(job.error_body())
            continue
        d: dict[str, Any] = {"content": ev.text} if ev.text else {}
        finish = _finish(job) if ev.finished else None
        if tool_streams is not None:
            ts = tool_streams[i]
            d = {"content": text} if (text := ts.delta(job.text)) else {}
            if ev.finished:
                rest, calls = ts.finish(job.text)
                d = {"content": d.get("content", "") + rest} if d.get("content", "") + rest else {}
                if calls:
                    d["tool_calls"] = [c.as_openai(index=k) for k, c in enumerate(calls)]
                    finish = "tool_calls"
        logprobs = None
        if job.req.return_logprob:
            n = job.logprobs_upto(ev.finished)
            logprobs = {"content": _chat_logprobs(rt, job, since=sent[i], upto=n)}
            sent[i] = max(sent[i], _num_shown(job, n))
        yield sse(
            {
                **base,
                "choices": [{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish}],
            }
        )
    if include_usage:
        yield sse({**base, "choices": [], "usage": _usage(jobs, n)})
    yield SSE_DONE
