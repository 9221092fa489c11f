"""Oracle reuse policies: bench only (`redknot eval --oracles`), never servable.

They know what a served policy cannot: the full prefill's KV (token selection by true deviation) or which
chunk holds the answer (the case generators plant it). `make_policy` does not know their names, so no API
can ask for one; the harness builds them per case. What each measures:

- `oracle:select:r` recomputes the `r` of chunk tokens whose K/V deviate most from a full prefill's,
  over all layers: the ceiling of any token selector at that budget.
- `oracle:answer-chunk` recomputes the chunk(s) holding the answer, whole; `oracle:other-chunks` every
  chunk but those. Together: does the answer chunk need its cross-chunk context, or do the others need
  theirs?
- `oracle:first:<policy>` / `oracle:last:<policy>` run `<policy>` (full or naive) with the answer chunk(s)
  moved to the front or the end of the context: how much of the loss is placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from redknot_rag.kvcache import SeqKV
from redknot_rag.reuse import ReuseInput, _SelectivePolicy
from redknot_rag.runner import KVRunner

ORACLE_PREFIX = "oracle:"
PLACEMENTS = ("first", "last")


def is_oracle(name: str) -> bool:
    return name.startswith(ORACLE_PREFIX)


def true_deviation(runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
    """Per context token, how far its reused K/V are from a full prefill's, over every layer and KV head:
    `[T_ctx]` float32 on the host (0 on the anchor). Each layer's L2 deviations are divided by that layer's
    mean, so a layer with large activations does not outvote the others."""
    a = len(inp.anchor_ids)
    ctx = inp.context_ids
    scratch = runner.new_seq_kv()
    try:
        runner.attach(scratch, inp.anchor, torch.arange(a))
        new = runner.append_forward(scratch, ctx[a:], torch.arange(a, len(ctx))).slots  # [L, Hkv, n]
        k_new, v_new = runner.read_slots(new)  # [L, Hkv, n, D]
        k_old, v_old = runner.read_slots(kv.slots[:, :, a : len(ctx)])
        dk = (k_new - k_old).float().norm(dim=-1)  # [L, Hkv, n]
        dv = (v_new - v_old).float().norm(dim=-1)
        dev = dk + dv
        dev = dev / dev.mean((1, 2), keepdim=True).clamp_min(1e-12)  # [L, Hkv, n], each layer's mean 1
        out = torch.zeros(len(ctx))
        out[a:] = runner.all_reduce(dev.sum((0, 1))).float().cpu()  # [n], over all ranks' heads
        return out
    finally:
        runner.release(scratch)


class OracleSelectPolicy(_SelectivePolicy):
    """Recompute the `ratio` of chunk tokens whose reused K/V deviate most from the full prefill's.

    The ranking costs a full prefill; `cache` keeps the last context's ranking so the budgets of one case
    share it (the oracle's TTFT is not a serving cost)."""

    name = "oracle-select"

    def __init__(self, ratio: float, cache: dict | None = None) -> None:
        self.ratio = ratio
        self.cache = cache if cache is not None else {}

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        a = len(inp.anchor_ids)
        n = int(round(self.ratio * (kv.num_tokens - a)))
        if n <= 0:
            return torch.zeros(0, dtype=torch.int64)
        key = tuple(inp.context_ids)
        order = self.cache.get(key)
        if order is None:
            dev = true_deviation(runner, inp, kv)
            dev[:a] = -1  # the anchor is exact
            order = dev.argsort(descending=True)
            self.cache.clear()
            self.cache[key] = order
        return order[:n]


class RecomputeChunksPolicy(_SelectivePolicy):
    """Recompute the chunks `chunks` (indices in prompt order) whole, reuse the others as stored."""

    name = "oracle-chunks"

    def __init__(self, chunks: Sequence[int]) -> None:
        self.chunks = tuple(chunks)

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        spans = inp.chunk_spans()
        parts = [torch.arange(*spans[i]) for i in self.chunks]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class OracleArm:
    """How the harness runs one oracle on one case: `policy` (a served policy's name, or an oracle policy
    object) over the chunks in `order` (indices into the case's chunks)."""

    name: str
    policy: str | _SelectivePolicy
    order: tuple[int, ...]


def oracle_arm(name: str, num_chunks: int, answer_chunks: Sequence[int], select_cache: dict) -> OracleArm:
    """The arm for oracle `name` on a case of `num_chunks` chunks whose answer sits in `answer_chunks`.
    Raises ValueError for an unknown name or a case that does not know its answer chunk."""
    kind, _, arg = name.removeprefix(ORACLE_PREFIX).partition(":")
    keep = tuple(range(num_chunks))
    if kind == "select":
        from redknot_rag.reuse import _ratio

        return OracleArm(name, OracleSelectPolicy(_ratio(arg, name), select_cache), keep)
    answer = tuple(sorted(set(answer_chunks)))
    if not answer or any(not 0 <= i < num_chunks for i in answer):
        raise ValueError(f"oracle {name!r} needs the answer chunk's index; the case gives {answer_chunks!r}")
    if kind == "answer-chunk" and not arg:
        return OracleArm(name, RecomputeChunksPolicy(answer), keep)
    if kind == "other-chunks" and not arg:
        return OracleArm(name, RecomputeChunksPolicy([i for i in keep if i not in answer]), keep)
    if kind in PLACEMENTS and arg in ("full", "naive"):
        rest = tuple(i for i in keep if i not in answer)
        return OracleArm(name, arg, answer + rest if kind == "first" else rest + answer)
    raise ValueError(
        f"unknown oracle {name!r}; known: oracle:select:r, oracle:answer-chunk, oracle:other-chunks, "
        "oracle:first:full|naive, oracle:last:full|naive"
    )
