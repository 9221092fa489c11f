"""Position-independent KV reuse: assemble `[anchor][chunk_1]...[chunk_k]` from stored chunk KV and
recompute what the policy selects.

Invariants: shared chunk pages are never written (recomputed tokens get request-private pages by
copy-on-write of the sequence's slot view); K stays pre-RoPE and is rotated at read time from the
token's position in the assembled context, so relocation itself is exact.
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from redknot_rag.heads import HeadProfile
from redknot_rag.kvcache import KVSegment, SeqKV
from redknot_rag.runner import KVRunner


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
    """A policy's result: `kv` covers the context (None: the policy wants plain full prefill).

    `recomputed_index` `[n]` int64: context token indices whose KV was recomputed (ascending).
    """

    kv: SeqKV | None
    context_len: int
    reused_tokens: int
    recomputed_tokens: int
    recompute_ms: float = 0.0
    recomputed_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    stats: dict = field(default_factory=dict)
    # True: `recomputed_index` is selected but NOT yet recomputed; the engine recomputes those tokens in the
    # same forward as the first question tokens (`ReusedContext.pending`)
    deferred: bool = False


class ReusePolicy(ABC):
    """One interface for every policy; `assemble` runs on the runner's thread (it writes the pool)."""

    name: str = "base"

    @abstractmethod
    def assemble(self, runner: KVRunner, inp: ReuseInput, defer_recompute: bool = False) -> Assembled:
        """Build the context KV. With `defer_recompute`, selective policies only select the tokens to
        recompute (`Assembled.deferred`); the engine then recomputes them in one forward with the question."""


def relocate(runner: KVRunner, inp: ReuseInput, visible: list[torch.Tensor | None] | None = None) -> SeqKV:
    """Attach anchor and chunk segments at their assembled positions (no copy of shared pages)."""
    kv = runner.new_seq_kv()
    items: list[tuple[KVSegment, torch.Tensor, torch.Tensor | None]] = [
        (inp.anchor, torch.arange(len(inp.anchor_ids)), None)
    ]
    for i, ((s, e), seg) in enumerate(zip(inp.chunk_spans(), inp.chunks)):
        vis = None if visible is None else visible[i]
        if seg.visible is not None:  # stored head-compressed: a head never reads tokens its store dropped
            vis = seg.visible if vis is None else vis & seg.visible
        items.append((seg, torch.arange(s, e), vis))
    runner.attach_many(kv, items)  # one device concatenation of the segments' slot tables
    return kv


def recompute(runner: KVRunner, kv: SeqKV, context_ids: list[int], token_index: torch.Tensor) -> None:
    """Recompute the KV of context tokens `token_index` `[n]` (ascending) in the assembled context.

    Each selected token attends to everything at or before its position: reused KV for the rest,
    fresh KV of the other selected tokens (written earlier in the same layer). Results go to
    private copy-on-write slots.
    """
    if token_index.numel() == 0:
        return
    runner.recompute(kv, torch.tensor(context_ids, dtype=torch.int64)[token_index], token_index)


class FullPolicy(ReusePolicy):
    """No reuse: the engine prefills the whole prompt (the oracle)."""

    name = "full"

    def assemble(self, runner: KVRunner, inp: ReuseInput, defer_recompute: bool = False) -> Assembled:
        return Assembled(None, 0, 0, len(inp.context_ids))


class NaivePolicy(ReusePolicy):
    """Relocation only: stored KV at new positions, nothing recomputed."""

    name = "naive"

    def assemble(self, runner: KVRunner, inp: ReuseInput, defer_recompute: bool = False) -> Assembled:
        kv = relocate(runner, inp)
        n = kv.num_tokens
        return Assembled(kv, n, n - len(inp.anchor_ids), 0)


