"""CUDA graphs for the whole decode step (`CausalLM.forward` on a decode-only batch).

One graph per batch-size bucket (1, 2, 4, ... 64). Every tensor the step reads lives in static
buffers: input ids, positions, logit rows, and the backend's metadata (`GraphSlot`). Metadata for a
real batch is prepared on the host and copied into the bucket's buffers *outside* the graph; rows
beyond the real batch are padding (no key for triton; one harmless page for flashinfer; their K/V
writes go to slot -1 = skipped). Page tables change length between steps; the buffers hold up to
`max_kv_tokens` keys per layer (or pages, for flashinfer) and a batch that does not fit runs eagerly.

Inside capture and replay the model calls `plan()` on a proxy that does nothing: planning is host
work and happened before replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from redknot_rag.attention import AttentionBackend
from redknot_rag.batch import ForwardBatch
from redknot_rag.model import CausalLM

from .flashinfer_backend import FlashInferBackend, build_page_tables, is_contiguous_layout
from .seg_meta import SegPagedPlan, build_plan
from .triton_backend import TritonBackend, choose_num_splits

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class PlannedBackend(AttentionBackend):
    """Delegates `write_kv`/`run` to `inner`; `plan` is a no-op (metadata already installed)."""

    def __init__(self, inner: AttentionBackend) -> None:
        super().__init__(inner.cfg, inner.pool, inner.rotary)
        self.inner = inner

    def plan(self, batch: ForwardBatch) -> None:
        pass

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.inner.write_kv(layer, k, v)

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.inner.run(layer, q)


@dataclass
class GraphSlot:
    """Static buffers of one bucket: `bs` sequences, keys (triton) or pages (flashinfer) per layer."""

    bs: int
    input_ids: torch.Tensor  # [bs] int64
    logit_rows: torch.Tensor  # [bs] int64
    state: Any  # backend-specific static metadata
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [bs, vocab] float32


def _triton_static(be: TritonBackend, bs: int, cap: int) -> tuple[SegPagedPlan, int]:
    cfg, dev = be.cfg, be.pool.device
    nl, hkv = cfg.num_layers, cfg.num_kv_heads
    r = bs * hkv

    def i32(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.int32, device=dev)

    plan = SegPagedPlan(
        q_pos=i32(bs),
        row_q_start=torch.arange(bs, dtype=torch.int32, device=dev).repeat_interleave(hkv),
        row_q_len=torch.ones(r, dtype=torch.int32, device=dev),
        row_head=torch.arange(hkv, dtype=torch.int32, device=dev).repeat(bs),
        kv_indptr=i32(nl, r + 1),
        kv_slots=i32(nl, cap),
        kv_pos=i32(nl, cap),
        new_slots=torch.full((nl, hkv, bs), -1, dtype=torch.int32, device=dev),
        max_q_len=1,
        max_kv_len=cap // max(1, bs),
    )
    splits = choose_num_splits(r, 1, cap // max(1, r), dev, be.block_n, cap)
    return plan, splits


def _triton_fill(static: SegPagedPlan, fresh: SegPagedPlan, table_len: int) -> bool:
    """Copy a real decode plan into the bucket's buffers; rows past the batch see no key."""
    r, nnz = fresh.num_rows, fresh.kv_slots.shape[1]
    if nnz > static.kv_slots.shape[1] or r > static.num_rows or fresh.max_pos >= table_len:
        return False
    b = fresh.q_pos.shape[0]
    static.q_pos[:b].copy_(fresh.q_pos)
    static.kv_indptr[:, : r + 1].copy_(fresh.kv_indptr)
    static.kv_indptr[:, r + 1 :].copy_(fresh.kv_indptr[:, -1:].expand(-1, static.num_rows - r))
    static.kv_slots[:, :nnz].copy_(fresh.kv_slots)
    static.kv_pos[:, :nnz].copy_(fresh.kv_pos)
    static.new_slots.fill_(-1)
    static.new_slots[:, :, :b].copy_(fresh.new_slots)
    return True


@dataclass
class _FIState:
    wrapper: Any
    indptr: torch.Tensor  # [R + 1]
    indices: torch.Tensor  # [L, cap]
    last_page_len: torch.Tensor  # [R]
    new_slots: torch.Tensor  # [L, Hkv, bs]


