"""Tail queries of sequences whose kv heads see different tokens (local heads: anchor sink + recent window),
mapped onto FlashInfer per (layer, kv head) row (host planning; device index tensors).

A slice with `kv_visible` whose queries all sit at its tail (the question after relocation, decode) is served
row by row. A row that sees every token ("global") is one tail-causal request over the pool, in-kernel RoPE,
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


@dataclass(frozen=True)
class HeadGroup:
    """Layers whose rows have one shape: host int32 plan arrays, `None` where the group has no such rows.

    Global rows (paged, tail-causal, in-kernel RoPE): `glob_qo_indptr`, `glob_kv_indptr` `[Rg + 1]`,
    `glob_last_page_len` `[Rg]` (units of the batch's unit size). Local rows (ragged, causal, no RoPE):
    `loc_qo_indptr`, `loc_kv_indptr` `[Rl + 1]`. `rows[layer]` holds each member layer's indices."""

    layers: tuple[int, ...]
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


def _indptr(lens: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        out[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


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
    full: list[torch.Tensor] = []  # per tail slice: [L, Hkv] bool host, row sees every token
    count: list[torch.Tensor] = []  # per tail slice: [L, Hkv] int64 host, visible keys per row
    keys: list[tuple[torch.Tensor, torch.Tensor, list[int]] | None] = []  # local keys: slots, pos, layer starts
    for si, _, r in tails:
        s = seqs[si]
        t = s.num_kv
        if s.kv_visible is None:
            full.append(torch.ones(num_layers, hkv, dtype=torch.bool))
            count.append(torch.full((num_layers, hkv), t, dtype=torch.int64))
            keys.append(None)
            continue
        vis = s.kv_visible  # [L, Hkv, T] device
        stats = torch.stack([vis.all(-1).long(), vis[:, :, t - r :].all(-1).long(), vis.sum(-1)]).cpu()  # one sync
        is_full, tail_ok, cnt = stats[0].bool(), stats[1].bool(), stats[2]
        if not bool((is_full | tail_ok).all()):
            return None
        full.append(is_full)
        count.append(cnt)
        local_dev = (~is_full).to(vis.device)
        nz = (vis & local_dev[:, :, None]).nonzero()  # [nnz, 3] (layer, head, token), lexicographic
        slots = s.kv_slots[nz[:, 0], nz[:, 1], nz[:, 2]]  # [nnz] pool slots, rows (layer, head) in order
        kpos = s.kv_pos[nz[:, 2]]
        per_layer = (cnt * (~is_full)).sum(1)  # [L] local keys per layer
        starts = [0] + per_layer.cumsum(0).tolist()
        keys.append((slots, kpos, starts))

    groups: list[HeadGroup] = []
    by_shape: dict[tuple, int] = {}
    by_mask: dict[tuple, tuple[torch.Tensor, ...]] = {}  # host-built indices shared by layers of one mask
    group_of: list[int] = []
    members: list[list[int]] = []
    rows_of: list[dict[int, LayerRows]] = []
    for layer in range(num_layers):
        glob = [(i, h) for i in range(len(tails)) for h in range(hkv) if bool(full[i][layer, h])]
        loc = [(i, h) for i in range(len(tails)) for h in range(hkv) if not bool(full[i][layer, h])]
        shape = (tuple(i for i, _ in glob), tuple((i, int(count[i][layer, h])) for i, h in loc))
        mask = (tuple(glob), tuple(loc))
        if mask not in by_mask:
            gq, gg, lq, lqp = [], [], [], []
            for i, h in glob:
                si, q0, r = tails[i]
                base, nu = unit_offsets[si]
                gq.append(torch.stack([torch.arange(q0, q0 + r), torch.full((r,), h)]))
                gg.append(base + h * nu + torch.arange(nu))
            for i, h in loc:
                si, q0, r = tails[i]
                lq.append(torch.stack([torch.arange(q0, q0 + r), torch.full((r,), h)]))
                lqp.append(positions[q0 : q0 + r])
            gq_t = torch.cat(gq, 1) if gq else torch.zeros(2, 0, dtype=torch.int64)
            lq_t = torch.cat(lq, 1) if lq else torch.zeros(2, 0, dtype=torch.int64)
            by_mask[mask] = tuple(x.to(device, non_blocking=True) for x in (gq_t, _cat(gg), lq_t, _cat(lqp)))
        glob_q, glob_gather, loc_q, loc_q_pos = by_mask[mask]
        slot_parts, pos_parts = [], []
        for i, k in enumerate(keys):
            if k is not None:
                a, b = k[2][layer], k[2][layer + 1]
                slot_parts.append(k[0][a:b])
                pos_parts.append(k[1][a:b])
        dev_empty = torch.zeros(0, dtype=torch.int64, device=device)
        loc_slots = torch.cat(slot_parts) if slot_parts else dev_empty
        loc_pos = torch.cat(pos_parts) if pos_parts else dev_empty
        rows = LayerRows(glob_q, glob_gather, loc_q, loc_slots, loc_pos, loc_q_pos)
        if shape not in by_shape:
            by_shape[shape] = len(members)
            members.append([])
            rows_of.append({})
            g_qo, g_kv, g_lpl, l_qo, l_kv = [], [], [], [], []
            for i, _ in glob:
                si, _, r = tails[i]
                t, nu = seqs[si].num_kv, unit_offsets[si][1]
                g_qo.append(r)
                g_kv.append(nu)
                g_lpl.append(t - (nu - 1) * ps if ps > 1 else 1)
            for i, h in loc:
                l_qo.append(tails[i][2])
                l_kv.append(int(count[i][layer, h]))
            groups.append(
                HeadGroup(
                    layers=(),
                    glob_qo_indptr=_indptr(g_qo) if glob else None,
                    glob_kv_indptr=_indptr(g_kv) if glob else None,
                    glob_last_page_len=torch.tensor(g_lpl, dtype=torch.int32) if glob else None,
                    loc_qo_indptr=_indptr(l_qo) if loc else None,
                    loc_kv_indptr=_indptr(l_kv) if loc else None,
                    rows={},
                )
            )
        gi = by_shape[shape]
        group_of.append(gi)
        members[gi].append(layer)
        rows_of[gi][layer] = rows
    groups = [
        HeadGroup(tuple(m), g.glob_qo_indptr, g.glob_kv_indptr, g.glob_last_page_len, g.loc_qo_indptr,
                  g.loc_kv_indptr, rows)
        for g, m, rows in zip(groups, members, rows_of)
    ]  # fmt: skip
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
