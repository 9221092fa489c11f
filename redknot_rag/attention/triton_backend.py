"""The "triton" attention backend: SegPagedAttention over head-granular pages, any layout.

Handles everything the torch reference handles (ragged lengths, shared segments with partial pages,
position gaps, per-(layer, head) visibility, any RoPE variant via `inv_freq`, sliding-window layers
with their own RoPE table), on GPU or — under `TRITON_INTERPRET=1` — on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from redknot_rag.batch import ForwardBatch
from redknot_rag.config import ModelConfig
from redknot_rag.kernels.kv_write import write_kv_pages
from redknot_rag.kernels.paged_attention import rope_tables, seg_paged_attention
from redknot_rag.kvcache import KVPool
from redknot_rag.rope import Rotary

from .backend import AttentionBackend, register_backend
from .triton_plan import SegPagedPlan, build_plan


def choose_num_splits(
    num_rows: int, q_tiles: int, max_kv_len: int, device: torch.device, block_n: int, total_kv: int = 0
) -> int:
    """Split-KV factor: the longest row splits into chunks near an even share of all keys over
    ~4 programs per SM (rows of very unequal length — global vs local heads — stay balanced), at least
    4 key blocks a chunk."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    total = max(total_kv, num_rows * max_kv_len) * q_tiles
    chunk = max(4 * block_n, total // (4 * sms))
    return int(max(1, min(triton.cdiv(max_kv_len, chunk), 64)))


@register_backend("triton")
class TritonBackend(AttentionBackend):
    """`plan` builds `SegPagedPlan` (all layers) once; `run(layer)` launches one kernel on its views."""

    block_n = 64

    def __init__(self, cfg: ModelConfig, pool: KVPool, rotary: Rotary) -> None:
        super().__init__(cfg, pool, rotary)
        self.inv_freq = rotary.inv_freq.to(pool.device, torch.float32).contiguous()
        self.cos, self.sin = rope_tables(self.inv_freq, max(cfg.max_position, 4096), pool.dtype)
        # sliding-window layers with their own RoPE base (Gemma 3) read a second table
        self.local_inv_freq: torch.Tensor | None = None
        if rotary.is_per_layer:
            local = next(rotary.for_layer(i) for i in range(cfg.num_layers) if cfg.is_sliding(i))
            self.local_inv_freq = local.inv_freq.to(pool.device, torch.float32).contiguous()
            self.local_cos, self.local_sin = rope_tables(self.local_inv_freq, self.cos.shape[0], pool.dtype)
        self.meta: SegPagedPlan | None = None
        self.num_splits = 1
        self.force_num_splits: int | None = None  # tests exercise the split/merge path on CPU
        self.block_m: int | None = None  # (token, q head) pairs per tile; None: by the batch's longest row

    def plan(self, batch: ForwardBatch) -> None:
        self.set_plan(build_plan(batch, self.cfg.num_layers, self.cfg.num_kv_heads, self.pool.device))

    def set_plan(self, meta: SegPagedPlan, num_splits: int | None = None) -> None:
        """Install prepared metadata (the CUDA-graph runner passes static buffers here)."""
        self.meta = meta
        if meta.max_pos >= self.cos.shape[0]:  # never after a CUDA-graph capture: that checks first
            self.cos, self.sin = rope_tables(self.inv_freq, 2 * meta.max_pos + 1, self.pool.dtype)
            if self.local_inv_freq is not None:
                self.local_cos, self.local_sin = rope_tables(self.local_inv_freq, self.cos.shape[0], self.pool.dtype)
        if num_splits is None:
            num_splits = self.force_num_splits
        if num_splits is None:
            q_tiles = triton.cdiv(max(1, meta.max_q_len) * self.cfg.num_kv_groups, 16)
            num_splits = choose_num_splits(
                meta.num_rows, q_tiles, meta.max_kv_len, self.pool.device, self.block_n, meta.total_kv
            )
        self.num_splits = num_splits

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        assert self.meta is not None, "plan() first"
        write_kv_pages(self.pool.k_slots, self.pool.v_slots, self.meta.new_slots[layer], k, v)

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        assert self.meta is not None, "plan() first"
        is_sliding = self.cfg.is_sliding(layer)
        is_local_rope = is_sliding and self.local_inv_freq is not None
        out, _ = seg_paged_attention(
            q,
            self.pool.k_slots,
            self.pool.v_slots,
            self.meta.layer(layer),
            self.local_cos if is_local_rope else self.cos,
            self.local_sin if is_local_rope else self.sin,
            self.cfg.num_kv_groups,
            sm_scale=self.cfg.attn_scale,
            num_splits=self.num_splits,
            block_n=self.block_n,
            window=self.cfg.sliding_window if is_sliding else None,
            block_m=self.block_m,
        )
        return out

    # -- CUDA-graph hooks: state = (static SegPagedPlan, num_splits) --------------------------------
    def init_capture_graph(self, bs: int, max_kv_tokens: int) -> tuple[SegPagedPlan, int]:
        """Static plan of `bs` decode rows x Hkv over `max_kv_tokens` key slots per layer; rows past a real
        batch see no key and write K/V nowhere (slot -1)."""
        cfg, dev, cap = self.cfg, self.pool.device, max_kv_tokens
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
        return plan, choose_num_splits(r, 1, cap // max(1, r), dev, self.block_n, cap)

    def prepare_for_capture(self, state: Any) -> None:
        plan, splits = state
        self.set_plan(plan, num_splits=splits)

    def prepare_for_replay(self, state: Any, batch: ForwardBatch) -> bool:
        static: SegPagedPlan = state[0]
        fresh = build_plan(batch, self.cfg.num_layers, self.cfg.num_kv_heads, self.pool.device)
        r, nnz = fresh.num_rows, fresh.kv_slots.shape[1]
        if nnz > static.kv_slots.shape[1] or r > static.num_rows or fresh.max_pos >= self.cos.shape[0]:
            return False
        b = fresh.q_pos.shape[0]
        static.q_pos[:b].copy_(fresh.q_pos)
        static.kv_indptr[:, : r + 1].copy_(fresh.kv_indptr)
        static.kv_indptr[:, r + 1 :].copy_(fresh.kv_indptr[:, -1:].expand(-1, static.num_rows - r))
        static.kv_slots[:, :nnz].copy_(fresh.kv_slots)
        static.kv_pos[:, :nnz].copy_(fresh.kv_pos)
        static.new_slots.fill_(-1)
        static.new_slots[:, :, :b].copy_(fresh.new_slots)
        self.prepare_for_capture(state)
        return True
