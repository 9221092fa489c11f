"""The "flashinfer" attention backend (GPU; flashinfer-python 0.5.3, imported lazily).

Head-granular pages map to FlashInfer with `num_kv_heads=1`: one row per (request, kv_head), the GQA
group as that row's q heads, rows head-major. FlashInfer's in-kernel RoPE (`ROPE_LLAMA`) places a
request's keys at positions 0..T-1 and its queries at the last q_len of them; `flashinfer_plan` maps every
batch whose positions equal kv indices onto such requests (tails, pre-rotated inside queries with a
small Triton part and a log-sum-exp merge, fresh sequences on contiguous K/V), with kv units = whole
pages when every sequence is page-aligned, else pool slots (page size 1 over the slot view, which
addresses copy-on-write slots and partial segment pages). Sequences with local-head visibility run their
tail queries (the question; decode only with `local_decode`) per (layer, kv head) row (`flashinfer_heads`: global
rows paged, local rows ragged over their gathered visible keys). Batches with position gaps, local-head
sequences with queries inside the context (recompute), or llama3 RoPE scaling (not in FlashInfer's
attention kernels) run on Triton.

Page tables differ per layer (pages are per layer) but their shape (`indptr`, `last_page_len`) does
not: `plan` runs once with layer 0's indices, `run(layer)` refills the same index buffer with layer
`layer`'s units by one device gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from redknot_rag.batch import ForwardBatch
from redknot_rag.config import ModelConfig
from redknot_rag.kernels.kv_write import write_kv_pages
from redknot_rag.kernels.paged_attention import merge_states, rope_tables, seg_paged_attention
from redknot_rag.kvcache import KVPool
from redknot_rag.rope import Rotary

from .backend import AttentionBackend, register_backend, require_uniform_layers
from .flashinfer_heads import emulate_ragged
from .flashinfer_plan import LN2, FIPlan, Requests, emulate_prefill, emulate_prefill_gqa, plan_batch, tail_len
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
    new tokens are the last q_len (host flags kept by `SeqKV`, plus the batch's host positions)."""
    del page_size  # alignment is relative to the pool's page size, which SeqKV tracks
    for s in batch.seqs:
        lay, t = s.layout, s.num_kv
        if not (lay.all_visible and lay.pos_is_index and lay.page_aligned):
            return False
        if s.q_len and (s.new_slots.shape[-1] != s.q_len):
            return False
        q_pos = batch.positions[s.q_start : s.q_start + s.q_len]
        if not torch.equal(q_pos.cpu(), torch.arange(t - s.q_len, t)):  # recompute: queries inside
            return False
    return True


