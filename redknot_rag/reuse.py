"""Position-independent KV reuse: assemble `[anchor][chunk_1]...[chunk_k]` from stored chunk KV and
recompute what the policy selects.

Invariants: shared chunk pages are never written (recomputed tokens get request-private pages by
copy-on-write of the sequence's slot view); K stays pre-RoPE and is rotated at read time from the
token's position in the assembled context, so relocation itself is exact.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.kvcache import KVSegment, SeqKV


@dataclass
class ReuseInput:
    """What a policy assembles: anchor ids (KV in `anchor`), chunk ids with their stored segments, and
    the question tokens that follow the context (the engine prefills those)."""

    anchor_ids: list[int]
    anchor: KVSegment
    chunk_ids: list[list[int]]
    chunks: list[KVSegment]
    question_ids: list[int]

    @property
    def context_ids(self) -> list[int]:
        out = list(self.anchor_ids)
        for c in self.chunk_ids:
            out.extend(c)
        return out

    def chunk_spans(self) -> list[tuple[int, int]]:
        spans, s = [], len(self.anchor_ids)
        for c in self.chunk_ids:
            spans.append((s, s + len(c)))
            s += len(c)
        return spans


@dataclass
class Assembled:
    """A policy's result: `kv` covers the context (None: the policy wants plain full prefill)."""

    kv: SeqKV | None
    context_len: int
    reused_tokens: int
    recomputed_tokens: int
    recompute_ms: float = 0.0
    stats: dict = field(default_factory=dict)


class ReusePolicy(ABC):
    """One interface for every policy; `assemble` runs on the engine thread (it writes the pool)."""

    name: str = "base"

    @abstractmethod
    def assemble(self, engine, inp: ReuseInput) -> Assembled: ...


def relocate(engine, inp: ReuseInput, visible: list[torch.Tensor | None] | None = None) -> SeqKV:
    """Attach anchor and chunk segments at their assembled positions (no copy of shared pages)."""
    kv = engine.new_seq_kv()
    kv.attach(inp.anchor, torch.arange(len(inp.anchor_ids)), engine.allocator)
    for i, ((s, e), seg) in enumerate(zip(inp.chunk_spans(), inp.chunks)):
        kv.attach(seg, torch.arange(s, e), engine.allocator, None if visible is None else visible[i])
    return kv


def recompute(engine, kv: SeqKV, context_ids: list[int], token_index: torch.Tensor) -> None:
    """Recompute the KV of context tokens `token_index` `[n]` (ascending) in the assembled context.

    Each selected token attends to everything at or before its position: reused KV for the rest,
    fresh KV of the other selected tokens (written earlier in the same layer). Results go to
    private copy-on-write slots.
    """
    if token_index.numel() == 0:
        return
    new_slots = kv.override(token_index, engine.allocator)
    ids = torch.tensor(context_ids, dtype=torch.int64)[token_index]
    pos = kv.positions[token_index]
    batch = ForwardBatch(
        ids, pos, [SeqSlice(kv, 0, int(token_index.numel()), new_slots)], torch.zeros(0, dtype=torch.int64)
    )
    engine.model.forward(batch, engine.backend)


class FullPolicy(ReusePolicy):
    """No reuse: the engine prefills the whole prompt (the oracle)."""

    name = "full"

    def assemble(self, engine, inp: ReuseInput) -> Assembled:
        return Assembled(None, 0, 0, len(inp.context_ids))


class NaivePolicy(ReusePolicy):
    """Relocation only: stored KV at new positions, nothing recomputed."""

    name = "naive"

    def assemble(self, engine, inp: ReuseInput) -> Assembled:
        kv = relocate(engine, inp)
        n = kv.num_tokens
        return Assembled(kv, n, n - len(inp.anchor_ids), 0)


