"""The engine: continuous batching (chunked prefill mixed with decode) over the paged KV pool.

One thread owns the model, the pool and the scheduler state (`step`); other threads only
`submit` / `abort` requests, hand pool work over (`run_store_work`, `assemble`) and read their
event queues. A step is: admission and plan (`scheduler`), the batch (`batch_builder`), the
forward (the runner), tokens and text (`output`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from redknot_rag.config import EngineConfig, ModelConfig
from redknot_rag.engine.batch_builder import build_batch
from redknot_rag.engine.handoff import AssemblyWork, Stages, StoreWork, WorkQueue, run_store_work
from redknot_rag.engine.output import OutputStage, start_grammar_masks
from redknot_rag.engine.scheduler import EngineOverloadedError, Scheduler
from redknot_rag.loader import LoadedModel
from redknot_rag.request import Request, RequestStatus, TokenEvent
from redknot_rag.runner import KVRunner
from redknot_rag.sampling import InvalidRequestError, SamplingParams

log = logging.getLogger("redknot.engine")
T = TypeVar("T")

# engine-thread seconds given to queued assemblies between two steps while requests decode
ASSEMBLY_SLICE_S = 0.1
# a looping engine serves streams: while requests decode, a step's prefill is cut to about this long
# (`StepBudget`); an engine driven by `generate` keeps whole prefill chunks (throughput)
STREAM_ITL_TARGET_S = 0.5


@dataclass
class StepStats:
    num_decode: int = 0
    num_prefill_tokens: int = 0
    seconds: float = 0.0


class Engine:
    """Serve one model. `generate()` drives steps itself; `start()` runs a background loop for servers."""

    def __init__(
        self, config: EngineConfig | None = None, loaded: LoadedModel | None = None, runner: KVRunner | None = None
    ) -> None:
        self.runner = runner or KVRunner(config, loaded)
        config = self.runner.config
        self.model_config: ModelConfig = self.runner.model_config
        self.tokenizer = self.runner.tokenizer
        self.scheduler = Scheduler(self.runner, config, self.discard)
        self.output = OutputStage(self.tokenizer, self.model_config.eos_token_ids, self._drop)
        self._lock = self.scheduler.lock
        self._wakeup = self.scheduler.wakeup
        self.work = WorkQueue(self._notify)
        self.assembly_slice_s = ASSEMBLY_SLICE_S
        self._thread: threading.Thread | None = None
        self._stop = False
        self.last_step = StepStats()
        self.total_requests = 0

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def is_looping(self) -> bool:
        """Whether a background loop thread drives the steps (else callers drive `step()`)."""
        return self._thread is not None

    def _notify(self) -> None:
        with self._lock:
            self._wakeup.notify()

    def _on_engine_thread(self) -> bool:
        return self._thread is None or threading.current_thread() is self._thread

    # ---- request intake -------------------------------------------------------------------
    def make_request(self, prompt_ids: list[int], params: SamplingParams | None = None, **kw) -> Request:
        """Validate and build a Request (raises InvalidRequestError with a clear message)."""
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise InvalidRequestError("empty prompt: at least one token is required")
        vocab = self.model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        n = len(prompt_ids)
        if n >= self.max_context:
            raise InvalidRequestError(f"prompt has {n} tokens; the model context is {self.max_context} tokens")
        req = Request(list(prompt_ids), params, **kw)
        room = self.max_context - n
        if params.max_new_tokens > room:
            req.params = replace(params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))
        need = self.runner.reservation_pages(n - req.prefix_len + req.params.max_new_tokens + 1)
        if need > self.runner.num_pages:
            raise InvalidRequestError(
                f"request needs {need} KV pages but the pool has {self.runner.num_pages}; shorten it"
            )
        if req.params.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(req.params.seed)
        return req

    @property
    def config(self) -> EngineConfig:
        """The engine's settings: the scheduler's (one copy, so a replaced config reaches admission and
        the step budget)."""
        return self.scheduler.config

    @config.setter
    def config(self, config: EngineConfig) -> None:
        self.scheduler.set_config(config)

    def submit(self, req: Request) -> Request:
        """Queue `req`. From here on the engine owns its pages; if the queue is full, its reused context
        is released before `EngineOverloadedError` is raised, so a refused request leaks nothing."""
        if not self.scheduler.enqueue(req):
            self.discard(req)
            raise EngineOverloadedError(f"{self.config.max_queued_requests} requests already queued")
        self.total_requests += 1
        return req

    def discard(self, req: Request) -> None:
        """Release the reused context of a request that will never run (idempotent; any thread)."""
        reuse = req.reuse
        if reuse is not None and reuse.kv is not None:
            kv, reuse.kv = reuse.kv, None
            self.run_store_work(lambda: self.runner.release(kv))

    def abort(self, rid: str) -> None:
        self.scheduler.abort(rid)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def _reserved_pages(self) -> int:
        return self.scheduler.reserved_pages

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.work)

    # ---- hand-off of pool work ------------------------------------------------------------
    def run_store_work(self, fn: Callable[[], T]) -> T:
        """Run `fn` (store upkeep that writes the pool: a chunk prefill at ingest, a cache entry dropped,
        flushed or closed) on the engine thread between two steps, and return its result."""
        work: StoreWork[T] = StoreWork(fn)
        if self._on_engine_thread():
            run_store_work(work)
        else:
            self.work.put(work)
        return work.future.result()

    def assemble(self, stages: Stages[T], cancel: threading.Event | None = None) -> T:
        """Run a request's assembly (`stages`: a generator that yields between its stages and returns the
        result) on the engine thread, in time slices between steps, and return its result. Raises
        `AssemblyCancelled` if `cancel` is set first (the assembly's own cleanup has run by then)."""
        work: AssemblyWork[T] = AssemblyWork(stages, cancel)
        if self._on_engine_thread():
            return work.run_all()
        self.work.put(work)
        return work.future.result()

    def ping(self) -> None:
        """A no-op round trip through the engine thread's hand-off (liveness: /health)."""
        self.run_store_work(lambda: None)

    # ---- stepping -------------------------------------------------------------------------
    def _finish(self, req: Request, reason: dict | None, error: str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finish_time = time.perf_counter()
        if req.kv is not None:
            self.runner.release(req.kv)
            req.kv = None
        req.events.put(TokenEvent(None, "", finished=True, finish_reason=reason, error=error))
        req.done.set()

    def _drop(self, req: Request, reason: dict, error: str | None = None) -> None:
        self.scheduler.remove(req)
        self._finish(req, reason, error)

    def step(self, only: set[str] | None = None) -> StepStats:
        """Run one forward over a mixed batch (all decodes + prefill chunks up to the token budget).

        `only` restricts the step to those request ids (a benchmark measuring one request's latency).
        """
        t0 = time.perf_counter()
        self.scheduler.admit(lambda r: self._finish(r, {"type": "abort"}))
        for r in [r for r in self.scheduler.running if r.aborted]:
            self._drop(r, {"type": "abort"})
        plan = self.scheduler.plan(only)
        if not plan:
            return StepStats()
        num_decode = sum(1 for it in plan if it.req.is_prefill_done)
        prefill_tokens = sum(it.num_recompute + it.num_tokens for it in plan if not it.req.is_prefill_done)
        try:
            self._run_batch(plan)
        except Exception as e:  # a failing batch fails its requests, not the engine
            log.exception("batch failed")
            for it in plan:
                self._drop(it.req, {"type": "abort"}, error=f"{type(e).__name__}: {e}")
        seconds = time.perf_counter() - t0
        self.scheduler.budget.observe(prefill_tokens, num_decode, seconds)
        self.last_step = StepStats(num_decode, prefill_tokens, seconds)
        return self.last_step

    def _run_batch(self, plan) -> None:
        built = build_batch(self.runner, plan)
        step_mask = start_grammar_masks(built)  # filled while the forward runs
        try:
            out = self.runner.forward(built.batch)  # [M, vocab] float32, on the model's device
        finally:
            if step_mask is not None:
                step_mask.wait()  # no matcher is touched again before its fill is done
        for it in plan:  # local blocks drop the pages that fell out of their window (window.py)
            if it.req.kv is not None:
                self.runner.slide(it.req.kv)
        self.output.process(built, out, step_mask)

    # ---- driving --------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None, **kw
    ) -> list[Request]:
        """Run requests to completion (drives steps itself unless a loop thread is running)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = [self.submit(self.make_request(p, sp, **kw)) for p, sp in zip(prompts, plist)]
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.is_finished for r in reqs):
                self.step()
        return reqs

    def start(self) -> None:
        """Run steps in a background thread until `shutdown()`."""
        if self._thread is not None:
            return
        self._stop = False
        if self.scheduler.budget.itl_target_s is None:
            self.scheduler.budget.itl_target_s = STREAM_ITL_TARGET_S
        self._thread = threading.Thread(target=self._loop, name="redknot-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                while not self._stop and not self.has_work():
                    self._wakeup.wait(timeout=0.5)
            if self._stop:
                break
            try:
                self.work.run_store(max_items=1)
                # assemblies in a time slice while requests decode (their inter-token latency stays
                # bounded); with nothing decoding, until they are done
                decoding = any(r.is_prefill_done for r in self.scheduler.running)
                self.work.run_assemblies(self.assembly_slice_s if decoding else None)
                self.step()
            except Exception:  # never let the loop die
                log.exception("engine step failed")
                time.sleep(0.01)

    def shutdown(self, cancel: bool = True) -> None:
        """Stop the loop; with `cancel`, abort what is still queued or running."""
        if cancel:
            self.scheduler.abort_all()
            deadline = time.time() + 5
            while self._thread is not None and self.has_work() and time.time() < deadline:
                time.sleep(0.01)
        self._stop = True
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.work.fail_all(RuntimeError("engine shut down"))

    def info(self) -> dict:
        return self.runner.info()
