"""Per-batch SegPagedAttention metadata for every layer, built once in `plan` (host work, one copy up).

Rows are (sequence, kv_head) in batch order: row = seq_index * Hkv + kv_head. Each layer has its own
key list because pages are per layer and visibility is per (layer, kv_head); `layer(l)` returns views,
so `run` does no host work per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from redknot_rag.batch import ForwardBatch

from .paged_attention import SegPagedMeta


@dataclass
class SegPagedPlan:
    """All-layer metadata, device tensors, int32.

    `q_pos [N]`; `row_q_start`, `row_q_len`, `row_head` `[R]`; `kv_indptr [L, R + 1]`;
    `kv_slots`, `kv_pos` `[L, nnz_cap]` (layer l's keys in `[:kv_indptr[l, -1]]`);
    `new_slots [L, Hkv, N]` pool slots of this step's new tokens (-1 = skip).
    """

    q_pos: torch.Tensor
    row_q_start: torch.Tensor
    row_q_len: torch.Tensor
    row_head: torch.Tensor
    kv_indptr: torch.Tensor
    kv_slots: torch.Tensor
    kv_pos: torch.Tensor
    new_slots: torch.Tensor
    max_q_len: int
    max_kv_len: int
    total_kv: int = 0  # keys over all rows, the largest layer
    max_pos: int = 0  # largest position listed (q or key)

    @property
    def num_rows(self) -> int:
        return int(self.row_head.shape[0])

    def layer(self, layer: int) -> SegPagedMeta:
        return SegPagedMeta(
            q_pos=self.q_pos,
            row_q_start=self.row_q_start,
            row_q_len=self.row_q_len,
            row_head=self.row_head,
            kv_indptr=self.kv_indptr[layer],
            kv_slots=self.kv_slots[layer],
            kv_pos=self.kv_pos[layer],
            max_q_len=self.max_q_len,
        )


def build_plan(batch: ForwardBatch, num_layers: int, num_kv_heads: int, device: torch.device) -> SegPagedPlan:
    """Gather every sequence's (slots, positions, visibility) into per-layer CSR key lists."""
    nl, hkv = num_layers, num_kv_heads
    slots, pos, vis = [], [], []
    for s in batch.seqs:
        t = s.kv.num_tokens
        slots.append(s.kv.slots[:, :, :t].reshape(nl, hkv * t))  # [L, Hkv*T]
        pos.append(s.kv.positions[:t].view(1, 1, t).expand(nl, hkv, t).reshape(nl, hkv * t))
        if s.kv.visible is None:
            vis.append(torch.ones(nl, hkv * t, dtype=torch.bool))
        else:
            vis.append(s.kv.visible[:, :, :t].reshape(nl, hkv * t))
    x_slots = torch.cat(slots, dim=1)  # [L, M], M = sum over seqs of Hkv*T, order (seq, head, token)
    x_pos = torch.cat(pos, dim=1)
    x_vis = torch.cat(vis, dim=1)
    counts = torch.cat(
        [v.view(nl, hkv, -1).sum(-1) for v in vis], dim=1
    )  # [L, R] visible keys per (layer, row)
    indptr = torch.zeros(nl, counts.shape[1] + 1, dtype=torch.int64)
    indptr[:, 1:] = counts.cumsum(1)
    nnz_cap = max(1, int(indptr[:, -1].max()))
    if bool(x_vis.all()):
        kv_slots, kv_pos = x_slots, x_pos
    else:
        # compact each layer's visible keys to the front, order kept: dest = l * nnz_cap + rank
        rank = x_vis.long().cumsum(1) - 1  # [L, M]
        dest = (rank + torch.arange(nl)[:, None] * nnz_cap)[x_vis]
        kv_slots = torch.zeros(nl * nnz_cap, dtype=torch.int64)
        kv_pos = torch.zeros(nl * nnz_cap, dtype=torch.int64)
        kv_slots[dest] = x_slots[x_vis]
        kv_pos[dest] = x_pos[x_vis]
        kv_slots, kv_pos = kv_slots.view(nl, nnz_cap), kv_pos.view(nl, nnz_cap)
    q_start = torch.tensor([s.q_start for s in batch.seqs], dtype=torch.int32)
    q_len = torch.tensor([s.q_len for s in batch.seqs], dtype=torch.int32)
    nseq = len(batch.seqs)

    def up(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32).to(device, non_blocking=True).contiguous()

    return SegPagedPlan(
        q_pos=up(batch.positions),
        row_q_start=up(q_start.repeat_interleave(hkv)),
        row_q_len=up(q_len.repeat_interleave(hkv)),
        row_head=up(torch.arange(hkv, dtype=torch.int32).repeat(nseq)),
        kv_indptr=up(indptr),
        kv_slots=up(kv_slots),
        kv_pos=up(kv_pos),
        new_slots=up(batch.new_slots()),
        max_q_len=int(q_len.max()) if nseq else 0,
        max_kv_len=int(counts.max()) if counts.numel() else 0,
        total_kv=nnz_cap,
        max_pos=max(int(x_pos.max()) if x_pos.numel() else 0, int(batch.positions.max()) if nseq else 0),
    )
