"""The bridge between HTTP handlers (asyncio) and the engine thread.

Every API builds `Job`s here: a validated engine Request (through the RAG service's automatic
reuse when one exists), plus what the server adds on top (regex-constrained decoding, stop
regexes, metrics). Token events cross from the engine thread to the event loop through
`_LoopQueue`, which wakes the waiting coroutine instead of polling. A client that goes away
aborts its engine request; a request that fails only fails itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import regex
from starlette.requests import Request as HttpRequest

from redknot_rag.chat import encode
from redknot_rag.engine import Engine, EngineOverloadedError
from redknot_rag.request import Request, TokenEvent
from redknot_rag.sampling import InvalidRequestError, SamplingParams
from redknot_rag.server.constrained import RegexProcessor, TokenTexts, compile_regex, json_schema_regex
from redknot_rag.server.errors import ApiError
from redknot_rag.server.metrics import Metrics
from redknot_rag.server.settings import ServerSettings

log = logging.getLogger("redknot.server")
T = TypeVar("T")
_WAKE_S = 0.25  # longest sleep between checks for a client disconnect


class _LoopQueue(queue.Queue):
    """A Request.events queue whose `put` (engine thread) also sets an asyncio.Event (event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.ready = asyncio.Event()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # loop closed during shutdown
            pass


@dataclass
class GenInput:
    """One prompt to run: token ids, sampling, logprob options and server-side extras."""

    prompt_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stop_regex: tuple[str, ...] = ()
    rid: str | None = None
    allow_reuse: bool = True


@dataclass
class Job:
    """A submitted engine request and the server's view of it (text after stop regexes, finish)."""

    req: Request
    stop_regex: list[regex.Pattern] = field(default_factory=list)
    text: str = ""
    finish_reason: dict | None = None
    error: str | None = None
    is_finished: bool = False
    old_events: queue.Queue | None = None  # events put before the bridge was attached (RAG path)
    observed: bool = False

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def prompt_tokens(self) -> int:
        return self.req.prompt_len

    @property
    def completion_tokens(self) -> int:
        return len(self.req.output_ids)

    @property
    def cached_tokens(self) -> int:
        return self.req.cached_tokens


def finish_reason_label(reason: dict | None) -> str:
    return str((reason or {}).get("type", "abort"))


class Runtime:
    """Shared state of one server process: engine, optional RAG service, settings, metrics."""

    def __init__(self, engine: Engine, settings: ServerSettings, rag: Any = None, metrics: Metrics | None = None):
        self.engine = engine
        self.settings = settings
        self.rag = rag
        self.metrics = metrics or Metrics()
        self.tokenizer = engine.tokenizer
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="redknot-io")
        self.draining = False
        self.started = time.time()
        self.model_name = settings.served_model_name or engine.loaded.name
        self._add_gauges()

    def _add_gauges(self) -> None:
        e, m = self.engine, self.metrics
        m.add_gauge("redknot_num_queued_requests", "Requests waiting for admission.", lambda: e.num_waiting)
        m.add_gauge("redknot_num_running_requests", "Requests in the running batch.", lambda: e.num_running)
        m.add_gauge("redknot_kv_pool_pages", "KV pool size in (layer, head) pages.", lambda: e.pool.num_pages)
        m.add_gauge("redknot_kv_pool_free_pages", "Free KV pool pages.", lambda: e.allocator.num_free)
        m.add_gauge(
            "redknot_kv_pool_usage",
            "Share of KV pool pages in use.",
            lambda: 1.0 - e.allocator.num_free / max(e.pool.num_pages, 1),
        )

    # ---- threads --------------------------------------------------------------------------
    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kw))

    async def tokenize(self, text: str) -> list[int]:
        if len(text) < 4096:
            return encode(self.tokenizer, text)
        return await self.run_blocking(encode, self.tokenizer, text)

    def decode_one(self, token_id: int) -> str:
        return _decode_one(self.tokenizer, token_id)

    # ---- building -------------------------------------------------------------------------
    def check_limits(self, inp: GenInput) -> None:
        n, ctx = len(inp.prompt_ids), self.engine.max_context
        if n >= ctx:
            raise ApiError(413, f"prompt has {n} tokens; the model context is {ctx} tokens")
        self.check_limits_params(inp.params)

    def check_limits_params(self, params: SamplingParams) -> None:
        mnt = params.max_new_tokens
        if not isinstance(mnt, int) or mnt < 0:
            raise ApiError(400, f"max_new_tokens must be a non-negative integer, got {mnt}")
        if mnt > self.settings.max_new_tokens_limit:
            raise ApiError(
                400, f"max_new_tokens {mnt} exceeds this server's limit of {self.settings.max_new_tokens_limit}"
            )

    def build(self, inp: GenInput) -> Job:
        """Validate and build a Job (not submitted). Runs on an executor thread (reuse may load KV)."""
        self.check_limits(inp)
        p = inp.params
        pattern = p.regex
        if pattern is None and p.json_schema is not None:
            pattern = json_schema_regex(p.json_schema)
        processor = None
        if pattern is not None:  # validated before any KV is assembled
            eos = tuple(p.stop_token_ids) + tuple(self.engine.model_config.eos_token_ids)
            processor = RegexProcessor(pattern, TokenTexts.of(self.tokenizer), eos, p.is_greedy)
        stop_regex = [compile_regex(s) for s in inp.stop_regex]
        kw = dict(
            return_logprob=inp.return_logprob,
            logprob_start_len=inp.logprob_start_len,
            top_logprobs_num=inp.top_logprobs_num,
        )
        req: Request | None = None
        if self.rag is not None and inp.allow_reuse:
            req = self.rag.build_request(inp.prompt_ids, p, **kw)
            if inp.return_logprob and req.prefix_len > max(inp.logprob_start_len, 0):
                self.discard(req)  # reused prompt tokens have no logits: prefill them to answer logprobs
                req = None
        if req is None:
            req = self.engine.make_request(inp.prompt_ids, p, **kw)
        if inp.rid:
            req.rid = inp.rid
        if processor is not None:
            req.logits_processor = processor  # type: ignore[attr-defined]  # called by Engine._emit
        return Job(req, stop_regex)

    async def start(self, inputs: list[GenInput]) -> list[Job]:
        """Build and submit every input; all or none (a failure aborts those already submitted)."""
        if self.draining:
            raise ApiError(503, "server is shutting down")
        jobs: list[Job] = []
        try:
            for inp in inputs:
                jobs.append(await self.run_blocking(self.build, inp))
        except BaseException:
            for j in jobs:
                await self.run_blocking(self.discard, j.req)
            raise
        loop = asyncio.get_running_loop()
        submitted: list[Job] = []
        try:
            for job in jobs:
                job.req.events = _LoopQueue(loop)
                self.engine.submit(job.req)
                submitted.append(job)
        except EngineOverloadedError as e:
            for j in submitted:
                self.engine.abort(j.rid)
            for j in jobs[len(submitted) :]:
                await self.run_blocking(self.discard, j.req)
            self.metrics.count_rejected("queue_full")
            raise ApiError(429, f"server overloaded: {e}; retry later", {"Retry-After": "1"}) from e
        return jobs

    def discard(self, req: Request) -> None:
        """Give back what a built but never submitted request holds (reuse may have assembled KV pages)."""
        kv = getattr(req, "prebuilt_kv", None)
        if kv is not None:
            req.prebuilt_kv = None  # type: ignore[attr-defined]
            self.engine.call(lambda: kv.release(self.engine.allocator))

    def adopt(self, req: Request) -> Job:
        """A Job for a request someone else already submitted (the RAG service's `prepare`)."""
        loop = asyncio.get_running_loop()
        job = Job(req, old_events=req.events)
        req.events = _LoopQueue(loop)
        return job

    # ---- consuming ------------------------------------------------------------------------
    def _next_event(self, job: Job) -> TokenEvent | None:
        for q in (job.old_events, job.req.events):
            if q is None:
                continue
            try:
                return q.get_nowait()
            except queue.Empty:
                continue
        return None

    async def events(self, job: Job, http: HttpRequest | None = None) -> AsyncIterator[TokenEvent]:
        """Yield the job's events (deltas already cut by stop regexes) until it finishes.

        Leaving early (client gone, generator closed, task cancelled) aborts the engine request.
        """
        bridge = job.req.events
        assert isinstance(bridge, _LoopQueue)
        checked = time.monotonic()
        try:
            while not job.is_finished:
                if http is not None and time.monotonic() - checked > _WAKE_S:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        log.info("client disconnected", extra={"rid": job.rid})
                        return
                ev = self._next_event(job)
                if ev is None:
                    bridge.ready.clear()
                    if bridge.empty():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(bridge.ready.wait(), _WAKE_S)
                    continue
                out = self._apply(job, ev)
                if out is not None:
                    yield out
        finally:
            if not job.is_finished:
                self.engine.abort(job.rid)
                job.is_finished = True
                job.finish_reason = {"type": "abort"}
                self.observe(job)

    def _apply(self, job: Job, ev: TokenEvent) -> TokenEvent | None:
        """Track text and finish; enforce stop regexes. Returns the event to show, or None."""
        if job.finish_reason is not None and not ev.finished:
            return None  # stop regex already ended it; waiting for the engine's abort
        if ev.finished:
            job.is_finished = True
            if job.finish_reason is None:
                job.finish_reason = ev.finish_reason
            job.error = ev.error
            self.observe(job)
            return TokenEvent(ev.token_id, "", ev.logprob, True, job.finish_reason, ev.error)
        text = job.text + ev.text
        for rx in job.stop_regex:
            m = rx.search(text)
            if m is not None:
                cut = text[: m.start()]
                delta = cut[len(job.text) :]
                job.text = cut
                job.finish_reason = {"type": "stop", "matched": rx.pattern}
                self.engine.abort(job.rid)
                return TokenEvent(ev.token_id, delta, ev.logprob)
        job.text = text
        return ev

    async def merged(
        self, jobs: list[Job], http: HttpRequest | None = None
    ) -> AsyncIterator[tuple[int, Job, TokenEvent]]:
        """(index, job, event) across jobs as they come; only events with text or the final one."""
        q: asyncio.Queue[tuple[int, Job, TokenEvent] | None] = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            async for ev in self.events(job, http):
                if ev.text or ev.finished:
                    q.put_nowait((i, job, ev))

        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        all_done = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
        all_done.add_done_callback(lambda _: q.put_nowait(None))
        try:
            while (item := await q.get()) is not None:
                yield item
        finally:
            for t in tasks:
                t.cancel()
            for j in jobs:
                if not j.is_finished:
                    self.engine.abort(j.rid)

    async def wait(self, job: Job, http: HttpRequest | None = None) -> Job:
        async for _ in self.events(job, http):
            pass
        return job

    async def wait_all(self, jobs: list[Job], http: HttpRequest | None = None) -> list[Job]:
        try:
            await asyncio.gather(*(self.wait(j, http) for j in jobs))
        finally:
            for j in jobs:
                if not j.is_finished:
                    self.engine.abort(j.rid)
        return jobs

    def observe(self, job: Job) -> None:
        if job.observed:
            return
        job.observed = True
        r = job.req
        e2e = (r.finish_time or time.perf_counter()) - r.arrival_time
        self.metrics.observe_request(
            prompt_tokens=r.prompt_len,
            output_tokens=len(r.output_ids),
            cached_tokens=r.cached_tokens,
            finish=finish_reason_label(job.finish_reason),
            ttft=r.ttft,
            token_times=list(r.token_times),
            e2e=e2e,
        )
        log.info(
            "request finished",
            extra={
                "rid": r.rid,
                "prompt_tokens": r.prompt_len,
                "completion_tokens": len(r.output_ids),
                "cached_tokens": r.cached_tokens,
                "finish": finish_reason_label(job.finish_reason),
                "ttft_ms": None if r.ttft is None else round(r.ttft * 1e3, 1),
                "e2e_ms": round(e2e * 1e3, 1),
                **({"error": job.error} if job.error else {}),
            },
        )

    def raise_if_failed(self, jobs: list[Job]) -> None:
        for j in jobs:
            if j.error:
                raise ApiError(500, f"request {j.rid} failed: {j.error}")

    def shutdown(self) -> None:
        self.draining = True
        self.engine.shutdown(cancel=True)
        self.executor.shutdown(wait=False, cancel_futures=True)


@functools.lru_cache(maxsize=1 << 16)
def _decode_one(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def sampling_from_fields(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams from SGLang-named fields (None means default); type errors become 400."""
    kw = {k: v for k, v in fields.items() if v is not None}
    for key in ("stop", "stop_token_ids"):
        if key in kw:
            v = kw[key]
            kw[key] = (v,) if isinstance(v, str) else tuple(v)
    try:
        return SamplingParams(**kw)
    except TypeError as e:
        raise InvalidRequestError(str(e)) from e
