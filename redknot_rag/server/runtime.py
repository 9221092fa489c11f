"""The bridge between HTTP handlers (asyncio) and the engine thread.

Every API builds `Job`s here: a validated engine Request (through the RAG service's automatic
reuse when one exists), plus what the server adds on top (grammar-constrained decoding, stop
regexes, metrics). Token events cross from the engine thread to the event loop through
`_LoopQueue`, which wakes the waiting coroutine instead of polling. A client that goes away
aborts its engine request; a request that fails only fails itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from redknot_rag.engine.grammar import Grammar, GrammarBackend, compile_stop_regex
from redknot_rag.rag.service import RagService
from redknot_rag.request import Request, TokenEvent
from redknot_rag.sampling import InvalidRequestError, SamplingParams
from redknot_rag.server.errors import ApiError, error_body
from redknot_rag.server.metrics import Metrics
from redknot_rag.server.settings import ServerSettings

log = logging.getLogger("redknot.server")
T = TypeVar("T")
_WAKE_S = 0.25  # longest sleep between checks for a client disconnect
# Stop conditions are checked after every token (strings on the engine thread, regexes on an executor
# thread): their number and size are bounded, and each regex search is bounded in time, per search
# and per request (a backtracking pattern such as `(a|a)*\d` would otherwise search for minutes).
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256  # one stop string
MAX_STOP_REGEXES = 8
MAX_STOP_REGEX_CHARS = 1_000  # one stop_regex pattern
STOP_REGEX_SEARCH_S = 0.1  # one search of the output so far
STOP_REGEX_BUDGET_S = 2.0  # every search of one request together


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
    namespaces: frozenset[str] | None = None  # automatic reuse may match chunks of these only (None: all)
    owner: str = ""  # the Principal's name: who may abort it


@dataclass
class Job:
    """A submitted engine request and the server's view of it (text after stop regexes, finish)."""

    req: Request
    stop_regex: list[regex.Pattern] = field(default_factory=list)
    text: str = ""
    finish_reason: dict | None = None
    error: str | None = None
    is_finished: bool = False
    observed: bool = False
    owner: str = ""
    cancel_error: str | None = None  # set when the server cancels it (drain): reported instead of an abort
    error_status: int = 500
    client_rid: str | None = None
    stop_regex_budget_s: float = STOP_REGEX_BUDGET_S  # search time left to its stop regexes
    num_tokens_seen: int = 0  # token events taken from the engine so far (a stream's logprobs go up to here)

    def logprobs_upto(self, finished: bool) -> int:
        """How many output tokens a streamed chunk's logprobs may cover: those whose events were seen
        (every one once the job finished)."""
        return (
            len(self.req.output_token_logprobs)
            if finished
            else min(self.num_tokens_seen, len(self.req.output_token_logprobs))
        )

    def error_body(self) -> dict:
        """The SSE error event / JSON error of a failed job (503 when the server cancelled it)."""
        return error_body(self.error_status, f"request {self.public_rid} failed: {self.error}")

    @property
    def rid(self) -> str:
        """The engine's rid: a client's own rid scoped by its owner (`owner/rid`), so two keys may use
        the same rid and neither can tell whether the other's is in flight."""
        return self.req.rid

    @property
    def public_rid(self) -> str:
        """The rid the client knows (the one it gave, else the engine's)."""
        return self.client_rid or self.req.rid

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

    def __init__(
        self, engine: Engine, settings: ServerSettings, rag: RagService | None = None, metrics: Metrics | None = None
    ):
        self.engine = engine
        self.settings = settings
        self.rag = rag
        self.metrics = metrics or Metrics()
        self.tokenizer = engine.tokenizer
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="redknot-io")
        self.draining = False
        self.jobs: dict[str, Job] = {}  # in flight, by rid (event loop thread only)
        self.started = time.time()
        self._probe: concurrent.futures.Future | None = None  # a no-op engine task: done when the loop is live
        self._probe_since = 0.0
        self.model_name = settings.served_model_name or engine.runner.name
        self.model_dir, self.weights_note = _model_dir_and_note(engine)
        self._add_gauges()

    def _add_gauges(self) -> None:
        e, m = self.engine.runner, self.metrics
        eng = self.engine
        m.add_gauge("redknot_num_requests_waiting", "Requests waiting for admission.", lambda: eng.num_waiting)
        m.add_gauge("redknot_num_requests_running", "Requests in the running batch.", lambda: eng.num_running)
        m.add_gauge("redknot_kv_pool_pages", "KV pool size in (layer, head) pages.", lambda: e.num_pages)
        m.add_gauge("redknot_kv_pool_free_pages", "Free KV pool pages.", lambda: e.free_pages)
        m.add_gauge(
            "redknot_kv_cache_usage_perc",
            "Share of KV pool pages in use (0-1).",
            lambda: 1.0 - e.free_pages / max(e.num_pages, 1),
        )
        for key, name, text in (
            ("global_bytes", "redknot_kv_pool_global_bytes", "KV pool bytes live sequences hold for global heads."),
            ("local_bytes", "redknot_kv_pool_local_bytes", "KV pool bytes live sequences hold for windowed heads."),
            ("saved_bytes", "redknot_kv_pool_window_saved_bytes", "KV pool bytes pool windows released."),
        ):
            m.add_gauge(name, text, functools.partial(_window_stat, e, key))
        if self.rag is not None:
            m.add_store(self.rag.store.stats)

    @property
    def default_policy(self) -> str | None:
        """The reuse policy `/query` and automatic reuse use when a request names none."""
        return self.rag.default_policy if self.rag is not None else None

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
        if len(inp.stop_regex) > MAX_STOP_REGEXES:
            raise ApiError(400, f"stop_regex: at most {MAX_STOP_REGEXES} patterns, got {len(inp.stop_regex)}")
        longest = max(map(len, inp.stop_regex), default=0)
        if longest > MAX_STOP_REGEX_CHARS:
            raise ApiError(400, f"stop_regex: a pattern has {longest} characters; the limit is {MAX_STOP_REGEX_CHARS}")
        self.check_limits_params(inp.params)

    def check_limits_params(self, params: SamplingParams) -> None:
        mnt = params.max_new_tokens
        if not isinstance(mnt, int) or mnt < 0:
            raise ApiError(400, f"max_new_tokens must be a non-negative integer, got {mnt}")
        if mnt > self.settings.max_new_tokens_limit:
            raise ApiError(
                400, f"max_new_tokens {mnt} exceeds this server's limit of {self.settings.max_new_tokens_limit}"
            )
        if len(params.stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(params.stop)}")
        longest = max(map(len, params.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise ApiError(400, f"stop: a string has {longest} characters; the limit is {MAX_STOP_CHARS}")
        mc = self.engine.model_config
        outside = [t for t in params.stop_token_ids if t >= mc.vocab_size]
        if outside:
            raise ApiError(400, f"stop_token_ids: {outside[0]} is outside the vocabulary [0, {mc.vocab_size})")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(mc.eos_token_ids))
        if params.min_new_tokens > 0 and len(stops) >= mc.vocab_size:
            raise ApiError(
                400,
                "min_new_tokens cannot be met: stop_token_ids (with the end-of-sequence tokens) cover every "
                "token of the vocabulary, so no token may be sampled before the minimum length",
            )

    def build(self, inp: GenInput) -> Job:
        """Validate and build a Job (not submitted). Runs on an executor thread (reuse may load KV)."""
        self.check_limits(inp)
        p = inp.params
        grammar = Grammar.from_params(p)
        processor = None
        if grammar is not None:  # compiled (validated) before any KV is assembled
            mc = self.engine.model_config
            backend = GrammarBackend.of(self.tokenizer, mc.vocab_size, tuple(mc.eos_token_ids))
            processor = backend.processor(grammar)
        stop_regex = [compile_stop_regex(s) for s in inp.stop_regex]
        kw = dict(
            return_logprob=inp.return_logprob,
            logprob_start_len=inp.logprob_start_len,
            top_logprobs_num=inp.top_logprobs_num,
        )
        req: Request | None = None
        # A key bound to namespaces reuses only chunks stored there (else `cached_tokens` would tell it
        # which texts other tenants store); `namespaces` None: an unbound key, any namespace.
        if self.rag is not None and inp.allow_reuse:
            bound = None if inp.namespaces is None else set(inp.namespaces)
            req = self.rag.build_request(inp.prompt_ids, p, namespaces=bound, **kw)
        if req is not None:
            if inp.return_logprob and req.prefix_len > max(inp.logprob_start_len, 0):
                self.discard(req)  # reused prompt tokens have no logits: prefill them to answer logprobs
                req = None
        if req is None:
            req = self.engine.make_request(inp.prompt_ids, p, **kw)
        if inp.rid:
            req.rid = engine_rid(inp.owner, inp.rid)
        if processor is not None:
            req.logits_processor = processor  # called by Engine._emit
        return Job(req, stop_regex, owner=inp.owner, client_rid=inp.rid)

    async def start(self, inputs: list[GenInput]) -> list[Job]:
        """Build and submit every input; all or none (a failure aborts those already submitted)."""
        if self.draining:
            raise ApiError(503, "server is shutting down")
        rids = [engine_rid(inp.owner, inp.rid) for inp in inputs if inp.rid]
        if len(set(rids)) != len(rids) or any(r in self.jobs for r in rids):  # only the caller's own rids
            raise ApiError(400, "rid is already in use by a request in flight; rids must be unique")
        jobs: list[Job] = []
        try:
            for inp in inputs:
                jobs.append(await self.run_blocking(self.build, inp))
        except BaseException:
            for j in jobs:
                await self.run_blocking(self.discard, j.req)
            raise
        return await self.submit(jobs)

    async def submit(self, jobs: list[Job]) -> list[Job]:
        """Submit built jobs, all or none: every API's requests (the RAG `/query` one included) enter the
        engine here. On overload, those already submitted are aborted and the rest discarded (the engine
        releases the refused one itself), so no assembled page outlives the 429."""
        if self.draining:
            for j in jobs:
                await self.run_blocking(self.discard, j.req)
            raise ApiError(503, "server is shutting down")
        loop = asyncio.get_running_loop()
        submitted: list[Job] = []
        try:
            for job in jobs:
                job.req.events = _LoopQueue(loop)
                self.engine.submit(job.req)
                submitted.append(job)
                self.jobs[job.rid] = job
        except EngineOverloadedError as e:
            for j in submitted:  # refused as a whole: none of its rids stays in use, abortable or drained for
                self.engine.abort(j.rid)
                j.is_finished, j.finish_reason, j.observed = True, {"type": "abort"}, True
                if self.jobs.get(j.rid) is j:
                    del self.jobs[j.rid]
            for j in jobs[len(submitted) + 1 :]:
                await self.run_blocking(self.discard, j.req)
            self.metrics.count_rejected("queue_full")
            raise ApiError(429, f"server overloaded: {e}; retry later", {"Retry-After": "1"}) from e
        return jobs

    def discard(self, req: Request) -> None:
        """Give back what a built but never submitted request holds (reuse may have assembled KV pages)."""
        self.engine.discard(req)

    # ---- consuming ------------------------------------------------------------------------
    def _next_event(self, job: Job) -> TokenEvent | None:
        try:
            return job.req.events.get_nowait()
        except queue.Empty:
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
                        log.info("client disconnected", extra={"rid": job.public_rid, "owner": job.owner})
                        return
                ev = self._next_event(job)
                if ev is None:
                    bridge.ready.clear()
                    if bridge.empty():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(bridge.ready.wait(), _WAKE_S)
                    continue
                job.num_tokens_seen += not ev.finished
                hit = await self._search_stop_regex(job, ev)
                out = self._apply(job, ev, hit)
                if out is not None:
                    yield out
        finally:
            if not job.is_finished:
                self.engine.abort(job.rid)
                job.is_finished = True
                job.finish_reason = {"type": "abort"}
                self.observe(job)

    async def _search_stop_regex(self, job: Job, ev: TokenEvent) -> tuple[int, str] | None:
        """(start, pattern) of the first stop regex match in the output with `ev`'s text, searched on an
        executor thread (the `regex` module releases the GIL) within the job's time budget. A search
        over its time fails the job with a 400 naming the pattern; None when nothing matches."""
        if not job.stop_regex or not ev.text or ev.finished or job.finish_reason is not None:
            return None
        text = job.text + ev.text
        t0 = time.perf_counter()
        try:
            hit = await self.run_blocking(
                _search, job.stop_regex, text, min(STOP_REGEX_SEARCH_S, job.stop_regex_budget_s)
            )
        except TimeoutError as e:
            job.error, job.error_status = f"stop_regex '{e}' took too long to search the output; simplify it", 400
            job.finish_reason = {"type": "abort"}
            self.engine.abort(job.rid)
            return None
        finally:
            job.stop_regex_budget_s -= time.perf_counter() - t0
        return hit

    def _apply(self, job: Job, ev: TokenEvent, hit: tuple[int, str] | None = None) -> TokenEvent | None:
        """Track text and finish; `hit` is a stop regex match (`_search_stop_regex`) in the text with `ev`'s.
        Returns the event to show, or None."""
        if job.finish_reason is not None and not ev.finished:
            return None  # a stop regex already ended it; waiting for the engine's abort
        if ev.finished:
            job.is_finished = True
            if job.finish_reason is None:
                job.finish_reason = ev.finish_reason
            job.error = ev.error or job.cancel_error or job.error
            if job.error and job.cancel_error:
                job.error_status = 503
            self.observe(job)
            return TokenEvent(ev.token_id, "", ev.logprob, True, job.finish_reason, job.error)
        text = job.text + ev.text
        if hit is not None:
            cut = text[: hit[0]]
            delta = cut[len(job.text) :]
            job.text = cut
            job.finish_reason = {"type": "stop", "matched": hit[1]}
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
        if self.jobs.get(job.rid) is job:
            del self.jobs[job.rid]
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
            reuse=r.reuse,
        )
        log.info(
            "request finished",
            extra={
                "rid": job.public_rid,  # the client's own rid (with "owner": the engine scopes it by key)
                "prompt_tokens": r.prompt_len,
                "completion_tokens": len(r.output_ids),
                "cached_tokens": r.cached_tokens,
                "finish": finish_reason_label(job.finish_reason),
                "owner": job.owner,
                "ttft_ms": None if r.ttft is None else round(r.ttft * 1e3, 1),
                "e2e_ms": round(e2e * 1e3, 1),
                **({"error": job.error} if job.error else {}),
            },
        )

    def raise_if_failed(self, jobs: list[Job]) -> None:
        for j in jobs:
            if j.error:
                raise ApiError(j.error_status, f"request {j.public_rid} failed: {j.error}")

    # ---- draining and health ----------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop taking work (new requests and /health answer 503); in-flight requests go on."""
        if not self.draining:
            self.draining = True
            log.info("draining: refusing new requests", extra={"in_flight": len(self.jobs)})

    def cancel_in_flight(self, why: str) -> int:
        """Abort every request still in flight; each one's client gets an explicit error (SSE error
        event, or a 503 body), never a silently dropped connection. Returns how many."""
        for job in list(self.jobs.values()):
            job.cancel_error = why
            self.engine.abort(job.rid)
        return len(self.jobs)

    async def engine_stalled(self) -> float | None:
        """Seconds the engine thread has not answered a no-op task (run between steps), when that
        exceeds `health_stall_s`; None when it is live. At most one probe is outstanding."""
        if self._probe is None or self._probe.done():
            self._probe_since = time.monotonic()
            self._probe = self.executor.submit(self.engine.ping)
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._probe)), 1.0)  # never cancels it
        waited = time.monotonic() - self._probe_since
        if self._probe.done() or waited < self.settings.health_stall_s:
            return None
        return waited

    def shutdown(self) -> None:
        self.draining = True
        self.cancel_in_flight("server shut down")
        self.engine.shutdown(cancel=True)
        self.executor.shutdown(wait=False, cancel_futures=True)