class _SelectivePolicy(ReusePolicy):
    """Relocate, then recompute the context tokens `select` returns."""

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        raise NotImplementedError

    def visibility(self, runner: KVRunner, inp: ReuseInput) -> list[torch.Tensor | None] | None:
        return None

    def assemble(self, runner: KVRunner, inp: ReuseInput, defer_recompute: bool = False) -> Assembled:
        kv = relocate(runner, inp, self.visibility(runner, inp))
        try:
            t0 = time.perf_counter()
            idx = self.select(runner, inp, kv)
            idx = torch.unique(idx.to(torch.int64))  # sorted, ascending positions
            if not defer_recompute:
                recompute(runner, kv, inp.context_ids, idx)
            ms = (time.perf_counter() - t0) * 1e3
        except BaseException:
            runner.release(kv)
            raise
        chunk_tokens = kv.num_tokens - len(inp.anchor_ids)
        n = int(idx.numel())
        return Assembled(kv, kv.num_tokens, chunk_tokens - n, n, ms, idx, deferred=defer_recompute and n > 0)


class EpicPolicy(_SelectivePolicy):
    """EPIC: recompute the first `k` tokens of every chunk."""

    name = "epic"

    def __init__(self, k: int = 16) -> None:
        self.k = k

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        return torch.cat([torch.arange(s, min(e, s + self.k)) for s, e in inp.chunk_spans()] or [torch.zeros(0)])


class EpicFractionPolicy(_SelectivePolicy):
    """EPIC with k scaled to a recompute budget: the first `round(fraction * len)` tokens of every chunk, so
    its recomputed fraction matches the token-selective policies' budgets on chunks of any length."""

    name = "epic-frac"

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        parts = [torch.arange(s, s + int(round(self.fraction * (e - s)))) for s, e in inp.chunk_spans()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def kv_deviation(runner: KVRunner, inp: ReuseInput, kv: SeqKV, layer: int) -> torch.Tensor:
    """Per context token, the L2 deviation of reused K/V from KV recomputed in the assembled context
    at `layer` (first `layer + 1` layers run over all chunk tokens): `[L?]` → `[Hkv, T_ctx]` float32."""
    a = len(inp.anchor_ids)
    ctx = inp.context_ids
    scratch = runner.new_seq_kv()
    try:
        runner.attach(scratch, inp.anchor, torch.arange(a))
        pos = torch.arange(a, len(ctx))
        slots = runner.append_forward(scratch, ctx[a:], pos, num_layers=layer + 1).slots
        k_new, v_new = runner.read_slots(slots[layer])  # [Hkv, n, D]
        k_old, v_old = runner.read_slots(kv.slots[layer, :, a : len(ctx)])
        dk = (k_new - k_old).float().norm(dim=-1)  # [Hkv, n]
        dv = (v_new - v_old).float().norm(dim=-1)
        dev = torch.zeros(runner.model_config.num_kv_heads, len(ctx))
        dev[:, a:] = (dk + dv).cpu()
        return dev
    finally:
        runner.release(scratch)


class CacheBlendPolicy(_SelectivePolicy):
    """CacheBlend: recompute the `ratio` of chunk tokens whose K/V deviate most at an early layer."""

    name = "cacheblend"

    def __init__(self, ratio: float = 0.15, layer: int = 1) -> None:
        self.ratio = ratio
        self.layer = layer

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        dev = runner.all_reduce(kv_deviation(runner, inp, kv, self.layer).sum(0))  # [T_ctx], over all ranks' heads
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
        profile: HeadProfile | None = None,
        ratio: float = 0.1,
        head_tokens: int = 4,
        window: int | None = None,
        use_local_windows: bool = False,
        probe_layers: int | None = None,
    ) -> None:
        self.profile = profile
        self.use_local_windows = use_local_windows
        self.probe_layers = probe_layers  # the probe runs only the first layers (a cheaper signal); None: all
        self.ratio = ratio
        self.head_tokens = head_tokens
        self.window = window if window is not None else (profile.window if profile is not None else 64)

    def _local(self, runner: KVRunner) -> torch.Tensor:
        mc = runner.model_config
        if self.profile is None:
            return torch.zeros(mc.num_layers, mc.num_kv_heads, dtype=torch.bool)
        return self.profile.class_tensor()[:, runner.kv_heads] == 0  # [L, Hkv] of this runner's heads

    def visibility(self, runner: KVRunner, inp: ReuseInput) -> list[torch.Tensor | None] | None:
        local = self._local(runner)
        if not self.use_local_windows or not local.any():
            return None
        end = len(inp.context_ids)
        out: list[torch.Tensor | None] = []
        for s, e in inp.chunk_spans():
            in_window = torch.arange(s, e) >= end - self.window  # [T]
            vis = ~local[:, :, None] | in_window[None, None, :]  # [L, Hkv, T]
            out.append(vis)
        return out

    def question_scores(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        """The probe: attention each context token gets from the question over the relocated context, summed
        over global heads (each head's row normalized) and the first `probe_layers` layers: `[T_ctx]` float32
        on the host, -1 on the anchor (exact already). The probe's question KV is dropped."""
        ctx_len = kv.num_tokens
        q = inp.question_ids
        probe = runner.probe_backend()
        pos = torch.arange(ctx_len, ctx_len + len(q))
        nl = min(self.probe_layers or runner.model_config.num_layers, runner.model_config.num_layers)
        try:
            runner.append_forward(kv, q, pos, backend=probe, num_layers=nl)
        finally:
            runner.truncate(kv, ctx_len)
        attn = torch.stack([a[:, :ctx_len] for a in probe.attn])  # [nl, Hkv, T] on the pool's device
        glob = (~self._local(runner))[:nl].to(attn.device)  # [nl, Hkv]
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-9)
        score = runner.all_reduce((attn * glob[:, :, None]).sum((0, 1)))  # [T], summed over all ranks' heads
        score = score.float().cpu()  # token indices live on the host
        score[: len(inp.anchor_ids)] = -1
        return score

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        spans = inp.chunk_spans()
        first = [torch.arange(s, min(e, s + self.head_tokens)) for s, e in spans]
        n = int(round(self.ratio * (kv.num_tokens - len(inp.anchor_ids))))
        if n <= 0 or not inp.question_ids:
            return torch.cat(first) if first else torch.zeros(0, dtype=torch.int64)
        score = self.question_scores(runner, inp, kv)
        top = score.topk(min(n, kv.num_tokens - len(inp.anchor_ids))).indices
        return torch.cat([top, *first])


