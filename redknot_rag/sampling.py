"""Sampling parameters and the batched sampler (penalties, temperature, top-k/top-p/min-p, seeds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_MAX_TEMPERATURE = 1e4  # beyond it sampling is uniform anyway; keeps -inf / temperature finite-signed
SEED_MAX = (1 << 63) - 1  # torch.Generator.manual_seed takes 64 bits; sample k of n uses seed + k


class InvalidRequestError(ValueError):
    """A request that can never be served as asked (bad parameters, prompt too long...)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding controls. `temperature == 0` means greedy."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    n: int = 1
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def validate(self, max_new_tokens_limit: int = 1 << 20) -> None:
        """Raise InvalidRequestError unless every field is servable. After this, the sampler cannot see a
        NaN/inf parameter (which would poison `softmax` for the whole batch) or an unseedable seed."""
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidRequestError(f"{name} must be a finite number, got {v!r}")
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidRequestError(f"{name} must be an integer, got {v!r}")
        if self.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequestError(f"max_new_tokens {self.max_new_tokens} exceeds the limit {max_new_tokens_limit}")
        if self.min_new_tokens < 0 or self.min_new_tokens > max(self.max_new_tokens, 0):
            raise InvalidRequestError("min_new_tokens must be within [0, max_new_tokens]")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.01 <= self.repetition_penalty <= 2:  # SGLang's range; far below it, logits overflow float32
            raise InvalidRequestError(f"repetition_penalty must be in [0.01, 2], got {self.repetition_penalty}")
        if self.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {self.n}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX - self.n
        ):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**63 - n], got {self.seed!r}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 1e-6


def apply_penalties(logits: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """logits `[vocab]` float32 → penalized copy (OpenAI frequency/presence, HF repetition)."""
    if not output_ids or (
        params.frequency_penalty == 0 and params.presence_penalty == 0 and params.repetition_penalty == 1
    ):
        return logits
    logits = logits.clone()
    ids = torch.tensor(output_ids, device=logits.device)
    uniq, counts = ids.unique(return_counts=True)
    if params.repetition_penalty != 1:
        sel = logits[uniq]
        logits[uniq] = torch.where(sel > 0, sel / params.repetition_penalty, sel * params.repetition_penalty)
    logits[uniq] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits `[vocab]` float32 (already penalized and masked)."""
    if params.is_greedy:
        return int(logits.argmax())
    # Invariant: the most likely token always keeps probability > 0, so every validated parameter set
    # (however extreme: top_p 1e-300 rounds to 0 in float32, temperature 1e300 to inf) can sample.
    logits = logits / min(params.temperature, _MAX_TEMPERATURE)
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0)
    if params.top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < params.top_p
        keep[0] = True  # the top token, even when top_p is below float32's resolution
        probs = torch.zeros_like(probs).scatter(0, si, sp * keep)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
