"""The engine: continuous batching (chunked prefill mixed with decode) over the paged KV pool.

One thread owns the model, the pool and the scheduler state (`step`); other threads only
`submit` / `abort` requests and read their event queues.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.config import EngineConfig, ModelConfig
from redknot_rag.loader import LoadedModel
from redknot_rag.request import Request, RequestStatus, TokenEvent
from redknot_rag.runner import KVRunner
from redknot_rag.sampling import InvalidRequestError, SamplingParams, apply_penalties, sample_token

if TYPE_CHECKING:
    from redknot_rag.server.constrained import StepGrammarMask

log = logging.getLogger("redknot.engine")


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later (HTTP 429/503)."""


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
        self.config = self.runner.config
        self.model_config: ModelConfig = self.runner.model_config
        self.tokenizer = self.runner.tokenizer
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._reserved_pages = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._tasks: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self.last_step = StepStats()
        self.total_requests = 0

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def is_looping(self) -> bool:
        """Whether a background loop thread drives the steps (else callers drive `step()`)."""
        return self._thread is not None

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
            from dataclasses import replace

            req.params = replace(params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))
        need = self.runner.reservation_pages(n - req.prefix_len + req.params.max_new_tokens + 1)
        if need > self.runner.pool.num_pages:
            raise InvalidRequestError(
                f"request needs {need} KV pages but the pool has {self.runner.pool.num_pages}; shorten it"
            )
        if req.params.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(req.params.seed)
        return req

    def submit(self, req: Request) -> Request:
        """Queue `req`. From here on the engine owns its pages; if the queue is full, its reused context
        is released before `EngineOverloadedError` is raised, so a refused request leaks nothing."""
        with self._lock:
            full = len(self._waiting) >= self.config.max_queued_requests
            if not full:
                self._waiting.append(req)
                self.total_requests += 1
                self._wakeup.notify()
        if full:
            self.discard(req)
            raise EngineOverloadedError(f"{self.config.max_queued_requests} requests already queued")
        return req

    def discard(self, req: Request) -> None:
        """Release the reused context of a request that will never run (idempotent; any thread)."""
        reuse = req.reuse
        if reuse is not None and reuse.kv is not None:
            kv, reuse.kv = reuse.kv, None
            self.call(lambda: self.runner.release(kv))

    def abort(self, rid: str) -> None:
        with self._lock:
            for r in list(self._waiting) + self._running:
                if r.rid == rid:
                    r.aborted = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._tasks)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the thread that owns the pool (between steps) and return its result.

        Work that writes the KV pool outside `step` (chunk prefill for the store, reuse recompute)
        goes through here so that only one thread ever touches the pool.
        """
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._lock:
            self._tasks.append((fn, fut))
            self._wakeup.notify()
        return fut.result()

    def _run_tasks(self, max_tasks: int | None = None) -> None:
        """Run queued `call` tasks; at most `max_tasks` so that steps of running requests interleave."""
        done = 0
        while self._tasks and (max_tasks is None or done < max_tasks):
            done += 1
            with self._lock:
                fn, fut = self._tasks.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to the caller
                    fut.set_exception(e)

    # ---- scheduling -----------------------------------------------------------------------
    def _reservation(self, req: Request) -> int:
        # per head class: local blocks of a windowed pool reserve only sink + window + a chunk (window.py)
        return self.runner.reservation_pages(req.prompt_len - req.prefix_len + req.params.max_new_tokens + 1)

    def _admit(self) -> None:
        """Move waiting requests to running while the page reservation and the running cap allow."""
        with self._lock:
            while self._waiting and len(self._running) < self.config.max_running_requests:
                req = self._waiting[0]
                if req.aborted:
                    self._waiting.popleft()
                    self.discard(req)
                    self._finish(req, {"type": "abort"})
                    continue
                need = self._reservation(req)
                if self._reserved_pages + need > self.runner.allocator.num_free + self._reserved_used():
                    break
                self._waiting.popleft()
                self._reserved_pages += need
                self._start(req)
                self._running.append(req)

    def _reserved_used(self) -> int:
        """Pages already taken by running requests out of their reservations."""
        return sum(self.runner.private_pages(r.kv) for r in self._running if r.kv)  # window releases excluded

    def _start(self, req: Request) -> None:
        if req.reuse is not None and req.reuse.kv is not None:
            req.kv, req.reuse.kv = req.reuse.kv, None
            req.num_computed = req.reuse.num_tokens
        else:
            req.kv = self.runner.new_seq_kv()
            req.num_computed = 0
        req.status = RequestStatus.PREFILL

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

    def step(self, only: set[str] | None = None) -> StepStats:
        """Run one forward over a mixed batch (all decodes + prefill chunks up to the token budget).

        `only` restricts the step to those request ids (a benchmark measuring one request's latency).
        """
        t0 = time.perf_counter()
        self._admit()
        for r in [r for r in self._running if r.aborted]:
            self._drop(r, {"type": "abort"})
        decodes = [r for r in self._running if r.is_prefill_done and (only is None or r.rid in only)]
        budget = max(self.config.max_prefill_tokens - len(decodes), 1)
        plan: list[tuple[Request, int]] = [(r, 1) for r in decodes]
        # prefills shortest-remaining first: a short prompt that arrives while a long one is mid-prefill
        # gets its first token within a step or two instead of waiting for the long prefill to finish
        # (the long one yields between its chunks; an aborted one is dropped at the next step)
        prefills = sorted(
            (r for r in self._running if not r.is_prefill_done), key=lambda r: r.prompt_len - r.num_computed
        )
        for r in prefills:
            if budget <= 0 or (only is not None and r.rid not in only):
                continue
            take = min(r.prompt_len - r.num_computed, budget)
            plan.append((r, take))
            budget -= take
        if not plan:
            return StepStats()
        try:
            self._run_batch(plan)
        except Exception as e:  # a failing batch fails its requests, not the engine
            log.exception("batch failed")
            for r, _ in plan:
                self._drop(r, {"type": "abort"}, error=f"{type(e).__name__}: {e}")
        self.last_step = StepStats(
            len(decodes), sum(n for r, n in plan if not r.is_prefill_done or n > 1), time.perf_counter() - t0
        )
        return self.last_step

    def _drop(self, req: Request, reason: dict, error: str | None = None) -> None:
        if req in self._running:
            self._running.remove(req)
            self._reserved_pages -= self._reservation(req)
        self._finish(req, reason, error)

    def _run_batch(self, plan: list[tuple[Request, int]]) -> None:
        ids: list[int] = []
        pos: list[int] = []
        slices: list[SeqSlice] = []
        logit_rows: list[int] = []
        # (request, kind, rows): kind "sample" → last row samples; "input" → prompt logprob rows
        wants: list[tuple[Request, list[int], list[int], bool]] = []
        for req, n in plan:
            assert req.kv is not None
            q0 = len(ids)
            if req.is_prefill_done:
                toks = [req.output_ids[-1]]
                p0 = req.kv.num_tokens
            else:
                toks = req.prompt_ids[req.num_computed : req.num_computed + n]
                p0 = req.num_computed
            positions = torch.arange(p0, p0 + len(toks), dtype=torch.int64)
            reuse = req.reuse
            pending = reuse.pending if reuse is not None and not req.is_prefill_done else None
            if reuse is not None and pending is not None:
                # deferred recompute: the selected context tokens go first in this forward (queries inside
                # the context, copy-on-write slots), then the question tokens at the tail, which see them
                reuse.pending = None
                cow = self.runner.override(req.kv, pending)
                k_pos = req.kv.positions[pending.to(req.kv.device)].cpu()
                ids.extend(req.prompt_ids[i] for i in pending.tolist())
                pos.extend(k_pos.tolist())
                new_slots = torch.cat([cow, self.runner.append(req.kv, positions)], dim=2)
                slices.append(req.kv.slice(q0, int(pending.numel()) + len(toks), new_slots))
                q0 += int(pending.numel())
            else:
                new_slots = self.runner.append(req.kv, positions)
                slices.append(req.kv.slice(q0, len(toks), new_slots))
            ids.extend(toks)
            pos.extend(range(p0, p0 + len(toks)))
            rows: list[int] = []
            targets: list[int] = []
            if not req.is_prefill_done and req.return_logprob and req.logprob_start_len >= 0:
                # row i predicts prompt token at (num_computed + i + 1)
                for i in range(len(toks)):
                    tgt = req.num_computed + i + 1
                    if req.logprob_start_len <= tgt < req.prompt_len:
                        rows.append(q0 + i)
                        targets.append(req.prompt_ids[tgt])
            completes = req.is_prefill_done or req.num_computed + n >= req.prompt_len
            if completes and (q0 + len(toks) - 1) not in rows:
                rows.append(q0 + len(toks) - 1)
                targets.append(-1)
            start = len(logit_rows)
            logit_rows.extend(rows)
            wants.append((req, list(range(start, start + len(rows))), targets, completes))
        batch = ForwardBatch(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(pos, dtype=torch.int64),
            slices,
            torch.tensor(logit_rows, dtype=torch.int64),
        )
        step_mask = self._start_grammar_masks(wants, len(logit_rows))  # filled while the forward runs
        try:
            out = self.runner.forward(batch)  # [M, vocab] float32, on the model's device
        finally:
            if step_mask is not None:
                step_mask.wait()  # no matcher is touched again before its fill is done
        for req, _ in plan:  # local blocks drop the pages that fell out of their window (window.py)
            if req.kv is not None:
                self.runner.slide(req.kv)
        # Greedy requests without logprobs/penalties/constraints only need the argmax: skip moving
        # [M, vocab] logits to the host (at batch 64 x 128K vocab that dominated the decode step).
        needs_logits = any(
            (not self._is_fast(req)) or any(t >= 0 for t in targets)
            for (req, _), (_, _, targets, _) in zip(plan, wants)
        )
        greedy = out.argmax(-1).tolist() if out.shape[0] else []
        logits = out.cpu() if needs_logits else None
        if step_mask is not None and logits is not None:
            try:
                step_mask.apply(logits)  # one call for every constrained row
            except Exception:  # each processor then masks its own row, and a failure fails it alone
                log.exception("batch grammar mask failed")
        now = time.perf_counter()
        for (req, n), (_, lrows, targets, completes) in zip(plan, wants):
            was_prefill = not req.is_prefill_done
            if was_prefill:
                if req.return_logprob and req.logprob_start_len >= 0 and req.num_computed == 0:
                    if req.logprob_start_len == 0:  # the first token has no context; report 0.0
                        req.input_token_logprobs.append((0.0, req.prompt_ids[0]))
                        req.input_top_logprobs.append([])
                for li, tgt in zip(lrows, targets):
                    if tgt >= 0:
                        assert logits is not None
                        lp = logits[li].log_softmax(-1)
                        req.input_token_logprobs.append((float(lp[tgt]), tgt))
                        if req.top_logprobs_num > 0:
                            req.input_top_logprobs.append(self._topk(lp, req.top_logprobs_num))
                req.num_computed += n
            if completes:
                if was_prefill and req.params.max_new_tokens == 0:
                    self._drop(req, {"type": "length", "length": 0})
                    continue
                if was_prefill:
                    req.status = RequestStatus.DECODE
                if logits is None:
                    self._emit(req, None, now, token=greedy[lrows[-1]])
                else:
                    self._emit(req, logits[lrows[-1]], now)

    def _start_grammar_masks(
        self, wants: list[tuple[Request, list[int], list[int], bool]], num_rows: int
    ) -> StepGrammarMask | None:
        """Start filling, on a worker thread, one bitmask `[num_rows, ceil(vocab/32)]` for every request
        of this step that samples under a grammar (`StepGrammarMask`); None if there is none."""
        if all(req.logits_processor is None for req, *_ in wants):
            return None
        from redknot_rag.server.constrained import GrammarProcessor, StepGrammarMask  # xgrammar: only when used

        members = []
        for req, lrows, _, completes in wants:
            proc = req.logits_processor
            if not (completes and isinstance(proc, GrammarProcessor)):
                continue
            try:
                if proc.sync(req.output_ids):  # dead/terminated ones allow only stop tokens: no mask
                    members.append((proc, lrows[-1], len(req.output_ids)))
            except Exception:  # its own call in `_emit` fails it alone
                log.exception("grammar sync failed", extra={"rid": req.rid})
        if not members:
            return None
        return StepGrammarMask(members, num_rows, members[0][0].vocab_size).start()

    @staticmethod
    def _topk(lp: torch.Tensor, k: int) -> list[tuple[float, int]]:
        v, i = lp.topk(k)
        return [(float(a), int(b)) for a, b in zip(v, i)]

    @staticmethod
    def _is_fast(req: Request) -> bool:
        """Whether the next token is plain argmax (no logprobs, penalties, constraints, min length)."""
        p = req.params
        return (
            p.is_greedy
            and not req.return_logprob
            and req.logits_processor is None
            and p.frequency_penalty == 0
            and p.presence_penalty == 0
            and p.repetition_penalty == 1
            and len(req.output_ids) >= p.min_new_tokens
        )

    def _emit(self, req: Request, logits: torch.Tensor | None, now: float, token: int | None = None) -> None:
        """`_sample_next`, isolated: a sampler or logits-processor error fails `req` alone, with its own
        error event, and the other requests of the batch go on."""
        try:
            self._sample_next(req, logits, now, token)
        except Exception as e:
            log.exception("request failed while sampling", extra={"rid": req.rid})
            if not req.is_finished:
                self._drop(req, {"type": "abort"}, error=f"{type(e).__name__}: {e}")

    def _sample_next(self, req: Request, logits: torch.Tensor | None, now: float, token: int | None = None) -> None:
        """Sample the next token of `req` from its logits `[vocab]` (or take the precomputed greedy
        `token` on the fast path) and check stop conditions."""
        p = req.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.model_config.eos_token_ids))
        if logits is None:
            assert token is not None
            self._accept(req, token, None, stop_ids, now)
            return
        logits = apply_penalties(logits, p, req.output_ids)
        if len(req.output_ids) < p.min_new_tokens and stop_ids:
            masked = logits.clone()
            masked[[t for t in stop_ids if t < masked.shape[-1]]] = float("-inf")
            if masked.amax() > float("-inf"):  # stops covering every token: the stop wins, never a NaN
                logits = masked
        if req.logits_processor is not None:  # constrained decoding, observers
            logits = req.logits_processor(req, logits)
        tok = sample_token(logits, p, req.generator)
        lp = logits.log_softmax(-1)
        if req.return_logprob:
            req.output_token_logprobs.append((float(lp[tok]), tok))
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(self._topk(lp, req.top_logprobs_num))
        self._accept(req, tok, float(lp[tok]), stop_ids, now)

    def _accept(self, req: Request, tok: int, logprob: float | None, stop_ids: set[int], now: float) -> None:
        """Append a sampled token, update the streamed text and finish on stop/length."""
        p = req.params
        req.output_ids.append(tok)
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        reason: dict | None = None
        if tok in stop_ids:
            reason = {"type": "stop", "matched": tok}
        text = self.tokenizer.decode(
            req.output_ids[:-1] if reason else req.output_ids, skip_special_tokens=p.skip_special_tokens
        )
        if p.stop and reason is None:
            hits = [(text.find(s), s) for s in p.stop if s and s in text]
            if hits:
                cut, s = min(hits)
                text = text[:cut]
                reason = {"type": "stop", "matched": s}
        if reason is None and len(req.output_ids) >= p.max_new_tokens:
            reason = {"type": "length", "length": p.max_new_tokens}
        # hold back a possible partial stop string at the end of streamed text
        hold = 0
        if reason is None and p.stop:
            for s in p.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        visible = text[: len(text) - hold] if hold else text
        if reason is not None:
            visible = text
        elif visible.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for more tokens
            visible = req.output_text
        delta = visible[len(req.output_text) :] if visible.startswith(req.output_text) else ""
        req.output_text = visible
        req.events.put(TokenEvent(tok, delta, logprob))
        if reason is not None:
            self._drop(req, reason)

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
        self._thread = threading.Thread(target=self._loop, name="redknot-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                while not self._stop and not (self._waiting or self._running or self._tasks):
                    self._wakeup.wait(timeout=0.5)
            if self._stop:
                break
            try:
                self._run_tasks(max_tasks=1)  # one RAG assembly per step: decodes keep flowing
                self.step()
            except Exception:  # never let the loop die
                log.exception("engine step failed")
                time.sleep(0.01)

    def shutdown(self, cancel: bool = True) -> None:
        """Stop the loop; with `cancel`, abort what is still queued or running."""
        if cancel:
            with self._lock:
                for r in list(self._waiting) + self._running:
                    r.aborted = True
            deadline = time.time() + 5
            while self._thread is not None and self.has_work() and time.time() < deadline:
                time.sleep(0.01)
        self._stop = True
        with self._lock:
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:  # nobody will run these now: fail them instead of leaving callers blocked
            while self._tasks:
                _, fut = self._tasks.popleft()
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError("engine shut down"))

    def info(self) -> dict:
        return self.runner.info()
