"""Tail queries of sequences whose kv heads see different tokens (local heads: anchor sink + recent window),
mapped onto FlashInfer per (layer, kv head) row (host planning; device index tensors).

A slice with `kv_visible` whose queries all sit at its tail (the question after relocation; decode-only
batches only where the backend's `local_decode` is on) is served row by row. A row that sees every token ("global") is one tail-causal request over the pool, in-kernel RoPE,
exactly as `fi_plan` maps a fully visible sequence. A row that sees a subset ("local") lists only its visible
tokens: the backend gathers their K (rotated at their true positions) and V into a small contiguous buffer and
runs FlashInfer's ragged prefill on it, causal, without in-kernel RoPE (q rotated at its true position). Tail
alignment is exact because a local row's visible list ends with the tail queries' own keys (checked here):
query i of r sits at list index kv_len - r + i, and the keys before it in the list are exactly the visible
keys at smaller positions. Fully visible slices of the same batch contribute global rows only.

Which rows are local differs per layer, so layers are grouped by the shape of their rows (per row: its slice,
and for local rows its key count; not which head it is): one pair of FlashInfer plans per group, and per layer
only index tensors differ (which heads, which slots). With a fixed number of local heads per layer (a
synthetic profile) that is one group; with a measured profile at most Hkv + 1 groups per slice pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from redknot_rag.batch import SeqSlice

LN2 = math.log(2.0)


@dataclass(frozen=True)
class LayerRows:
    """One layer's indices into its group's plans (device int64). Rows in order (slice, kv head).

    `glob_q` `[2, nq_g]`, `loc_q` `[2, nq_l]`: (batch row, kv head) of each request query, request order (q
    read as `q.view(N, Hkv, g, D)[row, head]`); `glob_gather` `[nnz_g]`: offsets into the batch unit table
    `FIPlan.units[layer]`; `loc_slots`, `loc_pos` `[nnz_l]`: pool slots and positions of the local rows'
    visible keys; `loc_q_pos` `[nq_l]`: the local rows' query positions."""

    glob_q: torch.Tensor
    glob_gather: torch.Tensor
    loc_q: torch.Tensor
    loc_slots: torch.Tensor
    loc_pos: torch.Tensor
    loc_q_pos: torch.Tensor


@dataclass
class HeadGroup:
    """Layers whose rows have one shape: host int32 plan arrays, `None` where the group has no such rows.

    Global rows (paged, tail-causal, in-kernel RoPE): `glob_qo_indptr`, `glob_kv_indptr` `[Rg + 1]`,
    `glob_last_page_len` `[Rg]` (units of the batch's unit size). Local rows (ragged, causal, no RoPE):
    `loc_qo_indptr`, `loc_kv_indptr` `[Rl + 1]`. `rows[layer]` holds each member layer's indices."""

    layers: list[int]
    glob_qo_indptr: torch.Tensor | None
    glob_kv_indptr: torch.Tensor | None
    glob_last_page_len: torch.Tensor | None
    loc_qo_indptr: torch.Tensor | None
    loc_kv_indptr: torch.Tensor | None
    rows: dict[int, LayerRows]


@dataclass(frozen=True)
class HeadPlan:
    """Tail queries of the whole batch by row: `groups`, and `group_of[layer]` (index into groups)."""

    groups: list[HeadGroup]
    group_of: list[int]


