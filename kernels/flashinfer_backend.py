"""The "flashinfer" attention backend (GPU; flashinfer-python 0.5.3, imported lazily).

Head-granular pages map to FlashInfer with `num_kv_heads=1`: one row per (sequence, kv_head), the GQA
group as that row's q heads. FlashInfer's in-kernel RoPE (`ROPE_LLAMA`) places a row's keys at
positions 0..T-1 and its queries at the last q_len of them, so it is used only when that is exactly
the layout: every row sees all its tokens, positions are 0..T-1, pages are full except the last
(no shared segment with a partial page in the middle), and the RoPE variant is plain
(theta only; llama3 frequency scaling is not in FlashInfer's attention kernels). Any other batch
(position gaps, local heads, partial segment pages, llama3 RoPE) runs on the Triton kernel — the
same answer, as the tests check.

Page tables differ per layer (pages are per layer) but their shape (`indptr`, `last_page_len`) does
not, so `plan` runs once with layer 0's indices and `run(layer)` points the wrapper at row `layer`
of `indices [L, nnz]` (one attribute store, no copy, no kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from redknot_rag.attention import AttentionBackend, register_backend, require_uniform_layers
from redknot_rag.batch import ForwardBatch
from redknot_rag.config import ModelConfig
from redknot_rag.kvcache import KVPool
from redknot_rag.rope import Rotary

from .kv_write import write_kv_pages
from .triton_backend import TritonBackend

WORKSPACE_BYTES = 256 * 1024 * 1024


def import_flashinfer() -> Any:
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(
            "attention backend 'flashinfer' needs flashinfer-python==0.5.3 and a CUDA GPU "
            "(pip install 'redknot-rag[gpu]'); use backend 'triton' or 'torch' instead"
        ) from e
    return flashinfer


@dataclass
class PageTables:
    """FlashInfer page tables for all layers (host int32): rows in `order` ("seq" = row s*Hkv+h,
    decode; "head" = row h*B+s, prefill, so each row's q tokens are contiguous after a transpose).

    `indptr [R + 1]`, `indices [L, nnz]`, `last_page_len [R]`; `qo_indptr [R + 1]` (prefill order).
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    qo_indptr: torch.Tensor
    is_decode: bool


def is_contiguous_layout(batch: ForwardBatch, page_size: int) -> bool:
    """True iff every (layer, head) sees all tokens at positions 0..T-1 in page-aligned slots and the
    new tokens are the last q_len. Uses SeqKV's construction: tokens fill pages in order and only a
    segment whose length is not a multiple of page_size breaks alignment (the next token starts a page).
    """
    for s in batch.seqs:
        kv, t = s.kv, s.kv.num_tokens
        if kv.visible is not None and not bool(kv.visible[:, :, :t].all()):
            return False
        if not torch.equal(kv.positions[:t], torch.arange(t)):
            return False
        for att in kv.segments:
            ends_seq = att.seq_start + att.segment.num_tokens == t
            if att.seq_start % page_size or (att.segment.num_tokens % page_size and not ends_seq):
                return False
        if s.q_len and (s.new_slots.shape[-1] != s.q_len):
            return False
        if kv.cow_pages:  # recomputed tokens sit in copy-on-write pages: page runs are broken
            return False
        q_pos = batch.positions[s.q_start : s.q_start + s.q_len]
        if not torch.equal(q_pos, torch.arange(t - s.q_len, t)):  # recompute: queries inside the context
            return False
    return True


def build_page_tables(batch: ForwardBatch, page_size: int) -> PageTables:
    """Host page tables from SeqKV slots (assumes `is_contiguous_layout`)."""
    ps = page_size
    per_seq = []  # [L, Hkv, P_s]
    lens = []
    for s in batch.seqs:
        t = s.kv.num_tokens
        per_seq.append(s.kv.slots[:, :, :t:ps] // ps)
        lens.append(t)
    nl, hkv = per_seq[0].shape[:2]
    npages = torch.tensor([p.shape[2] for p in per_seq], dtype=torch.int32)  # [B]
    last = torch.tensor([t - (p.shape[2] - 1) * ps for t, p in zip(lens, per_seq, strict=True)])
    last = last.to(torch.int32)  # [B] tokens in each row's last page
    is_decode = all(s.is_decode for s in batch.seqs)
    q_len = torch.tensor([s.q_len for s in batch.seqs], dtype=torch.int32)
    if is_decode:
        indices = torch.cat([p.reshape(nl, -1) for p in per_seq], dim=1)  # [L, nnz], rows (seq, head)
        counts, lpl = npages.repeat_interleave(hkv), last.repeat_interleave(hkv)
        qo = torch.ones_like(counts)
    else:
        indices = torch.cat(per_seq, dim=2).reshape(nl, -1)  # [L, Hkv * sum P], rows (head, seq)
        counts, lpl, qo = npages.repeat(hkv), last.repeat(hkv), q_len.repeat(hkv)
    indptr = torch.zeros(counts.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0)
    qo_indptr = torch.zeros_like(indptr)
    qo_indptr[1:] = qo.cumsum(0)
    return PageTables(indptr, indices.to(torch.int32).contiguous(), lpl, qo_indptr, is_decode)


@register_backend("flashinfer")
class FlashInferBackend(AttentionBackend):
    """FlashInfer paged decode/prefill with in-kernel RoPE where the layout allows; Triton otherwise."""

    def __init__(self, cfg: ModelConfig, pool: KVPool, rotary: Rotary) -> None:
        require_uniform_layers(cfg, "flashinfer")
        super().__init__(cfg, pool, rotary)
        fi = import_flashinfer()
        if pool.device.type != "cuda":
            raise RuntimeError("attention backend 'flashinfer' needs the KV pool on a CUDA device")
        self.fi = fi
        self.triton = TritonBackend(cfg, pool, rotary)
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        g = cfg.num_kv_groups
        self.eager_decode = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=g >= 4
        )
        self.decode = self.eager_decode  # the CUDA-graph runner swaps in its fixed-size wrappers
        self.prefill = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        for w in (self.eager_decode, self.prefill):
            if not hasattr(w, "_paged_kv_indices_buf"):
                raise RuntimeError("unsupported flashinfer version: wrapper lacks _paged_kv_indices_buf")
        self.rope_ok = cfg.rope_scaling.kind == "default"
        # [num_pages, page_size, num_kv_heads=1, head_dim] views of the pool (NHD)
        self.kv_cache = (pool.k.unsqueeze(2), pool.v.unsqueeze(2))
        self.use_triton = True
        self.indices: torch.Tensor | None = None  # [L, nnz] device int32
        self.new_slots: torch.Tensor | None = None  # [L, Hkv, N] device int32
        self.num_tokens = 0

    def plan_kwargs(self) -> dict[str, Any]:
        return dict(
            num_qo_heads=self.cfg.num_kv_groups,
            num_kv_heads=1,
            page_size=self.pool.page_size,
            pos_encoding_mode="ROPE_LLAMA",
            q_data_type=self.pool.dtype,
            kv_data_type=self.pool.dtype,
            sm_scale=self.cfg.head_dim**-0.5,
            rope_scale=1.0,
            rope_theta=self.cfg.rope_theta,
        )

    def plan(self, batch: ForwardBatch) -> None:
        self.decode = self.eager_decode
        self.use_triton = not (self.rope_ok and is_contiguous_layout(batch, self.pool.page_size))
        if self.use_triton:
            self.triton.plan(batch)
            return
        dev = self.pool.device
        pt = build_page_tables(batch, self.pool.page_size)
        self.indices = pt.indices.to(dev, non_blocking=True)
        self.new_slots = batch.new_slots().to(torch.int32).to(dev, non_blocking=True).contiguous()
        self.num_tokens = batch.num_tokens
        self.is_decode = pt.is_decode
        kw = self.plan_kwargs()
        d = self.cfg.head_dim
        if pt.is_decode:
            self.decode.plan(pt.indptr.to(dev), self.indices[0], pt.last_page_len.to(dev), head_dim=d, **kw)
        else:
            self.prefill.plan(
                pt.qo_indptr.to(dev), pt.indptr.to(dev), self.indices[0], pt.last_page_len.to(dev),
                head_dim_qk=d, causal=True, **kw,
            )  # fmt: skip

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.use_triton:
            self.triton.write_kv(layer, k, v)
            return
        assert self.new_slots is not None
        write_kv_pages(self.pool.k_slots, self.pool.v_slots, self.new_slots[layer], k, v)

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return self.triton.run(layer, q)
        assert self.indices is not None
        cfg = self.cfg
        n, hkv, g, d = q.shape[0], cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        if self.is_decode:
            self.decode._paged_kv_indices_buf = self.indices[layer]
            o = self.decode.run(q.reshape(n * hkv, g, d), self.kv_cache)  # rows (seq, head): [B*Hkv, g, D]
            return o.view(n, hkv * g, d)
        self.prefill._paged_kv_indices_buf = self.indices[layer]
        qh = q.view(n, hkv, g, d).transpose(0, 1).reshape(hkv * n, g, d)  # rows (head, seq): [Hkv*N, g, D]
        o = self.prefill.run(qh, self.kv_cache)
        return o.view(hkv, n, g, d).transpose(0, 1).reshape(n, hkv * g, d)  # [N, Hq, D]