class DecodeGraphRunner:
    """Captures `model.forward` for decode batches of each bucket size; `forward(batch)` replays.

    `backend` is a TritonBackend or FlashInferBackend over the model's pool. `max_kv_tokens` bounds the
    keys per layer over the whole batch (sum over sequences and kv heads of visible tokens) of the
    largest bucket; smaller buckets hold proportionally fewer (`bucket_tokens`).
    """

    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        max_kv_tokens: int,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.backend, self.max_kv_tokens = model, backend, max_kv_tokens
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.proxy = PlannedBackend(backend)
        self.slots: dict[int, GraphSlot] = {}
        self.pool = torch.cuda.graph_pool_handle()

    # -- backend-specific static metadata -------------------------------------------------------
    def bucket_tokens(self, bs: int) -> int:
        """Keys per layer bucket `bs` holds: `max_kv_tokens` scaled by bs / largest bucket (static
        buffers grow with the batch, not with the largest batch times every bucket)."""
        return max(1, self.max_kv_tokens * bs // self.batch_sizes[-1])

    def _make_state(self, bs: int) -> Any:
        be = self.backend
        if isinstance(be, FlashInferBackend):
            cfg, dev = be.cfg, be.pool.device
            r = bs * cfg.num_kv_heads
            cap = self.bucket_tokens(bs) // be.pool.page_size + 2 * r
            indptr = torch.arange(r + 1, dtype=torch.int32, device=dev)
            indices = torch.zeros(cfg.num_layers, cap, dtype=torch.int32, device=dev)
            lpl = torch.ones(r, dtype=torch.int32, device=dev)
            w = be.fi.BatchDecodeWithPagedKVCacheWrapper(
                be.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=cfg.num_kv_groups >= 4,
                paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices[0],
                paged_kv_last_page_len_buffer=lpl,
            )  # fmt: skip
            ns = torch.full((cfg.num_layers, cfg.num_kv_heads, bs), -1, dtype=torch.int32, device=dev)
            st = _FIState(w, indptr, indices, lpl, ns)
            w.plan(indptr.cpu(), indices[0, :r].cpu(), lpl.cpu(), head_dim=cfg.head_dim, **be.plan_kwargs())
            return st
        assert isinstance(be, TritonBackend)
        return _triton_static(be, bs, self.bucket_tokens(bs))

    def _install(self, state: Any) -> None:
        be = self.backend
        if isinstance(be, FlashInferBackend):
            be.use_triton = False
            be.graph_mode = True
            be.graph_prefill = None  # a prefill graph may have been installed last
            be.decode = state.wrapper
            be.indices = state.indices
            be.new_slots = state.new_slots
        else:
            assert isinstance(be, TritonBackend)
            plan, splits = state
            be.set_plan(plan, num_splits=splits)

    def _fill(self, state: Any, batch: ForwardBatch) -> bool:
        be = self.backend
        b = len(batch.seqs)
        if isinstance(be, FlashInferBackend):
            if not (be.rope_ok and is_contiguous_layout(batch, be.pool.page_size)):
                return False
            pt = build_page_tables(batch, be.pool.page_size)
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
            state.wrapper.plan(indptr, idx[0], lpl, head_dim=be.cfg.head_dim, **be.plan_kwargs())
            state.new_slots.fill_(-1)
            state.new_slots[:, :, :b].copy_(batch.new_slots().to(torch.int32), non_blocking=True)
            return True
        plan, _ = state
        assert isinstance(be, TritonBackend)
        fresh = build_plan(batch, be.cfg.num_layers, be.cfg.num_kv_heads, be.pool.device)
        return _triton_fill(plan, fresh, be.cos.shape[0])

    # -- capture / replay -----------------------------------------------------------------------
    def _static_batch(self, slot: GraphSlot) -> ForwardBatch:
        ids = slot.input_ids
        return ForwardBatch(input_ids=ids, positions=ids, seqs=[], logit_rows=slot.logit_rows)

    def capture(self) -> None:
        dev = self.backend.pool.device
        for bs in reversed(self.batch_sizes):
            slot = GraphSlot(
                bs=bs,
                input_ids=torch.zeros(bs, dtype=torch.int64, device=dev),
                logit_rows=torch.arange(bs, dtype=torch.int64, device=dev),
                state=self._make_state(bs),
            )
            self._install(slot.state)
            batch = self._static_batch(slot)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile / JIT outside the capture
                    self.model.forward(batch, self.proxy)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                slot.logits = self.model.forward(batch, self.proxy)
            slot.graph = g
            self.slots[bs] = slot
        torch.cuda.synchronize()

    def bucket(self, batch: ForwardBatch) -> GraphSlot | None:
        if not batch.seqs or not all(s.is_decode for s in batch.seqs):
            return None
        b = len(batch.seqs)
        for bs in self.batch_sizes:
            if bs >= b and bs in self.slots:
                return self.slots[bs]
        return None

    def prepare(self, batch: ForwardBatch) -> GraphSlot | None:
        """Host planning + copies into the bucket's buffers; None if the batch must run eagerly."""
        slot = self.bucket(batch)
        if slot is None or not self._fill(slot.state, batch):
            return None
        b = len(batch.seqs)
        slot.input_ids.zero_()
        slot.input_ids[:b].copy_(batch.input_ids, non_blocking=True)
        self._install(slot.state)
        return slot

    def replay(self, slot: GraphSlot, num_seqs: int) -> torch.Tensor:
        assert slot.graph is not None and slot.logits is not None
        slot.graph.replay()
        return slot.logits[:num_seqs]

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[B, vocab]` float32 for a decode batch (graph replay, or eager fallback)."""
        slot = self.prepare(batch)
        if slot is None:
            return self.model.forward(batch, self.backend)
        return self.replay(slot, len(batch.seqs))