def _indptr(lens: np.ndarray) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.from_numpy(np.cumsum(lens, dtype=np.int64)).to(torch.int32)
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated `arange(start, start + len)` for each pair, int64 `[sum(lens)]`."""
    total = int(lens.sum())
    excl = np.cumsum(lens) - lens  # first output index of each range
    return np.repeat(starts - excl, lens) + np.arange(total, dtype=np.int64)


def plan_heads(
    seqs: list[SeqSlice],
    tails: list[tuple[int, int, int]],
    unit_offsets: list[tuple[int, int]],
    page_size: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    device: torch.device,
) -> HeadPlan | None:
    """Rows for the tail queries `tails` `[(slice index, first batch row, r)]` (each slice's last r queries
    at positions T-r..T-1). `unit_offsets[si]` = (offset of the slice in the batch unit table, units per
    head); `positions` the batch's host positions. None when a local row's visible keys do not end with
    its tail (tail alignment would be wrong; the caller falls back to Triton)."""
    hkv, ps = num_kv_heads, page_size
    num_layers = seqs[tails[0][0]].kv_slots.shape[0]
    n_tail = len(tails)
    full = np.ones((n_tail, num_layers, hkv), dtype=bool)  # row sees every token
    count = np.zeros((n_tail, num_layers, hkv), dtype=np.int64)  # visible keys per row
    keys: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []  # per local slice: slots, pos, layer starts
    for i, (si, _, r) in enumerate(tails):
        s = seqs[si]
        t = s.num_kv
        count[i] = t
        if s.kv_visible is None:
            continue
        vis = s.kv_visible  # [L, Hkv, T] device
        stats = torch.stack([vis.all(-1).long(), vis[:, :, t - r :].all(-1).long(), vis.sum(-1)]).cpu().numpy()
        is_full, tail_ok = stats[0].astype(bool), stats[1].astype(bool)
        if not (is_full | tail_ok).all():
            return None
        full[i], count[i] = is_full, stats[2]
        local_dev = torch.from_numpy(~is_full).to(vis.device)
        nz = (vis & local_dev[:, :, None]).nonzero()  # [nnz, 3] (layer, head, token), lexicographic
        per_layer = (stats[2] * ~is_full).sum(1)  # [L] local keys per layer
        starts = [0] + np.cumsum(per_layer).tolist()
        keys.append((s.kv_slots[nz[:, 0], nz[:, 1], nz[:, 2]], s.kv_pos[nz[:, 2]], starts))

    q0 = np.array([q for _, q, _ in tails], dtype=np.int64)
    rr = np.array([r for _, _, r in tails], dtype=np.int64)
    base = np.array([unit_offsets[si][0] for si, _, _ in tails], dtype=np.int64)
    nu = np.array([unit_offsets[si][1] for si, _, _ in tails], dtype=np.int64)
    tlen = np.array([seqs[si].num_kv for si, _, _ in tails], dtype=np.int64)
    pos_np = positions.numpy()

    def q_rows(sl: np.ndarray, hd: np.ndarray) -> np.ndarray:  # [2, nq]: (batch row, head) per query
        return np.stack([_ranges(q0[sl], rr[sl]), np.repeat(hd, rr[sl])])

    groups: list[HeadGroup] = []
    by_shape: dict[tuple, int] = {}
    by_mask: dict[bytes, tuple[torch.Tensor, ...]] = {}  # indices shared by the layers of one local mask
    group_of: list[int] = []
    for layer in range(num_layers):
        fl = full[:, layer, :]  # [S, Hkv]
        g_sl, g_hd = np.nonzero(fl)  # global rows, order (slice, head)
        l_sl, l_hd = np.nonzero(~fl)
        l_cnt = count[:, layer, :][~fl]
        key = fl.tobytes()
        if key not in by_mask:
            gq, lq = q_rows(g_sl, g_hd), q_rows(l_sl, l_hd)
            gg = _ranges(base[g_sl] + g_hd * nu[g_sl], nu[g_sl])
            parts = (gq, gg, lq, pos_np[lq[0]])
            by_mask[key] = tuple(torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True) for x in parts)
        glob_q, glob_gather, loc_q, loc_q_pos = by_mask[key]
        slots = [k[0][k[2][layer] : k[2][layer + 1]] for k in keys]
        kpos = [k[1][k[2][layer] : k[2][layer + 1]] for k in keys]
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        rows = LayerRows(
            glob_q, glob_gather, loc_q,
            slots[0] if len(slots) == 1 else (torch.cat(slots) if slots else empty),
            kpos[0] if len(kpos) == 1 else (torch.cat(kpos) if kpos else empty),
            loc_q_pos,
        )  # fmt: skip
        shape = (fl.sum(1).tobytes(), (~fl).sum(1).tobytes(), l_cnt.tobytes())
        if shape not in by_shape:
            by_shape[shape] = len(groups)
            has_g, has_l = g_sl.size > 0, l_sl.size > 0
            lpl = tlen[g_sl] - (nu[g_sl] - 1) * ps if ps > 1 else np.ones_like(g_sl)
            groups.append(
                HeadGroup(
                    layers=[],
                    glob_qo_indptr=_indptr(rr[g_sl]) if has_g else None,
                    glob_kv_indptr=_indptr(nu[g_sl]) if has_g else None,
                    glob_last_page_len=torch.from_numpy(lpl.astype(np.int32)) if has_g else None,
                    loc_qo_indptr=_indptr(rr[l_sl]) if has_l else None,
                    loc_kv_indptr=_indptr(l_cnt) if has_l else None,
                    rows={},
                )
            )
        gi = by_shape[shape]
        group_of.append(gi)
        groups[gi].layers.append(layer)
        groups[gi].rows[layer] = rows
    return HeadPlan(groups, group_of)


def emulate_ragged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    causal: bool,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `BatchPrefillWithRaggedKVCacheWrapper` (NHD, no RoPE) computes, in fp32: q `[nq, Hq, D]`, k/v
    `[nnz, Hk, D]` (Hq a multiple of Hk), host indptrs; causal = queries aligned to the tail of their keys.
    Returns (o `[nq, Hq, D]` q.dtype, lse `[nq, Hq]` float32 base 2)."""
    nq, hq, d = q.shape
    g = hq // k.shape[1]
    o = torch.zeros(nq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(qo_indptr.shape[0] - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        k0, k1 = int(kv_indptr[r]), int(kv_indptr[r + 1])
        kk = k[k0:k1].float().repeat_interleave(g, dim=1)  # [T, Hq, D]
        vv = v[k0:k1].float().repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,thd->qht", q[q0:q1].float(), kk) * sm_scale
        if causal:
            kv_len, qo_len = k1 - k0, q1 - q0
            qpos = torch.arange(kv_len - qo_len, kv_len, device=q.device)
            keep = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]  # [qo, T]
            s = s.masked_fill(~keep[:, None, :], float("-inf"))
        ls = torch.logsumexp(s, -1)  # [qo, Hq]
        o[q0:q1] = torch.einsum("qht,thd->qhd", torch.exp(s - ls[..., None]).nan_to_num(0.0), vv)
        lse[q0:q1] = ls / LN2
    return o.to(q.dtype), lse