class RedKnotChunksPolicy(RedKnotPolicy):
    """Whole-chunk recompute ranked by the question probe: chunks in order of the question's attention mass
    (global heads, as `redknot`), recomputed whole while the budget `ratio` of chunk tokens lasts; what is
    left goes to a prefix of the next chunk (a chunk's first tokens deviate most). Cross-chunk attention of
    a recomputed chunk is then exact, which token selection cannot give at the same budget."""

    name = "redknot-chunks"

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        spans = inp.chunk_spans()
        n = int(round(self.ratio * (kv.num_tokens - len(inp.anchor_ids))))
        if n <= 0 or not spans or not inp.question_ids:
            return torch.zeros(0, dtype=torch.int64)
        score = self.question_scores(runner, inp, kv)
        mass = torch.tensor([float(score[s:e].sum()) for s, e in spans])  # [num_chunks]
        parts: list[torch.Tensor] = []
        for i in mass.argsort(descending=True).tolist():
            s, e = spans[i]
            take = min(n, e - s)
            parts.append(torch.arange(s, s + take))
            n -= take
            if n == 0:
                break
        return torch.cat(parts)


class BoundaryPolicy(_SelectivePolicy):
    """Recompute where chunk KV deviates most from full prefill by construction: the first `head` tokens of
    each chunk (they were computed right after the anchor) and the last `tail` context tokens (the chunk
    the question reads most closely; retrieval puts the best chunk there)."""

    name = "boundary"

    def __init__(self, head: int = 8, tail: int = 64) -> None:
        self.head = head
        self.tail = tail

    def select(self, runner: KVRunner, inp: ReuseInput, kv: SeqKV) -> torch.Tensor:
        a, n = len(inp.anchor_ids), kv.num_tokens
        parts = [torch.arange(s, min(e, s + self.head)) for s, e in inp.chunk_spans()]
        parts.append(torch.arange(max(a, n - self.tail), n))
        return torch.cat(parts)