def engine_rid(owner: str, rid: str) -> str:
    """The engine's rid for a client's `rid`: scoped by the caller's name (never its key), so keys never
    collide on, squat or probe each other's rids."""
    return f"{owner}/{rid}" if owner else rid


def _search(patterns: list[regex.Pattern], text: str, timeout_s: float) -> tuple[int, str] | None:
    """(start, pattern) of the first pattern that matches `text`; TimeoutError(pattern) past `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    for rx in patterns:
        try:
            m = rx.search(text, timeout=max(deadline - time.perf_counter(), 1e-3), concurrent=True)
        except TimeoutError:
            raise TimeoutError(rx.pattern) from None
        if m is not None:
            return m.start(), rx.pattern
    return None


def _model_dir_and_note(engine: Engine) -> tuple[str, str]:
    """(a local HF directory holding config + tokenizer, a note on where the weights came from)."""
    from redknot_rag.loader import resolve_model_dir

    path = getattr(engine.config, "model_path", None)
    dtype = str(engine.runner.dtype).replace("torch.", "")
    try:
        model_dir = str(resolve_model_dir(path)[0])
    except Exception:  # a model handed in already loaded: no directory to point at
        model_dir = engine.runner.name
    if path is None or str(path).endswith(".gguf"):
        quant = engine.runner.name.rpartition(".")[2] if "." in engine.runner.name else "quantized"
        bits = f" ({quant[1]}-bit)" if quant[:1] == "Q" and quant[1:2].isdigit() else ""
        return model_dir, f"GGUF {quant}{bits} weights, dequantized to {dtype} at load"
    return model_dir, f"Hugging Face weights in {dtype}"


@functools.lru_cache(maxsize=1 << 16)
def _decode_one(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def sampling_from_fields(fields: dict[str, Any]) -> SamplingParams:
    """Validated SamplingParams from SGLang-named fields (None means default); errors become 400."""
    kw = {k: v for k, v in fields.items() if v is not None}
    for key in ("stop", "stop_token_ids"):
        if key in kw:
            v = kw[key]
            kw[key] = (v,) if isinstance(v, str) else tuple(v)
    try:
        params = SamplingParams(**kw)
    except TypeError as e:
        raise InvalidRequestError(str(e)) from e
    params.validate(max_new_tokens_limit=1 << 62)  # the server's own limit: Runtime.check_limits_params
    return params


def _window_stat(runner: Any, key: str) -> float:
    """One number of the runner's pool-window accounting (a /metrics gauge)."""
    return float(runner.pool_window_stats()[key])