class _SelectivePolicy(ReusePolicy):
    """Relocate, then recompute the context tokens `select` returns."""

    def select(self, engine, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        raise NotImplementedError

    def visibility(self, engine, inp: ReuseInput) -> list[torch.Tensor | None] | None:
        return None

    def assemble(self, engine, inp: ReuseInput) -> Assembled:
        kv = relocate(engine, inp, self.visibility(engine, inp))
        try:
            t0 = time.perf_counter()
            idx = self.select(engine, inp, kv)
            idx = torch.unique(idx.to(torch.int64))  # sorted, ascending positions
            recompute(engine, kv, inp.context_ids, idx)
            ms = (time.perf_counter() - t0) * 1e3
        except BaseException:
            kv.release(engine.allocator)
            raise
        chunk_tokens = kv.num_tokens - len(inp.anchor_ids)
        return Assembled(kv, kv.num_tokens, chunk_tokens - int(idx.numel()), int(idx.numel()), ms)


class EpicPolicy(_SelectivePolicy):
    """EPIC: recompute the first `k` tokens of every chunk."""

    name = "epic"

    def __init__(self, k: int = 16) -> None:
        self.k = k

    def select(self, engine, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        return torch.cat([torch.arange(s, min(e, s + self.k)) for s, e in inp.chunk_spans()] or [torch.zeros(0)])


def kv_deviation(engine, inp: ReuseInput, kv: SeqKV, layer: int) -> torch.Tensor:
    """Per context token, the L2 deviation of reused K/V from KV recomputed in the assembled context
    at `layer` (first `layer + 1` layers run over all chunk tokens): `[L?]` → `[Hkv, T_ctx]` float32."""
    a = len(inp.anchor_ids)
    ctx = inp.context_ids
    scratch = engine.new_seq_kv()
    try:
        scratch.attach(inp.anchor, torch.arange(a), engine.allocator)
        pos = torch.arange(a, len(ctx))
        _, slots = engine.append_forward(scratch, ctx[a:], pos, num_layers=layer + 1)
        pool = engine.pool
        new = slots[layer]  # [Hkv, n]
        old = kv.slots[layer, :, a : len(ctx)]
        dk = (pool.k_slots[new] - pool.k_slots[old]).float().norm(dim=-1)  # [Hkv, n]
        dv = (pool.v_slots[new] - pool.v_slots[old]).float().norm(dim=-1)
        dev = torch.zeros(engine.model_config.num_kv_heads, len(ctx))
        dev[:, a:] = (dk + dv).cpu()
        return dev
    finally:
        scratch.release(engine.allocator)


class CacheBlendPolicy(_SelectivePolicy):
    """CacheBlend: recompute the `ratio` of chunk tokens whose K/V deviate most at an early layer."""

    name = "cacheblend"

    def __init__(self, ratio: float = 0.15, layer: int = 1) -> None:
        self.ratio = ratio
        self.layer = layer

    def select(self, engine, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        dev = kv_deviation(engine, inp, kv, self.layer).sum(0)  # [T_ctx]
        n = int(round(self.ratio * (len(dev) - len(inp.anchor_ids))))
        return dev.topk(n).indices if n > 0 else torch.zeros(0, dtype=torch.int64)


class RedKnotPolicy(_SelectivePolicy):
    """Head-aware reuse.

    - Local heads (from the head profile) read only the anchor (sink) and the last `window` context
      tokens, so their chunk pages beyond the window are never read and never need recompute.
    - Recompute is spent on the tokens global heads need: a probe pass of the question over the
      relocated context measures, on global heads only, how much attention each chunk token gets;
      the top `ratio` of chunk tokens (plus the first `head_tokens` of each chunk, whose KV deviates
      most) are recomputed in the assembled context. The probe's question KV is dropped; the engine
      then prefills the question over the repaired context.
    """

    name = "redknot"

    def __init__(
        self,
        profile=None,
        ratio: float = 0.1,
        head_tokens: int = 4,
        window: int | None = None,
        use_local_windows: bool = False,
    ) -> None:
        self.profile = profile
        self.use_local_windows = use_local_windows
        self.ratio = ratio
        self.head_tokens = head_tokens
        self.window = window if window is not None else (profile.window if profile is not None else 64)

    def _local(self, engine) -> torch.Tensor:
        mc = engine.model_config
        if self.profile is None:
            return torch.zeros(mc.num_layers, mc.num_kv_heads, dtype=torch.bool)
        return self.profile.class_tensor() == 0  # [L, Hkv]

    def visibility(self, engine, inp: ReuseInput) -> list[torch.Tensor | None] | None:
        local = self._local(engine)
        if not self.use_local_windows or not local.any():
            return None
        end = len(inp.context_ids)
        out: list[torch.Tensor | None] = []
        for s, e in inp.chunk_spans():
            in_window = torch.arange(s, e) >= end - self.window  # [T]
            vis = ~local[:, :, None] | in_window[None, None, :]  # [L, Hkv, T]
            out.append(vis)
        return out

    def select(self, engine, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        from redknot_rag.probe import ProbeBackend

        spans = inp.chunk_spans()
        first = [torch.arange(s, min(e, s + self.head_tokens)) for s, e in spans]
        n = int(round(self.ratio * (kv.num_tokens - len(inp.anchor_ids))))
        if n <= 0 or not inp.question_ids:
            return torch.cat(first) if first else torch.zeros(0, dtype=torch.int64)
        ctx_len = kv.num_tokens
        q = inp.question_ids
        probe = ProbeBackend(engine.model_config, engine.pool, engine.rotary)
        pos = torch.arange(ctx_len, ctx_len + len(q))
        try:
            engine.append_forward(kv, q, pos, backend=probe)
        finally:
            kv.truncate(ctx_len, engine.allocator)
        attn = torch.stack([a[:, :ctx_len] for a in probe.attn])  # [L, Hkv, T] on the pool's device
        glob = (~self._local(engine)).to(attn.device)  # [L, Hkv]
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-9)
        score = (attn * glob[:, :, None]).sum((0, 1)).cpu()  # [T]; token indices live on the host
        score[: len(inp.anchor_ids)] = -1  # the anchor is exact already
        top = score.topk(min(n, ctx_len - len(inp.anchor_ids))).indices
        return torch.cat([top, *first])


def _policy_args(name: str, arg: str, kinds: str) -> list[float | int]:
    """`arg` ("0.1:4:32") parsed by `kinds` ("fii": float in [0, 1], int >= 0, int >= 1); ValueError otherwise."""
    parts = arg.split(":") if arg else []
    if len(parts) > len(kinds):
        raise ValueError(f"reuse policy {name!r} takes at most {len(kinds)} parameter(s)")
    out: list[float | int] = []
    for part, kind in zip(parts, kinds):
        try:
            v: float | int = float(part) if kind == "f" else int(part)
        except ValueError:
            raise ValueError(f"reuse policy {name!r}: {part!r} is not a number") from None
        ok = (math.isfinite(v) and 0 <= v <= 1) if kind == "f" else v >= (0 if kind == "i" else 1)
        if not ok:
            want = {"f": "a ratio in [0, 1]", "i": "an integer >= 0", "j": "an integer >= 1"}[kind]
            raise ValueError(f"reuse policy {name!r}: {part!r} must be {want}")
        out.append(v)
    return out


def make_policy(name: str, engine=None) -> ReusePolicy:
    """Policies by name, with parameters: "epic", "epic:64", "cacheblend:0.2", "redknot:0.15".

    Raises ValueError for an unknown name or a parameter out of range (the server answers 400)."""
    base, _, arg = name.partition(":")
    if base in ("full", "naive") and arg:
        raise ValueError(f"reuse policy {base!r} takes no parameters")
    if base == "full":
        return FullPolicy()
    if base == "naive":
        return NaivePolicy()
    if base == "epic":
        k = _policy_args(name, arg, "i")
        return EpicPolicy(int(k[0]) if k else 16)
    if base == "cacheblend":
        r = _policy_args(name, arg, "f")
        return CacheBlendPolicy(float(r[0]) if r else 0.15)
    if base in ("redknot", "redknot-local", "redknot-dense"):
        # redknot[:ratio[:head_tokens[:window]]]: recompute chosen by global heads' question attention.
        # "redknot-local" also restricts local heads to sink + window; "redknot-dense" ignores the profile.
        from redknot_rag.heads import load_profile_for

        parts = _policy_args(name, arg, "fij")
        profile = load_profile_for(engine) if engine is not None and base != "redknot-dense" else None
        return RedKnotPolicy(
            profile,
            ratio=float(parts[0]) if parts else 0.1,
            head_tokens=int(parts[1]) if len(parts) > 1 else 4,
            window=int(parts[2]) if len(parts) > 2 else None,
            use_local_windows=base == "redknot-local",
        )
    raise ValueError(
        f"unknown reuse policy {name!r}; known: full, naive, epic[:k], cacheblend[:r], redknot[:r[:k[:w]]], "
        "redknot-local[:r[:k[:w]]], redknot-dense[:r[:k]]"
    )