class ApePolicy(ReusePolicy):
    """APE-style attention temperature on reused spans, on top of a `base` policy.

    Every later token (recomputed chunk tokens, the question, decoded tokens) sees the attention logit
    of each *reused* chunk token divided by `temperature` (T < 1 sharpens attention to the context,
    as APE does for parallel-encoded contexts). Exact and kernel-free: a logit is q·R(p)k·scale and
    RoPE is linear, so storing k/T scales exactly that token's logit by 1/T for every query.
    The scaled K goes to the sequence's copy-on-write slots (shared chunk pages are never written);
    V is copied unchanged. Anchor tokens and tokens the base policy recomputes keep their own K.

    APE's second knob, a log(S) bias on the reused span's total attention, is not done: a constant
    added to q·k for every query has no exact K-side form (it needs a bias in the kernel, or a
    correction of the context partition's log-sum-exp in the merge), so it is left out.
    """

    name = "ape"

    def __init__(self, temperature: float, base: ReusePolicy) -> None:
        if isinstance(base, (FullPolicy, ApePolicy)):
            raise ValueError(f"APE temperature needs a reuse policy underneath, got {base.name!r}")
        self.temperature = temperature
        self.base = base

    def assemble(self, runner: KVRunner, inp: ReuseInput, defer_recompute: bool = False) -> Assembled:
        if self.temperature == 1.0:  # the identity: the base policy's result, bit for bit
            return self.base.assemble(runner, inp, defer_recompute)
        # select first (deferred): the recomputed tokens must attend to the scaled reused keys whether
        # their recompute runs here or in the engine's first forward with the question
        asm = self.base.assemble(runner, inp, True)
        kv = asm.kv
        assert kv is not None
        try:
            t0 = time.perf_counter()
            a = len(inp.anchor_ids)
            reused = torch.ones(kv.num_tokens, dtype=torch.bool)
            reused[:a] = False
            reused[asm.recomputed_index] = False  # recomputed (or about to be): fresh K, not reused
            idx = reused.nonzero().flatten()  # [n] ascending context indices of reused chunk tokens
            if idx.numel():
                runner.settle_layers()  # reads the pool outside a forward
                old = kv.slots[:, :, idx.to(kv.device)]  # [L, Hkv, n] shared slots
                new = runner.override(kv, idx)  # [L, Hkv, n] private copies
                runner.copy_slots(old, new, k_scale=1.0 / self.temperature)
            if asm.deferred and not defer_recompute:
                recompute(runner, kv, inp.context_ids, asm.recomputed_index)
                asm = dataclasses.replace(asm, deferred=False)
            ms = (time.perf_counter() - t0) * 1e3
        except BaseException:
            runner.release(kv)
            raise
        stats = {**asm.stats, "ape_temperature": self.temperature, "ape_scaled_tokens": int(idx.numel())}
        return dataclasses.replace(asm, recompute_ms=asm.recompute_ms + ms, stats=stats)


POLICY_NAMES = (
    "full, naive, epic[:k], epic-frac:r, cacheblend[:r], boundary[:k[:tail]], redknot[:r[:k[:w[:layers]]]], "
    "redknot-chunks[:r[:layers]], "
    "redknot-local[:r[:k[:w[:layers]]]], redknot-dense[:r[:k[:w[:layers]]]], "
    "ape:T[:base] (attention temperature T on reused tokens over base, default naive; e.g. ape:0.9:redknot:0.05)"
)
APE_TEMPERATURE_RANGE = (0.25, 4.0)


