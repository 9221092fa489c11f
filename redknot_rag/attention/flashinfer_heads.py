"""Sequences whose kv heads see different tokens (local heads: anchor sink + recent window) on FlashInfer,
per (layer, kv head) row (host planning; device index tensors).

Tail queries (the question after relocation; decode-only batches only where the backend's `local_decode` is
on). A row that sees every token ("global") is one tail-causal request over the pool, in-kernel RoPE, exactly
as `flashinfer_plan` maps a fully visible sequence. A row that sees a subset ("local") lists only its visible tokens:
the backend gathers their K (rotated at their true positions) and V into a small contiguous buffer and runs
FlashInfer's ragged prefill on it, causal, without in-kernel RoPE (q rotated at its true position). Tail
alignment is exact because a local row's visible list ends with the tail queries' own keys (checked here):
query i of r sits at list index kv_len - r + i, and the keys before it in the list are exactly the visible
keys at smaller positions. Fully visible slices of the same batch contribute global rows only.

Queries inside the context (recompute) of such a slice: its global rows take `flashinfer_plan`'s part A (FlashInfer;
the backend restricts it to the layer's global heads) and part B, its local rows take `LocalInside` (every
query of the slice over the row's few visible keys, causal by position, on Triton: an inside query of a local
row sees a position-dependent prefix of the row's visible list, which FlashInfer would need one request per
distinct prefix, or a custom mask, for).

Which rows are local differs per layer, so layers are grouped by the shape of their rows (per row: its slice,
and for local rows its key count; not which head it is): one pair of FlashInfer plans per group, and per layer
only index tensors differ (which heads, which slots). With a fixed number of local heads per layer (a
synthetic profile) that is one group; with a measured profile at most Hkv + 1 groups per slice pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
class LocalLayer:
    """One layer's local rows of the slices with inside queries (Triton, `SegPagedMeta` fields, int32 device):
    `row_q_start`, `row_q_len`, `row_head` `[R]`, `kv_indptr` `[R + 1]`, `kv_slots`, `kv_pos` `[nnz]` (the
    row's visible keys); `out_q` `[2, nq]` int64: (index into `LocalInside.q_rows`, kv head) of each result."""

    row_q_start: torch.Tensor
    row_q_len: torch.Tensor
    row_head: torch.Tensor
    kv_indptr: torch.Tensor
    kv_slots: torch.Tensor
    kv_pos: torch.Tensor
    out_q: torch.Tensor


@dataclass(frozen=True)
class LocalInside:
    """Local rows of slices with local heads AND queries inside the context (recompute): every query of the
    slice over the row's visible keys, causal by position, on Triton (few keys per row; a local row's inside
    query sees a position-dependent prefix of its visible keys, which FlashInfer would need one request per
    distinct prefix for). Their global rows run the fully visible machinery (part A/B, tail).
    `q_rows` `[n]` int64 device: the slices' batch rows; `q_pos` `[n]` int32; `layers[l]`."""

    q_rows: torch.Tensor
    q_pos: torch.Tensor
    max_q_len: int
    max_pos: int
    layers: list[LocalLayer]


@dataclass(frozen=True)
class HeadPlan:
    """Tail queries of the whole batch by row: `groups`, and `group_of[layer]` (index into groups);
    `inside` the local rows of slices with inside queries (None: no such slice); `is_full` per slice with
    local heads (part A of inside queries skips heads that are local in every part-A slice)."""

    groups: list[HeadGroup]
    group_of: list[int]
    inside: LocalInside | None = None
    is_full: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> [L, Hkv] row sees every token


def _indptr(lens: np.ndarray) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.from_numpy(np.cumsum(lens, dtype=np.int64)).to(torch.int32)
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated `arange(start, start + len)` for each pair, int64 `[sum(lens)]`."""
    total = int(lens.sum())
    excl = np.cumsum(lens) - lens  # first output index of each range
    return np.repeat(starts - excl, lens) + np.arange(total, dtype=np.int64)


def _local_keys(s: SeqSlice, is_full: np.ndarray, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Visible keys of the local rows (`~is_full` `[L, Hkv]`) of slice `s`: pool slots `[nnz]`, positions
    `[nnz]` (device, rows (layer, head) in order, tokens ascending), and each layer's start in them `[L + 1]`."""
    vis = s.kv_visible
    assert vis is not None
    local_dev = torch.from_numpy(~is_full).to(vis.device)
    nz = (vis & local_dev[:, :, None]).nonzero()  # [nnz, 3] (layer, head, token), lexicographic
    per_layer = (counts * ~is_full).sum(1)  # [L] local keys per layer
    starts = [0] + np.cumsum(per_layer).tolist()
    return s.kv_slots[nz[:, 0], nz[:, 1], nz[:, 2]], s.kv_pos[nz[:, 2]], starts


def _layer_keys(keys: list, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s keys of several slices' `_local_keys`, concatenated in slice order."""
    slots = [k[0][k[2][layer] : k[2][layer + 1]] for k in keys]
    kpos = [k[1][k[2][layer] : k[2][layer + 1]] for k in keys]
    if len(slots) == 1:
        return slots[0], kpos[0]
    if not slots:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    return torch.cat(slots), torch.cat(kpos)


def plan_heads(
    seqs: list[SeqSlice],
    tails: list[tuple[int, int, int]],
    inside: list[int],
    unit_offsets: list[tuple[int, int]],
    page_size: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    device: torch.device,
) -> HeadPlan | None:
    """Rows for the tail queries `tails` `[(slice index, first batch row, r)]` (each slice's last r queries
    at positions T-r..T-1) and `LocalInside` for the slices `inside` (local heads and queries inside the
    context: their local rows, every query, go to Triton; their global rows' tail queries are in `tails`).
    `unit_offsets[si]` = (offset of the slice in the batch unit table, units per head); `positions` the
    batch's host positions. None when a local row served here does not see its tail (tail alignment would
    be wrong; the caller falls back to Triton)."""
    hkv, ps = num_kv_heads, page_size
    num_layers = seqs[0].kv_slots.shape[0]
    in_set = set(inside)
    stats: dict[int, tuple[np.ndarray, np.ndarray, tuple]] = {}  # slice -> (is_full, counts, local keys)
    for si in dict.fromkeys([si for si, _, _ in tails] + inside):
        s = seqs[si]
        t = s.num_kv
        if s.kv_visible is None:
            continue
        vis = s.kv_visible  # [L, Hkv, T] device
        r = next((r for sj, _, r in tails if sj == si), 0)
        st = torch.stack([vis.all(-1).long(), vis[:, :, t - r :].all(-1).long(), vis.sum(-1)]).cpu().numpy()
        is_full, tail_ok = st[0].astype(bool), st[1].astype(bool)
        if si not in in_set and not (is_full | tail_ok).all():
            return None
        stats[si] = (is_full, st[2], _local_keys(s, is_full, st[2]))

    n_tail = len(tails)
    full = np.ones((n_tail, num_layers, hkv), dtype=bool)  # row sees every token
    count = np.zeros((n_tail, num_layers, hkv), dtype=np.int64)  # visible keys per row
    skip = np.zeros(n_tail, dtype=bool)  # local rows served by `LocalInside`, not here
    keys = []  # `_local_keys` of the tail slices whose local rows run here
    for i, (si, _, _) in enumerate(tails):
        count[i] = seqs[si].num_kv
        if si in stats:
            full[i], count[i] = stats[si][0], stats[si][1]
            skip[i] = si in in_set
            if not skip[i]:
                keys.append(stats[si][2])
    q0 = np.array([q for _, q, _ in tails], dtype=np.int64)
    rr = np.array([r for _, _, r in tails], dtype=np.int64)
    base = np.array([unit_offsets[si][0] for si, _, _ in tails], dtype=np.int64)
    nu = np.array([unit_offsets[si][1] for si, _, _ in tails], dtype=np.int64)
    tlen = np.array([seqs[si].num_kv for si, _, _ in tails], dtype=np.int64)
    pos_np = positions.numpy()

    def q_rows(sl: np.ndarray, hd: np.ndarray) -> np.ndarray:  # [2, nq]: (batch row, head) per query
        return np.stack([_ranges(q0[sl], rr[sl]), np.repeat(hd, rr[sl])])

    def dev(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)

    groups: list[HeadGroup] = []
    by_shape: dict[tuple, int] = {}
    by_mask: dict[bytes, tuple[torch.Tensor, ...]] = {}  # indices shared by the layers of one local mask
    group_of: list[int] = []
    for layer in range(num_layers):
        fl = full[:, layer, :]  # [S, Hkv]
        ml = ~fl & ~skip[:, None]  # local rows served here
        g_sl, g_hd = np.nonzero(fl)  # global rows, order (slice, head)
        l_sl, l_hd = np.nonzero(ml)
        l_cnt = count[:, layer, :][ml]
        key = fl.tobytes()
        if key not in by_mask:
            gq, lq = q_rows(g_sl, g_hd), q_rows(l_sl, l_hd)
            gg = _ranges(base[g_sl] + g_hd * nu[g_sl], nu[g_sl])
            by_mask[key] = (dev(gq), dev(gg), dev(lq), dev(pos_np[lq[0]]))
        glob_q, glob_gather, loc_q, loc_q_pos = by_mask[key]
        loc_slots, loc_pos = _layer_keys(keys, layer, device)
        rows = LayerRows(glob_q, glob_gather, loc_q, loc_slots, loc_pos, loc_q_pos)
        shape = (fl.sum(1).tobytes(), ml.sum(1).tobytes(), l_cnt.tobytes())
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
    local_inside = _plan_local_inside(seqs, inside, stats, positions, device) if inside else None
    return HeadPlan(groups, group_of, local_inside, {si: st[0] for si, st in stats.items()})


def _plan_local_inside(
    seqs: list[SeqSlice], inside: list[int], stats: dict, positions: torch.Tensor, device: torch.device
) -> LocalInside:
    """`LocalInside` for slices `inside` (each with `kv_visible`; `stats` from `plan_heads`)."""
    qstart = np.array([seqs[si].q_start for si in inside], dtype=np.int64)
    qlen = np.array([seqs[si].q_len for si in inside], dtype=np.int64)
    qoff = np.cumsum(qlen) - qlen  # each slice's first row in `q_rows`
    full = np.stack([stats[si][0] for si in inside])  # [S, L, Hkv]
    count = np.stack([stats[si][1] for si in inside])
    keys = [stats[si][2] for si in inside]
    q_rows = torch.from_numpy(_ranges(qstart, qlen))
    num_layers = full.shape[1]

    def i32(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch.int32, non_blocking=True)

    layers = []
    by_rows: dict[tuple[bytes, bytes], tuple[torch.Tensor, ...]] = {}  # row metadata shared by equal layers
    for layer in range(num_layers):
        loc = ~full[:, layer, :]  # [S, Hkv]
        cnt = count[:, layer, :][loc]
        key = (loc.tobytes(), cnt.tobytes())
        if key not in by_rows:
            sl, hd = np.nonzero(loc)  # local rows, order (slice, head)
            out_q = np.stack([_ranges(qoff[sl], qlen[sl]), np.repeat(hd, qlen[sl])])
            by_rows[key] = (
                i32(qoff[sl]), i32(qlen[sl]), i32(hd), i32(np.concatenate([[0], np.cumsum(cnt)])),
                torch.from_numpy(out_q).to(device, non_blocking=True),
            )  # fmt: skip
        row_q_start, row_q_len, row_head, kv_indptr, out_q_t = by_rows[key]
        slots, kpos = _layer_keys(keys, layer, device)
        layers.append(
            LocalLayer(
                row_q_start=row_q_start, row_q_len=row_q_len, row_head=row_head, kv_indptr=kv_indptr,
                kv_slots=slots.to(torch.int32), kv_pos=kpos.to(torch.int32), out_q=out_q_t,
            )
        )  # fmt: skip
    return LocalInside(
        q_rows=q_rows.to(device, non_blocking=True),
        q_pos=positions[q_rows].to(device=device, dtype=torch.int32, non_blocking=True),
        max_q_len=int(qlen.max()),
        max_pos=max(seqs[si].num_kv for si in inside),
        layers=layers,
    )


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
