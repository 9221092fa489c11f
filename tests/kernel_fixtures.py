"""Random SegPaged scenarios for kernel tests and benchmarks: pools, sequences, batches; the per-layer
error of a backend against the reference, and a stand-in tokenizer for random-weight models.

A scenario mixes what the product produces: private-only sequences, shared segments attached at
arbitrary positions (position gaps, partial last pages), local heads that see only sink + window,
decode rows (q_len 1) and prefill rows (q_len > 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.config import ModelConfig, RopeScaling
from redknot_rag.kvcache import KVPool, KVSegment, PageAllocator, SeqKV

if TYPE_CHECKING:
    from redknot_rag.attention import AttentionBackend


def tiny_config(
    head_dim: int = 64,
    num_kv_heads: int = 2,
    group: int = 4,
    num_layers: int = 2,
    llama3: bool = False,
    hidden: int | None = None,
    vocab: int = 128,
) -> ModelConfig:
    """A small Llama-family shape (llama3 RoPE scaling optional)."""
    scaling = (
        RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
        if llama3
        else RopeScaling()
    )
    hq = num_kv_heads * group
    return ModelConfig(
        arch="llama",
        vocab_size=vocab,
        hidden_size=hidden or hq * head_dim,
        intermediate_size=2 * (hidden or hq * head_dim),
        num_layers=num_layers,
        num_q_heads=hq,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position=4096,
        rope_scaling=scaling,
    )


@dataclass
class SeqSpec:
    """One sequence: `segments` (num_tokens, start position) shared chunks, then `private` tokens
    at consecutive positions after the last segment, of which the last `q_len` are this step's new
    tokens. `local_window` > 0 makes odd kv heads local (sink `local_sink` + last `local_window`)."""

    private: int
    q_len: int = 1
    segments: tuple[tuple[int, int], ...] = ()
    local_sink: int = 0
    local_window: int = 0


def make_segment(cfg: ModelConfig, alloc: PageAllocator, page_size: int, num_tokens: int) -> KVSegment:
    npages = -(-num_tokens // page_size)
    ids = alloc.allocate(cfg.num_layers * cfg.num_kv_heads * npages)
    pages = torch.from_numpy(ids).view(cfg.num_layers, cfg.num_kv_heads, npages)  # [L, Hkv, P]
    return KVSegment(pages=pages, num_tokens=num_tokens, is_shared=True)


def build_batch(cfg: ModelConfig, pool: KVPool, alloc: PageAllocator, specs: list[SeqSpec]) -> ForwardBatch:
    """Sequences per `specs` (KV of old tokens = whatever the pool holds), new tokens appended."""
    ps = pool.page_size
    seqs: list[SeqSlice] = []
    ids, positions = [], []
    q_start = 0
    for sp in specs:
        kv = SeqKV(cfg.num_layers, cfg.num_kv_heads, ps, pool.device)
        next_pos = 0
        for n, start in sp.segments:
            seg = make_segment(cfg, alloc, ps, n)
            kv.attach(seg, torch.arange(start, start + n), alloc)
            next_pos = start + n
        old = sp.private - sp.q_len
        if old > 0:
            kv.append(torch.arange(next_pos, next_pos + old), alloc)
        new_pos = torch.arange(next_pos + old, next_pos + sp.private)
        new_slots = kv.append(new_pos, alloc)
        if sp.local_window:
            t = kv.num_tokens
            vis = torch.zeros(t, dtype=torch.bool)
            vis[: sp.local_sink] = True
            vis[max(0, t - sp.local_window) :] = True
            full = torch.ones(cfg.num_layers, cfg.num_kv_heads, kv.capacity, dtype=torch.bool)
            full[:, 1::2, :t] = vis
            kv.visible = full.to(pool.device)
        seqs.append(kv.slice(q_start, sp.q_len, new_slots))
        ids.append(torch.randint(0, cfg.vocab_size, (sp.q_len,)))
        positions.append(new_pos)
        q_start += sp.q_len
    return ForwardBatch(
        input_ids=torch.cat(ids),
        positions=torch.cat(positions),
        seqs=seqs,
        logit_rows=torch.tensor([s.q_start + s.q_len - 1 for s in seqs]),
    )


def random_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: str) -> KVPool:
    pool = KVPool(num_pages, page_size, cfg.head_dim, dtype, device)
    pool.k.normal_()
    pool.v.normal_()
    return pool


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device: str, std: float = 0.02) -> dict[str, torch.Tensor]:
    """HF-named random weights for `CausalLM` (norms at 1)."""
    d, hq, hkv = cfg.head_dim, cfg.num_q_heads, cfg.num_kv_heads
    h, inter = cfg.hidden_size, cfg.intermediate_size

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * std

    w = {
        "model.embed_tokens.weight": rnd(cfg.vocab_size, h) * 50,
        "model.norm.weight": torch.ones(h, device=device, dtype=dtype),
        "lm_head.weight": rnd(cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
            p + "self_attn.q_proj.weight": rnd(hq * d, h),
            p + "self_attn.k_proj.weight": rnd(hkv * d, h),
            p + "self_attn.v_proj.weight": rnd(hkv * d, h),
            p + "self_attn.o_proj.weight": rnd(h, hq * d),
            p + "mlp.gate_proj.weight": rnd(inter, h),
            p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
        }
    return w


def reuse_seq(
    cfg: ModelConfig,
    pool: KVPool,
    alloc: PageAllocator,
    segments: list[int],
    recompute: Sequence[int],
    question: int,
    q_start: int = 0,
    local: torch.Tensor | None = None,
    sink: int = 0,
    window: int = 0,
) -> tuple[SeqSlice, torch.Tensor]:
    """One sequence as a reuse policy builds it: shared segments of `segments` tokens attached at
    consecutive positions, tokens `recompute` (ascending context indices) overridden to private
    copy-on-write slots, then `question` appended; this step's queries are the recomputed tokens and
    the question together (recompute and question in one forward), from batch row `q_start`.
    Rows `local` `[L, Hkv]` (None: none) see only context tokens < `sink` and the last `window` context
    tokens (as `RedKnotPolicy.visibility` builds them). Returns the slice and its query positions `[n]`."""
    ps = pool.page_size
    kv = SeqKV(cfg.num_layers, cfg.num_kv_heads, ps, pool.device)
    ctx = sum(segments)
    start = 0
    for n in segments:
        idx = torch.arange(start, start + n)
        vis = None
        if local is not None:
            keep = (idx < sink) | (idx >= ctx - window)  # [n]
            vis = ~local[:, :, None] | keep[None, None, :]  # [L, Hkv, n]
        kv.attach(make_segment(cfg, alloc, ps, n), idx, alloc, vis)
        start += n
    ridx = torch.tensor(recompute, dtype=torch.int64)
    cow = kv.override(ridx, alloc) if recompute else None
    tail_pos = torch.arange(ctx, ctx + question)
    tail = kv.append(tail_pos, alloc)
    new_slots = tail if cow is None else torch.cat([cow, tail], dim=2)
    q_pos = torch.cat([ridx, tail_pos])
    return kv.slice(q_start, int(q_pos.shape[0]), new_slots), q_pos


def reuse_batch(
    cfg: ModelConfig,
    pool: KVPool,
    alloc: PageAllocator,
    segments: list[int],
    recompute: list[int],
    question: int,
) -> ForwardBatch:
    """A batch of the one sequence `reuse_seq` builds (no local rows)."""
    s, q_pos = reuse_seq(cfg, pool, alloc, segments, recompute, question)
    n = q_pos.shape[0]
    return ForwardBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (n,)),
        positions=q_pos,
        seqs=[s],
        logit_rows=torch.tensor([n - 1]),
    )


def layer_errors(
    cfg: ModelConfig,
    be: AttentionBackend,
    ref: AttentionBackend,
    num_tokens: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> list[float]:
    """Per layer, max |be - ref| (in float) of one attention call: random q, k, v `[N, H, D]` (strided views
    of one `[N, Hq + 2 * Hkv, D]` tensor, as the model's projection gives them) written by `be` only, then
    both run. Both backends are planned on the same batch and share one pool (`ref` reads what `be` wrote)."""
    errs = []
    for layer in range(cfg.num_layers):
        qkv = torch.randn(num_tokens, cfg.num_q_heads + 2 * cfg.num_kv_heads, cfg.head_dim, device=device, dtype=dtype)
        q, k, v = qkv.split([cfg.num_q_heads, cfg.num_kv_heads, cfg.num_kv_heads], dim=1)
        be.write_kv(layer, k, v)
        got = be.run(layer, q)
        errs.append((got.float() - ref.run(layer, q).float()).abs().max().item())
    return errs


class StubTokenizer:
    """Random-weight models have no tokenizer; the engine only decodes ids (as their decimal numbers)."""

    eos_token_id = None
    all_special_tokens: list[str] = []

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {}