def _ratio(text: str, name: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise ValueError(f"reuse policy {name!r}: ratio {text!r} is not a number") from None
    if not math.isfinite(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"reuse policy {name!r}: ratio must be in [0, 1], got {text!r}")
    return r


def _count(text: str, name: str, what: str, lo: int = 0) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"reuse policy {name!r}: {what} {text!r} is not an integer") from None
    if n < lo or n > 1 << 20:
        raise ValueError(f"reuse policy {name!r}: {what} must be in [{lo}, {1 << 20}], got {n}")
    return n


def _temperature(text: str, name: str) -> float:
    lo, hi = APE_TEMPERATURE_RANGE
    try:
        t = float(text)
    except ValueError:
        raise ValueError(f"reuse policy {name!r}: temperature {text!r} is not a number") from None
    if not math.isfinite(t) or not lo <= t <= hi:
        raise ValueError(f"reuse policy {name!r}: temperature must be in [{lo}, {hi}], got {text!r}")
    return t


def make_policy(name: str, profile: HeadProfile | None = None) -> ReusePolicy:
    """Policies by name, with parameters: "epic", "epic:64", "cacheblend:0.2", "redknot:0.15", "ape:0.9",
    "ape:0.9:redknot:0.05" (the temperature, then any reuse policy's full name as the base).

    `profile` is the served model's head profile (loaded once by the caller); head-aware policies use it.
    Raises ValueError with the known names for anything malformed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reuse policy must be a non-empty string; known: {POLICY_NAMES}")
    base, _, arg = name.partition(":")
    if base == "ape":
        t_text, _, base_name = arg.partition(":")
        if not t_text:
            raise ValueError(f"reuse policy {name!r}: give a temperature, e.g. ape:0.9 or ape:0.9:redknot:0.05")
        if base_name.partition(":")[0] in ("full", "ape"):
            raise ValueError(f"reuse policy {name!r}: the base must be a reuse policy (not full or ape)")
        return ApePolicy(_temperature(t_text, name), make_policy(base_name or "naive", profile))
    parts = arg.split(":") if arg else []
    if base in ("full", "naive"):
        if parts:
            raise ValueError(f"reuse policy {base!r} takes no parameters, got {name!r}")
        return FullPolicy() if base == "full" else NaivePolicy()
    if base == "epic" and len(parts) <= 1:
        return EpicPolicy(_count(parts[0], name, "k") if parts else 16)
    if base == "epic-frac" and len(parts) == 1:
        return EpicFractionPolicy(_ratio(parts[0], name))
    if base == "redknot-chunks" and len(parts) <= 2:
        return RedKnotChunksPolicy(
            profile,
            ratio=_ratio(parts[0], name) if parts else 0.2,
            head_tokens=0,
            probe_layers=_count(parts[1], name, "layers", lo=1) if len(parts) > 1 else None,
        )
    if base == "cacheblend" and len(parts) <= 1:
        return CacheBlendPolicy(_ratio(parts[0], name) if parts else 0.15)
    if base == "boundary" and len(parts) <= 2:
        return BoundaryPolicy(
            _count(parts[0], name, "head") if parts else 8, _count(parts[1], name, "tail") if len(parts) > 1 else 64
        )
    if base in ("redknot", "redknot-local", "redknot-dense") and len(parts) <= 4:
        # recompute chosen by global heads' question attention; "redknot-local" also restricts local
        # heads to sink + window; "redknot-dense" ignores the profile.
        return RedKnotPolicy(
            None if base == "redknot-dense" else profile,
            ratio=_ratio(parts[0], name) if parts else 0.1,
            head_tokens=_count(parts[1], name, "head_tokens") if len(parts) > 1 else 4,
            window=_count(parts[2], name, "window", lo=1) if len(parts) > 2 else None,
            use_local_windows=base == "redknot-local",
            probe_layers=_count(parts[3], name, "layers", lo=1) if len(parts) > 3 else None,
        )
    raise ValueError(f"unknown reuse policy {name!r}; known: {POLICY_NAMES}")