def build_page_tables(batch: ForwardBatch, page_size: int) -> PageTables:
    """Page tables from the slices' device slot tables (assumes `is_contiguous_layout`): `indices` on
    the slot tables' device, the rest on the host."""
    ps = page_size
    per_seq = [s.kv_slots[:, :, ::ps] // ps for s in batch.seqs]  # [L, Hkv, P_s] (page-aligned)
    lens = [s.num_kv for s in batch.seqs]
    nl, hkv = per_seq[0].shape[:2]
    npages = torch.tensor([-(-t // ps) for t in lens], dtype=torch.int32)  # [B]
    last = torch.tensor([t - (-(-t // ps) - 1) * ps for t in lens], dtype=torch.int32)  # [B]
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


@dataclass
class _DecodeGraphState:
    """Static buffers of one decode-graph bucket: rows (seq, kv head)."""

    wrapper: Any  # flashinfer BatchDecodeWithPagedKVCacheWrapper, CUDA-graph mode
    indptr: torch.Tensor  # [R + 1] int32
    indices: torch.Tensor  # [L, cap] int32
    last_page_len: torch.Tensor  # [R] int32
    new_slots: torch.Tensor  # [L, Hkv, bs] int32


def inside_queries(batch: ForwardBatch) -> tuple[int, int]:
    """(queries inside their context, longest context of those sequences): recompute queries are q positions
    not at the tail of their sequence's kv tokens, in a sequence that is not a fresh prefill (every kv token
    new). (0, 0) for a batch without them."""
    positions = batch.positions.cpu()
    n = longest = 0
    for s in batch.seqs:
        if 1 < s.q_len < s.num_kv:
            inside = s.q_len - tail_len(positions[s.q_start : s.q_start + s.q_len], s.num_kv)
            if inside:
                n, longest = n + inside, max(longest, s.num_kv)
    return n, longest


# "auto" picks "split" over "tiles" only for batches that recompute more than this share of a context at
# least `SPLIT_MIN_CONTEXT` long (H100, bench/rag_gpu/results_rag_H100_price.json, 2026-12-08, Llama-3-8B
# shape): tiles were faster at every budget <= 20% (4K: 48 vs 168 ms at 5%; 32K: 224 vs 343 ms at 5%, 576
# vs 669 ms at 20%) and at every budget at 4K, split only at 32K with 30% (852 vs 920 ms) and 50% (1258 vs
# 1486 ms).
SPLIT_MIN_SHARE = 0.25
SPLIT_MIN_CONTEXT = 16384


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half) of x `[T, H, D]` by cos/sin `[T, 1, D]` (the `Rotary.apply` arithmetic)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@register_backend("flashinfer")
class FlashInferBackend(AttentionBackend):
    """FlashInfer for every batch whose positions equal kv indices (plain prefill and decode, relocated
    segments, copy-on-write recompute, queries inside the context; see `flashinfer_plan`; local-head visibility for
    tail queries, see `flashinfer_heads`), fresh prefills on contiguous K/V, Triton for the rest (position gaps,
    recompute on sequences with local heads, more than `max_local_slices` sequences with local heads, llama3
    RoPE scaling, which FlashInfer's in-kernel RoPE does not do).

    `emulate=True` replaces the FlashInfer calls by `flashinfer_plan.emulate_prefill` (torch), so that the
    mapping runs in CPU tests. `path` names what the last `plan` chose (benchmarks report it).
    """

    # Batches with queries inside the context (recompute): "tiles" runs the whole batch on Triton, ONE
    # launch per layer whose query tiles stop at their last position (`seg_paged_attention`, `kv_sorted`);
    # "split" maps it onto FlashInfer part A + Triton part B + merge (`flashinfer_plan`); "auto" (the
    # default) takes tiles except for large recompute shares of long contexts (`SPLIT_MIN_SHARE`).
    inside: str = "auto"
    # (token, q head) pairs per query tile on the tiles path (None: by the batch's longest row); 128
    # measured faster than None (H100, 2026-12-08: 32K at 5% 224 vs 252 ms, at 20% 576 vs 654 ms).
    tiles_block_m: int | None = 128
    # Positions per block of inside queries: part A (FlashInfer) reads the prefix once per block, part B
    # (Triton) reads at most `block` keys per query. None: about 16 blocks over the longest sequence
    # (a multiple of 512), which keeps part A's prefix re-reads and part B's share both small.
    block: int | None = None
    # Sequences with local heads per batch served by `flashinfer_heads` (host planning grows with their number).
    max_local_slices: int = 8
    # Decode-only batches with local-head sequences on `flashinfer_heads` too (off: Triton, see `plan_batch`).
    local_decode: bool = False
    # Recompute on local-head sequences: global rows on part A/B, local rows on Triton (on), or the whole
    # batch on Triton (off, the default: measured faster on an H200, bench/rag_gpu 2026-11-30, redknot:0.05
    # with 75% local heads: 39 vs 97 ms at 4K, 159 vs 210 ms at 32K).
    local_inside: bool = False

    def __init__(self, cfg: ModelConfig, pool: KVPool, rotary: Rotary, emulate: bool = False) -> None:
        require_uniform_layers(cfg, "flashinfer")
        super().__init__(cfg, pool, rotary)
        self.emulate = emulate
        self.triton = TritonBackend(cfg, pool, rotary)
        self.rope_ok = cfg.rope_scaling.kind == "default"
        self.use_triton = True
        self.graph_mode = False
        self.graph_prefill: Any = None  # graph mode, small prefill: `PrefillGraphRunner`'s wrapper
        self.path = "none"
        self.plan_fi: FIPlan | None = None
        self.indices: torch.Tensor | None = None  # graph mode: [L, nnz] device int32
        self.new_slots: torch.Tensor | None = None  # [L, Hkv, N] device int32
        self.fresh_sdpa = True
        # part A of inside queries: "rotated" (K rotated once per layer into a contiguous buffer, no
        # in-kernel RoPE, native GQA) or "pre-rotated-q" (pool pages, in-kernel RoPE, q pre-rotated)
        self.part_a = "rotated"
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bufs: dict[str, torch.Tensor] = {}
        self._head_bufs: list[torch.Tensor | None] = []  # per `flashinfer_heads` group: its global rows' page indices
        self._head_wrappers: list[tuple[Any, Any]] = []  # per group: (paged, ragged) prefill wrappers, reused
        self._rot_wrappers: dict[int, Any] = {}  # part A over n < Hkv kv heads (layers with local heads)
        self._pre_heads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if emulate:
            return
        fi = import_flashinfer()
        if pool.device.type != "cuda":
            raise RuntimeError("attention backend 'flashinfer' needs the KV pool on a CUDA device")
        self.fi = fi
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        g = cfg.num_kv_groups
        self.eager_decode = fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=g >= 4)
        self.decode = self.eager_decode  # the CUDA-graph runner swaps in its fixed-size wrappers
        self.prefill = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.prefill_full = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.prefill_rot = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        for w in (self.eager_decode, self.prefill, self.prefill_full):
            if not hasattr(w, "_paged_kv_indices_buf"):
                raise RuntimeError("unsupported flashinfer version: wrapper lacks _paged_kv_indices_buf")
        # [num_pages, page_size, num_kv_heads=1, head_dim] views of the pool (NHD)
        self.kv_cache = (pool.k.unsqueeze(2), pool.v.unsqueeze(2))

    def plan_kwargs(self, page_size: int | None = None) -> dict[str, Any]:
        return dict(
            num_qo_heads=self.cfg.num_kv_groups,
            num_kv_heads=1,
            page_size=self.pool.page_size if page_size is None else page_size,
            pos_encoding_mode="ROPE_LLAMA",
            q_data_type=self.pool.dtype,
            kv_data_type=self.pool.dtype,
            sm_scale=self.cfg.attn_scale,
            rope_scale=1.0,
            rope_theta=self.cfg.rope_theta,
        )

    def _units(self, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V pool views by unit: `[num_units, unit, D]` (unit = page_size; 1 = the slot view)."""
        d = self.cfg.head_dim
        if page_size == 1:
            return self.pool.k.view(-1, 1, d), self.pool.v.view(-1, 1, d)
        return self.pool.k, self.pool.v

    def _use_tiles(self, batch: ForwardBatch) -> bool:
        """Whether a batch goes to the tiles path (`inside`): only batches with inside queries do."""
        if self.inside not in ("auto", "tiles", "split"):
            raise ValueError(f"FlashInferBackend.inside must be 'auto', 'tiles' or 'split', not {self.inside!r}")
        n, longest = inside_queries(batch)
        if not n or self.inside == "split":
            return False
        return self.inside == "tiles" or not (longest >= SPLIT_MIN_CONTEXT and n > SPLIT_MIN_SHARE * longest)

    def plan(self, batch: ForwardBatch) -> None:
        self.decode = self.eager_decode if not self.emulate else None
        self.graph_mode = False
        self.graph_prefill = None
        self._kv = None
        ok = self.rope_ok and bool(batch.seqs) and all(s.layout.pos_is_index for s in batch.seqs)
        dev = self.pool.device
        p = None
        tiles = ok and self._use_tiles(batch)
        self.triton.block_m = self.tiles_block_m if tiles else None
        if ok and not tiles:
            block = self.block
            if block is None:
                longest = max(s.num_kv for s in batch.seqs)
                block = max(512, -(-longest // (16 * 512)) * 512)
            p = plan_batch(
                batch, self.cfg.num_kv_heads, self.pool.page_size, block, dev, self.fresh_sdpa,
                self.max_local_slices, self.local_decode, self.local_inside,
            )  # fmt: skip
        self.use_triton = p is None
        if p is None:
            self.triton.plan(batch)
            self.path = "triton-tiles" if tiles else "triton"  # tiles: one launch per layer, bounded by position
            return
        self.plan_fi = p
        self._seqs = batch.seqs
        self.q_pos = batch.positions.to(dev, non_blocking=True)
        self.new_slots = batch.new_slots().to(dev, torch.int32).contiguous()
        if p.fresh:  # cos/sin of the step's rows, once per step (not per layer): [N, 1, D]
            self._cos_sin = self.rotary.cos_sin(self.q_pos[:, None], self.pool.dtype)
        parts = (["sdpa"] if p.fresh else []) + (["flashinfer"] if p.causal or p.full or p.heads else [])
        if p.heads is not None and any(g.loc_qo_indptr is not None for g in p.heads.groups):
            parts.append("local-ragged")
        local_in = p.heads.inside if p.heads is not None else None
        self.path = "+".join(
            parts + (["triton-inside"] if p.inside else []) + (["triton-local-inside"] if local_in else [])
        )
        if p.heads is not None:
            self._plan_heads(p)
        if p.inside is not None or local_in is not None:
            mx = int(p.inside.kv_pos.max()) if p.inside is not None and p.inside.kv_pos.numel() else 0
            mx = max(mx, local_in.max_pos if local_in is not None else 0)
            if mx >= self.triton.cos.shape[0]:
                self.triton.cos, self.triton.sin = rope_tables(self.triton.inv_freq, 2 * mx + 1, self.pool.dtype)
        pre = p.prefix if self.part_a == "rotated" else None
        self._pre_heads = None
        if pre is not None:
            hkv, d, g = self.cfg.num_kv_heads, self.cfg.head_dim, self.cfg.num_kv_groups
            # flat: viewed [buf_len, n, D] for a layer whose part A runs n kv heads
            self._kbuf = torch.empty(pre.buf_len * hkv * d, dtype=self.pool.dtype, device=dev)
            self._vbuf = torch.empty_like(self._kbuf)
            self._pre_heads = self._prefix_heads(p)
            sizes = {hkv} if self._pre_heads is None else {int(kh.numel()) for kh, _ in self._pre_heads} - {0}
            for n_h in sorted(sizes) if not self.emulate else ():
                if n_h == hkv:
                    w = self.prefill_rot
                else:
                    w = self._rot_wrappers.get(n_h)
                    if w is None:
                        w = self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
                        self._rot_wrappers[n_h] = w
                w.plan(
                    pre.qo_indptr.to(dev), pre.kv_indptr.to(dev), pre.indices,
                    torch.ones(pre.qo_indptr.shape[0] - 1, dtype=torch.int32, device=dev),
                    num_qo_heads=n_h * g, num_kv_heads=n_h, head_dim_qk=d, page_size=1,
                    causal=False, pos_encoding_mode="NONE", q_data_type=self.pool.dtype,
                    kv_data_type=self.pool.dtype, sm_scale=self.cfg.attn_scale,
                )  # fmt: skip
        for name, rq in (("causal", p.causal), ("full", p.full)):
            if rq is None or (name == "full" and pre is not None):
                continue
            buf = torch.index_select(p.units[0], 0, rq.gather)  # layer 0; run() refills per layer
            self._bufs[name] = buf
            if self.emulate:
                continue
            d = self.cfg.head_dim
            kw = self.plan_kwargs(p.page_size)
            if name == "causal" and p.is_decode:
                self.decode.plan(rq.kv_indptr.to(dev), buf, rq.last_page_len.to(dev), head_dim=d, **kw)
                continue
            w = self.prefill if name == "causal" else self.prefill_full
            w.plan(
                rq.qo_indptr.to(dev), rq.kv_indptr.to(dev), buf, rq.last_page_len.to(dev),
                head_dim_qk=d, causal=rq.causal, **kw,
            )  # fmt: skip

    def _plan_heads(self, p: FIPlan) -> None:
        """One (paged, ragged) plan pair per `flashinfer_heads` group; the paged index buffer is filled for the
        group's first layer here and refilled per layer in `_heads`."""
        assert p.heads is not None
        dev, d, dt = self.pool.device, self.cfg.head_dim, self.pool.dtype
        self._head_bufs = []
        for gi, grp in enumerate(p.heads.groups):
            buf = None
            if grp.glob_qo_indptr is not None:
                buf = torch.index_select(p.units[grp.layers[0]], 0, grp.rows[grp.layers[0]].glob_gather)
            self._head_bufs.append(buf)
            if self.emulate:
                continue
            while len(self._head_wrappers) <= gi:
                self._head_wrappers.append((
                    self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2"),
                    self.fi.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD", backend="fa2"),
                ))  # fmt: skip
            paged, ragged = self._head_wrappers[gi]
            if buf is not None:
                assert grp.glob_qo_indptr is not None and grp.glob_kv_indptr is not None
                assert grp.glob_last_page_len is not None
                paged.plan(
                    grp.glob_qo_indptr.to(dev), grp.glob_kv_indptr.to(dev), buf, grp.glob_last_page_len.to(dev),
                    head_dim_qk=d, causal=True, **self.plan_kwargs(p.page_size),
                )  # fmt: skip
            if grp.loc_qo_indptr is not None:
                assert grp.loc_kv_indptr is not None
                ragged.plan(
                    grp.loc_qo_indptr.to(dev), grp.loc_kv_indptr.to(dev), num_qo_heads=self.cfg.num_kv_groups,
                    num_kv_heads=1, head_dim_qk=d, causal=True, pos_encoding_mode="NONE", q_data_type=dt,
                    kv_data_type=dt, sm_scale=self.cfg.attn_scale,
                )  # fmt: skip

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.use_triton:
            self.triton.write_kv(layer, k, v)
            return
        assert self.new_slots is not None
        write_kv_pages(self.pool.k_slots, self.pool.v_slots, self.new_slots[layer], k, v)
        if self.plan_fi is not None and self.plan_fi.fresh and not self.graph_mode:
            self._kv = (k, v)

    # ---- run ----------------------------------------------------------------------------------
    def _requests(
        self, layer: int, q: torch.Tensor, rq: Requests, name: str, want_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one request set: q rows gathered (and pre-rotated), head-major rows, out `[nq, Hq, D]`."""
        p = self.plan_fi
        assert p is not None
        cfg = self.cfg
        hkv, g, d = cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        qs = q if rq.rows_identity and rq.num_q == q.shape[0] else q[rq.q_rows]  # [nq, Hq, D]
        if rq.q_delta is not None:
            qs = self.rotary.apply(qs.float().transpose(0, 1), rq.q_delta).transpose(0, 1).to(q.dtype)
        nq = qs.shape[0]
        qh = qs.reshape(nq, hkv, g, d).transpose(0, 1).reshape(hkv * nq, g, d)  # rows (head, request)
        buf = self._bufs[name]
        if layer:
            torch.index_select(p.units[layer], 0, rq.gather, out=buf)
        lse: torch.Tensor | None
        if self.emulate:
            ku, vu = self._units(p.page_size)
            o, lse = emulate_prefill(
                qh, ku, vu, rq.qo_indptr, rq.kv_indptr, buf, rq.last_page_len, rq.causal,
                self.rotary.inv_freq, self.cfg.attn_scale,
            )  # fmt: skip
        else:
            kv = self.kv_cache if p.page_size > 1 else (
                self.pool.k.view(-1, 1, 1, d), self.pool.v.view(-1, 1, 1, d)
            )  # fmt: skip
            if name == "causal" and p.is_decode:
                o, lse = self.decode.run(qh, kv), None
            elif want_lse:
                w = self.prefill if name == "causal" else self.prefill_full
                o, lse = w.run(qh, kv, return_lse=True)
            else:
                w = self.prefill if name == "causal" else self.prefill_full
                o, lse = w.run(qh, kv), None
        out = o.view(hkv, nq, g, d).transpose(0, 1).reshape(nq, hkv * g, d)
        if lse is not None:
            lse = lse.view(hkv, nq, g).transpose(0, 1).reshape(nq, hkv * g) * LN2  # base 2 -> natural
        return out, lse

    def _fresh(self, q: torch.Tensor, out: torch.Tensor | None, rows: slice) -> torch.Tensor:
        """Causal attention of a whole fresh sequence over its own K/V (contiguous; K rotated once).
        Writes into `out[rows]`, or returns `[T, Hq, D]` when `out` is None."""
        assert self._kv is not None
        k, v = self._kv
        cos, sin = (c[rows] for c in self._cos_sin)  # [T, 1, D]
        qf = _rotate(q[rows], cos, sin).transpose(0, 1)  # [Hq, T, D] (a view of [T, Hq, D])
        kf = _rotate(k[rows], cos, sin).transpose(0, 1)  # [Hkv, T, D]
        vf = v[rows].transpose(0, 1).to(qf.dtype)
        o = F.scaled_dot_product_attention(
            qf[None], kf[None].to(qf.dtype), vf[None], is_causal=True, enable_gqa=True, scale=self.cfg.attn_scale
        )  # [1, Hq, T, D]
        if out is None:
            return o[0].transpose(0, 1)
        out[rows] = o[0].transpose(0, 1)
        return out

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return self.triton.run(layer, q)
        if self.graph_mode:
            return self._run_graph(layer, q)
        p = self.plan_fi
        assert p is not None
        n = q.shape[0]
        if len(p.fresh) == 1 and p.fresh[0][1] == slice(0, n):  # one fresh sequence: the whole step
            return self._fresh(q, None, p.fresh[0][1])
        if p.causal is not None and p.causal.num_q == n and p.causal.rows_identity and p.inside is None:
            return self._requests(layer, q, p.causal, "causal", False)[0]  # tails in row order: no scatter
        out = torch.empty_like(q)
        for _, rows in p.fresh:
            self._fresh(q, out, rows)
        if p.causal is not None:
            o, _ = self._requests(layer, q, p.causal, "causal", False)
            out[p.causal.q_rows] = o
        if p.heads is not None:
            self._heads(layer, q, out)
        ins = p.inside
        if ins is not None:
            from redknot_rag.kernels.paged_attention import SegPagedMeta

            meta = SegPagedMeta(
                q_pos=ins.q_pos, row_q_start=ins.row_q_start, row_q_len=ins.row_q_len, row_head=ins.row_head,
                kv_indptr=ins.kv_indptr, kv_slots=p.slot_units[layer][ins.kv_gather].to(torch.int32),
                kv_pos=ins.kv_pos, max_q_len=ins.max_q_len,
            )  # fmt: skip
            q_in = q[ins.q_rows].contiguous()  # [n_in, Hq, D]
            o_b, lse_b = seg_paged_attention(
                q_in, self.pool.k_slots, self.pool.v_slots, meta, self.triton.cos, self.triton.sin,
                self.cfg.num_kv_groups, sm_scale=self.cfg.attn_scale,
            )  # fmt: skip
            if p.full is not None:
                lse_a: torch.Tensor | None
                qh: torch.Tensor | None = None  # q heads part A ran (None: all)
                if self.part_a == "rotated":
                    o_a, lse_a, qh = self._prefix(layer, q)
                else:
                    o_a, lse_a = self._requests(layer, q, p.full, "full", True)
                assert lse_a is not None
                sel = ins.part_a
                ai = ins.a_index[sel]
                if qh is None:
                    o_m, _ = merge_states(o_a[ai], lse_a[ai], o_b[sel], lse_b[sel])
                    o_b[sel] = o_m
                elif qh.numel():  # other heads: local rows, overwritten by `_local_inside`
                    ob, lb = o_b[sel], lse_b[sel]  # [n_a, Hq, D], [n_a, Hq] (copies)
                    ob[:, qh], _ = merge_states(o_a[ai], lse_a[ai], ob[:, qh], lb[:, qh])
                    o_b[sel] = ob
            out[ins.q_rows] = o_b
        if p.heads is not None and p.heads.inside is not None:
            self._local_inside(layer, q, out)  # after part A/B: it overwrites their local heads
        return out

    def _local_inside(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """Local rows of local-head slices with inside queries (`flashinfer_heads.LocalInside`): every query of the
        slice over the row's visible keys, causal by position (Triton). Writes those (row, head) results."""
        from redknot_rag.kernels.paged_attention import SegPagedMeta

        p = self.plan_fi
        assert p is not None and p.heads is not None and p.heads.inside is not None
        li = p.heads.inside
        ly = li.layers[layer]
        if not ly.row_head.numel():
            return
        cfg = self.cfg
        hkv, g, d = cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        meta = SegPagedMeta(
            q_pos=li.q_pos, row_q_start=ly.row_q_start, row_q_len=ly.row_q_len, row_head=ly.row_head,
            kv_indptr=ly.kv_indptr, kv_slots=ly.kv_slots, kv_pos=ly.kv_pos, max_q_len=li.max_q_len,
        )  # fmt: skip
        q_in = q[li.q_rows].contiguous()  # [n, Hq, D]
        o, _ = seg_paged_attention(
            q_in, self.pool.k_slots, self.pool.v_slots, meta, self.triton.cos, self.triton.sin, g,
            sm_scale=cfg.attn_scale,
        )  # fmt: skip
        n = q_in.shape[0]
        o4 = o.view(n, hkv, g, d)  # only the listed (row, head) pairs are defined
        out.view(out.shape[0], hkv, g, d)[li.q_rows[ly.out_q[0]], ly.out_q[1]] = o4[ly.out_q[0], ly.out_q[1]]

    def _heads(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """Tail queries by row (`flashinfer_heads`): global rows over pool units (in-kernel RoPE), local rows over
        their visible keys gathered, K rotated at true positions, ragged and causal. Writes `out` rows."""
        p = self.plan_fi
        assert p is not None and p.heads is not None
        cfg = self.cfg
        n, hkv, g, d = q.shape[0], cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        gi = p.heads.group_of[layer]
        grp, rows = p.heads.groups[gi], p.heads.groups[gi].rows[layer]
        q4, out4 = q.view(n, hkv, g, d), out.view(n, hkv, g, d)  # rows (token, kv head) hold g q heads
        if grp.glob_qo_indptr is not None:
            assert grp.glob_kv_indptr is not None and grp.glob_last_page_len is not None
            buf = self._head_bufs[gi]
            assert buf is not None
            torch.index_select(p.units[layer], 0, rows.glob_gather, out=buf)
            qg = q4[rows.glob_q[0], rows.glob_q[1]]  # [nq_g, g, D]
            if self.emulate:
                ku, vu = self._units(p.page_size)
                o, _ = emulate_prefill(
                    qg, ku, vu, grp.glob_qo_indptr, grp.glob_kv_indptr, buf, grp.glob_last_page_len, True,
                    self.rotary.inv_freq, cfg.attn_scale,
                )  # fmt: skip
            else:
                kv = self.kv_cache if p.page_size > 1 else (
                    self.pool.k.view(-1, 1, 1, d), self.pool.v.view(-1, 1, 1, d)
                )  # fmt: skip
                o = self._head_wrappers[gi][0].run(qg, kv)
            out4[rows.glob_q[0], rows.glob_q[1]] = o
        if grp.loc_qo_indptr is not None:
            assert grp.loc_kv_indptr is not None
            rot = self.rotary.for_layer(layer)
            k = rot.apply(self.pool.k_slots[rows.loc_slots], rows.loc_pos)[:, None]  # [nnz_l, 1, D], rotated
            v = self.pool.v_slots[rows.loc_slots][:, None]  # [nnz_l, 1, D]
            ql = q4[rows.loc_q[0], rows.loc_q[1]]  # [nq_l, g, D]
            ql = rot.apply(ql.transpose(0, 1), rows.loc_q_pos).transpose(0, 1).contiguous()  # at true positions
            if self.emulate:
                o, _ = emulate_ragged(ql, k, v, grp.loc_qo_indptr, grp.loc_kv_indptr, True, cfg.attn_scale)
            else:
                o = self._head_wrappers[gi][1].run(ql, k, v)
            out4[rows.loc_q[0], rows.loc_q[1]] = o

    def _prefix_heads(self, p: FIPlan) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, the kv heads part A must run (a global row in some part-A slice) and their q heads
        (device int64); None when that is every head of every layer. A head left out is local in every
        part-A slice, so `_local_inside` serves all its queries."""
        pre, hp = p.prefix, p.heads
        if pre is None or hp is None:
            return None
        cfg = self.cfg
        need = np.zeros((cfg.num_layers, cfg.num_kv_heads), dtype=bool)
        for si, _, _ in pre.slices:
            full = hp.is_full.get(si)
            need |= True if full is None else full
        if need.all():
            return None
        dev, g = self.pool.device, cfg.num_kv_groups
        by_mask: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for row in need:
            if row.tobytes() not in by_mask:
                kh = np.nonzero(row)[0]
                qh = (kh[:, None] * g + np.arange(g)).reshape(-1)
                by_mask[row.tobytes()] = (torch.from_numpy(kh).to(dev), torch.from_numpy(qh).to(dev))
            out.append(by_mask[row.tobytes()])
        return out

    def _prefix(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Part A over rotated contiguous K/V (`flashinfer_plan.Prefix`) for the layer's part-A heads
        (`_prefix_heads`): out `[nq, n * g, D]`, lse `[nq, n * g]` natural, and those q heads `[n * g]`
        (None: all heads, n = Hkv)."""
        p = self.plan_fi
        assert p is not None and p.prefix is not None
        pre, rot, d, hkv = p.prefix, self.rotary.for_layer(layer), self.cfg.head_dim, self.cfg.num_kv_heads
        kh, qh = self._pre_heads[layer] if self._pre_heads is not None else (None, None)
        n_h = hkv if kh is None else int(kh.numel())
        if n_h == 0:
            empty = q.new_zeros(0, 0, d)
            return empty, empty[:, :, 0].float(), qh
        kbuf = self._kbuf[: pre.buf_len * n_h * d].view(pre.buf_len, n_h, d)
        vbuf = self._vbuf[: pre.buf_len * n_h * d].view(pre.buf_len, n_h, d)
        for si, off, t in pre.slices:  # K rotated once per layer (not per query tile), V made contiguous
            slots = self._seqs[si].kv_slots[layer]  # [Hkv, T]
            if kh is not None:
                slots = slots[kh]  # [n, T]
            kbuf[off : off + t] = rot.apply(self.pool.k_slots[slots], self._seqs[si].kv_pos).transpose(0, 1)
            vbuf[off : off + t] = self.pool.v_slots[slots].transpose(0, 1)
        qs = q[pre.q_rows] if qh is None else q[pre.q_rows][:, qh]  # [nq, n * g, D]
        qa = rot.apply(qs.transpose(0, 1), pre.q_pos).transpose(0, 1).contiguous()
        if self.emulate:
            o, lse = emulate_prefill_gqa(qa, kbuf, vbuf, pre.qo_indptr, pre.kv_indptr, pre.indices, self.cfg.attn_scale)
        else:
            w = self.prefill_rot if n_h == hkv else self._rot_wrappers[n_h]
            o, lse = w.run(qa, (kbuf.view(-1, 1, n_h, d), vbuf.view(-1, 1, n_h, d)), return_lse=True)
        return o, lse * LN2, qh  # base 2 -> natural

    # -- CUDA-graph hooks, decode: state = _DecodeGraphState --------------------------------------
    def init_capture_graph(self, bs: int, max_kv_tokens: int) -> _DecodeGraphState:
        """A CUDA-graph decode wrapper over rows (seq, kv head) with static page tables of every layer;
        pad rows read one token of page 0 (output discarded) and write K/V nowhere (slot -1)."""
        cfg, dev = self.cfg, self.pool.device
        r = bs * cfg.num_kv_heads
        cap = max_kv_tokens // self.pool.page_size + 2 * r
        indptr = torch.arange(r + 1, dtype=torch.int32, device=dev)
        indices = torch.zeros(cfg.num_layers, cap, dtype=torch.int32, device=dev)
        lpl = torch.ones(r, dtype=torch.int32, device=dev)
        w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=cfg.num_kv_groups >= 4,
            paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices[0], paged_kv_last_page_len_buffer=lpl,
        )  # fmt: skip
        ns = torch.full((cfg.num_layers, cfg.num_kv_heads, bs), -1, dtype=torch.int32, device=dev)
        w.plan(indptr.cpu(), indices[0, :r].cpu(), lpl.cpu(), head_dim=cfg.head_dim, **self.plan_kwargs())
        return _DecodeGraphState(w, indptr, indices, lpl, ns)

    def prepare_for_capture(self, state: Any) -> None:
        self.use_triton = False
        self.graph_mode = True
        self.graph_prefill = None  # a prefill graph may have been installed last
        self.decode = state.wrapper
        self.indices = state.indices
        self.new_slots = state.new_slots

    def prepare_for_replay(self, state: Any, batch: ForwardBatch) -> bool:
        if not (self.rope_ok and is_contiguous_layout(batch, self.pool.page_size)):
            return False
        pt = build_page_tables(batch, self.pool.page_size)
        r_real, r = pt.last_page_len.shape[0], state.last_page_len.shape[0]
        nnz = int(pt.indptr[-1])
        if nnz + (r - r_real) > state.indices.shape[1]:
            return False
        pad = r - r_real  # each pad row reads page 0 (one token), output discarded
        indptr = torch.cat([pt.indptr, pt.indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)])
        lpl = torch.cat([pt.last_page_len, torch.ones(pad, dtype=torch.int32)])
        idx = torch.cat([pt.indices, pt.indices.new_zeros(pt.indices.shape[0], pad)], dim=1)
        state.indices[:, : idx.shape[1]].copy_(idx, non_blocking=True)
        state.wrapper._paged_kv_indices_buf = state.indices[0]
        state.wrapper.plan(indptr, idx[0], lpl, head_dim=self.cfg.head_dim, **self.plan_kwargs())
        state.new_slots.fill_(-1)
        state.new_slots[:, :, : len(batch.seqs)].copy_(batch.new_slots().to(torch.int32), non_blocking=True)
        self.prepare_for_capture(state)
        return True

    # -- CUDA-graph hooks, one small prefill (rows (head, real | padding), see graphs/prefill.py) ---
    def init_prefill_graph(self, num_requests: int, indices: torch.Tensor) -> Any:
        """A CUDA-graph prefill wrapper of `num_requests` requests reading page indices from
        `indices[layer]` (`[L, cap]` int32, shared by the buckets: one replays at a time)."""

        def i32(size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.int32, device=self.pool.device)

        return self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, backend="fa2", qo_indptr_buf=i32(num_requests + 1),
            paged_kv_indptr_buf=i32(num_requests + 1), paged_kv_indices_buf=indices[0],
            paged_kv_last_page_len_buf=i32(num_requests),
        )  # fmt: skip

    def plan_prefill_graph(
        self, wrapper: Any, indices: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
        page_indices: torch.Tensor, last_page_len: torch.Tensor,
    ) -> None:  # fmt: skip
        """Host plan of a prefill graph's wrapper: requests `qo_indptr`/`kv_indptr` `[R + 1]`, `last_page_len`
        `[R]` int32 host; `page_indices` `[L, nnz]` int32 device, copied into `indices` `[L, cap]`."""
        indices[:, : page_indices.shape[1]].copy_(page_indices, non_blocking=True)
        wrapper._paged_kv_indices_buf = indices[0]  # capture left it on the last layer's row
        wrapper.plan(
            qo_indptr, kv_indptr, page_indices[0], last_page_len, head_dim_qk=self.cfg.head_dim, causal=True,
            **self.plan_kwargs(),
        )  # fmt: skip

    def prepare_prefill_graph(self, wrapper: Any, indices: torch.Tensor, new_slots: torch.Tensor) -> None:
        """Make `write_kv`/`run` read a prefill graph's static buffers (before capture and each replay)."""
        self.use_triton = False
        self.graph_mode = True
        self.graph_prefill = wrapper
        self.indices = indices
        self.new_slots = new_slots
        self.path = "flashinfer-graph"

    def _run_graph(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Under a CUDA graph, with static page tables installed by the graph runner: decode
        (`DecodeGraphRunner`, rows (seq, head)) or one small prefill (`PrefillGraphRunner`, rows
        (head, real | padding) over the query rows (head, token))."""
        assert self.indices is not None
        cfg = self.cfg
        n, hkv, g, d = q.shape[0], cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        w = self.graph_prefill
        if w is not None:
            w._paged_kv_indices_buf = self.indices[layer]
            qh = q.reshape(n, hkv, g, d).transpose(0, 1).reshape(hkv * n, g, d)  # rows (head, token)
            o = w.run(qh, self.kv_cache)  # [Hkv * n, g, D]
            return o.view(hkv, n, g, d).transpose(0, 1).reshape(n, hkv * g, d)
        self.decode._paged_kv_indices_buf = self.indices[layer]
        o = self.decode.run(q.reshape(n * hkv, g, d), self.kv_cache)  # [B*Hkv, g, D]
        return o.view(n, hkv * g, d)
