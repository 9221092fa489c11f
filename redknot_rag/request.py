"""A generation request and the events it streams."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from redknot_rag.kvcache import SeqKV
from redknot_rag.sampling import SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class ReusedContext:
    """Context KV that a reuse policy assembled from stored chunks; it covers `prompt_ids[:num_tokens]`.

    `kv` belongs to the request until the engine starts it (then it becomes `Request.kv` and this field
    is None); whoever drops an unstarted request releases it (`Engine.discard`).
    """

    kv: SeqKV | None
    num_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    policy: str
    stats: dict = field(default_factory=dict)
    phase_ms: dict[str, float] = field(default_factory=dict)  # kv_load / kv_miss_prefill / recompute (metrics)
    # context token indices `[n]` (ascending) selected for recompute but not yet recomputed: the engine's
    # first prefill step of this request recomputes them (copy-on-write slots) in the same forward as the
    # first question tokens. None: nothing pending.
    pending: torch.Tensor | None = None


@dataclass
class TokenEvent:
    """One streamed step: the new token, the new text, and whether the request ended."""

    token_id: int | None
    text: str
    logprob: float | None = None
    finished: bool = False
    finish_reason: dict | None = None
    error: str | None = None


@dataclass
class Request:
    """`prompt_ids` is the whole prompt; the first `prefix_len` tokens come from `prefix` (reused KV)."""

    prompt_ids: list[int]
    params: SamplingParams
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    reuse: ReusedContext | None = None
    # constrained decoding / observers: (request, logits [vocab] float32) -> logits, before sampling
    logits_processor: Callable[[Request, torch.Tensor], torch.Tensor] | None = None

    status: RequestStatus = RequestStatus.WAITING
    kv: SeqKV | None = None
    num_computed: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    finish_reason: dict | None = None
    error: str | None = None
    input_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    aborted: bool = False
    generator: torch.Generator | None = None
    detokenizer: Any = None  # the engine's incremental detokenizer of `output_ids` (engine/detokenizer.py)
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefix_len(self) -> int:
        """Prompt tokens whose KV exists before the engine's prefill starts."""
        return self.reuse.num_tokens if self.reuse is not None else 0

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from stored KV (not recomputed)."""
        return self.reuse.reused_tokens if self.reuse is not None else 0

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed >= self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def stream(self, timeout: float | None = None):
        """Yield TokenEvents until the request finishes (blocking; an engine loop must be running)."""
        while True:
            ev: TokenEvent = self.events.get(timeout=timeout)
            yield ev
            if ev.finished:
                return
