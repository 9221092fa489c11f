"""The scheduler: the waiting queue, admission under page reservations, and each step's plan.

Admission reserves, for each running request, the pages its whole prompt and output can take
(`reservation`), so a running request never runs out of pages. A step's plan holds every decode
(one token each) and prefill work up to the step's token budget, shortest remaining prefill first.
While requests decode, that budget is cut so one step takes about `StepBudget.itl_target_s`: a
long prompt (or a long pending recompute) is spread over several steps instead of stalling every
decode behind one big forward.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from redknot_rag.config import EngineConfig, ModelConfig
from redknot_rag.engine.batch_builder import PlanItem, pending_count
from redknot_rag.request import Request, RequestStatus
from redknot_rag.runner import KVRunner


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later (HTTP 429/503)."""


@dataclass
class StepBudget:
    """Prefill tokens per step.

    `max_tokens` bounds a step's tokens (decodes included). While requests decode, prefill tokens are
    further capped so that a step takes about `itl_target_s`, from a model of the step time measured on
    recent steps: `decode_s` (a step with no prefill) + `sec_per_token` x prefill tokens. On a fast device
    the cap is far above `max_tokens` and changes nothing; on a CPU it keeps decode steps short. Before
    the first measurement the cap is `first_tokens`. Prefill keeps at least as long as the decodes take
    and at least `min_tokens`, so prompts always progress.
    """

    max_tokens: int
    itl_target_s: float | None = None  # None: no cap (a batch driven by `Engine.generate`: throughput)
    min_tokens: int = 32
    first_tokens: int = 128
    decode_s: float = 0.0  # moving average of steps without prefill
    sec_per_token: float = 0.0  # moving average of (step - decode_s) / prefill tokens; 0: not measured

    def observe(self, prefill_tokens: int, num_decodes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        if prefill_tokens == 0:
            self.decode_s = seconds if self.decode_s == 0 else 0.8 * self.decode_s + 0.2 * seconds
            return
        if prefill_tokens < 32:
            return
        s = max(seconds - (self.decode_s if num_decodes else 0.0), 0.25 * seconds) / prefill_tokens
        self.sec_per_token = s if self.sec_per_token == 0 else 0.7 * self.sec_per_token + 0.3 * s

    def prefill_tokens(self, num_decodes: int) -> int:
        room = max(self.max_tokens - num_decodes, 1)
        if num_decodes == 0 or self.itl_target_s is None:
            return room
        if self.sec_per_token == 0:
            cap = self.first_tokens
        else:
            # prompts keep at least as much of a step as the decodes take (a step then lasts at most about
            # twice the decodes): on a machine too slow for the target, time to first token does not starve
            cap = int(max(self.itl_target_s - self.decode_s, self.decode_s) / self.sec_per_token)
        return max(min(room, cap), min(self.min_tokens, room))


class Scheduler:
    """Waiting and running requests of one engine; every method but `enqueue`/`abort` runs on the
    engine thread (or the thread driving `Engine.step`)."""

    def __init__(self, runner: KVRunner, config: EngineConfig, release: Callable[[Request], None]) -> None:
        self.runner = runner
        self.config = config
        self.model_config: ModelConfig = runner.model_config
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.reserved_pages = 0
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.budget = StepBudget(config.max_prefill_tokens)
        self._release = release  # releases an unstarted request's reused context

    def set_config(self, config: EngineConfig) -> None:
        """Replace the settings (tests and benches change limits on a live engine): admission reads them on
        the next step; the step budget's token bound follows `max_prefill_tokens`."""
        with self.lock:
            self.config = config
            self.budget.max_tokens = config.max_prefill_tokens

    # ---- intake (any thread) ---------------------------------------------------------------
    def enqueue(self, req: Request) -> bool:
        """Queue `req`; False if the queue is full."""
        with self.lock:
            if len(self.waiting) >= self.config.max_queued_requests:
                return False
            self.waiting.append(req)
            self.wakeup.notify()
        return True

    def abort(self, rid: str) -> None:
        with self.lock:
            for r in list(self.waiting) + self.running:
                if r.rid == rid:
                    r.aborted = True

    def abort_all(self) -> None:
        with self.lock:
            for r in list(self.waiting) + self.running:
                r.aborted = True

    # ---- admission ---------------------------------------------------------------------------
    def reservation(self, req: Request) -> int:
        # per head class: a windowed pool's local blocks reserve only sink + window + a chunk (window.py)
        return self.runner.reservation_pages(req.prompt_len - req.prefix_len + req.params.max_new_tokens + 1)

    def admit(self, finish_aborted: Callable[[Request], None]) -> None:
        """Move waiting requests to running while the page reservation and the running cap allow."""
        with self.lock:
            while self.waiting and len(self.running) < self.config.max_running_requests:
                req = self.waiting[0]
                if req.aborted:
                    self.waiting.popleft()
                    self._release(req)
                    finish_aborted(req)
                    continue
                need = self.reservation(req)
                if self.reserved_pages + need > self.runner.free_pages + self._reserved_used():
                    break
                self.waiting.popleft()
                self.reserved_pages += need
                self._start(req)
                self.running.append(req)

    def _reserved_used(self) -> int:
        """Pages already taken by running requests out of their reservations."""
        return sum(self.runner.private_pages(r.kv) for r in self.running if r.kv)  # window releases excluded

    def _start(self, req: Request) -> None:
        if req.reuse is not None and req.reuse.kv is not None:
            req.kv, req.reuse.kv = req.reuse.kv, None
            req.num_computed = req.reuse.num_tokens
        else:
            req.kv = self.runner.new_seq_kv()
            req.num_computed = 0
        req.status = RequestStatus.PREFILL

    def remove(self, req: Request) -> None:
        """Take a finished request out of the running set and give back its reservation."""
        if req in self.running:
            self.running.remove(req)
            self.reserved_pages -= self.reservation(req)

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, only: set[str] | None = None) -> list[PlanItem]:
        """This step's work: all decodes, then prefill (pending recompute first, then prompt tokens)
        up to the budget, shortest remaining prefill first: a short prompt that arrives while a long
        one is mid-prefill gets its first token within a step or two (the long one yields between its
        chunks; an aborted one is dropped at the next step)."""
        decodes = [r for r in self.running if r.is_prefill_done and (only is None or r.rid in only)]
        budget = self.budget.prefill_tokens(len(decodes))
        plan = [PlanItem(r, 0, 1) for r in decodes]
        prefills = sorted(
            (r for r in self.running if not r.is_prefill_done),
            key=lambda r: pending_count(r) + r.prompt_len - r.num_computed,
        )
        for r in prefills:
            if budget <= 0 or (only is not None and r.rid not in only):
                continue
            pend = pending_count(r)
            rec = min(pend, budget)
            budget -= rec
            take = min(r.prompt_len - r.num_computed, budget) if rec == pend else 0
            budget -= take
            plan.append(PlanItem(r, rec, take))
        return plan
