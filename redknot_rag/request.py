"""A generation request and the events it streams."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum

import torch

from redknot_rag.kvcache import KVSegment, SeqKV
from redknot_rag.sampling import SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class PrefixSegment:
    """Stored KV reused as part of the prompt: `segment` placed at `positions` `[T]`, optional
    per-head visibility `[L, Hkv, T]`. Its tokens are the next T tokens of the prompt."""

    segment: KVSegment
    positions: torch.Tensor
    visible: torch.Tensor | None = None


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
    prefix: list[PrefixSegment] = field(default_factory=list)
    prebuilt_kv: SeqKV | None = None  # context KV assembled by a reuse policy; covers prompt[:prebuilt_len]
    prebuilt_len: int = 0
    reused_tokens: int = 0  # context tokens served from stored KV (not recomputed)

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
    keep_first_logits: bool = False  # fidelity harness: keep the first sampled position's logits
    first_logits: torch.Tensor | None = None  # [vocab] float32
    generator: torch.Generator | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefix_len(self) -> int:
        """Prompt tokens whose KV exists before the engine's prefill starts."""
        return self.prebuilt_len or sum(p.segment.num_tokens for p in self.prefix)

    @property
    def cached_tokens(self) -> int:
        return self.reused_tokens or sum(p.segment.num_tokens for p in self.prefix)

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
