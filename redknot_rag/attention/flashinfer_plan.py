"""How one batch maps onto FlashInfer requests (host planning; device gathers), and a torch emulation of
the FlashInfer calls used, so the mapping is testable on the CPU.

FlashInfer's in-kernel RoPE (`ROPE_LLAMA`) rotates key j of a request at position j and query i at
`kv_len - qo_len + i`. Head-granular pages become `num_kv_heads=1` rows, one per (request, kv head).
A sequence whose positions equal its kv indices (`KVLayout.pos_is_index`) and whose heads see every
token maps as follows (queries of a slice sorted by position, `T` kv tokens); one whose heads see different
tokens (local heads, `kv_visible`) maps its tail queries per (layer, kv head) row (`flashinfer_heads`), and with
queries inside its context runs on Triton:

- fresh: the slice is all of its sequence (T == q_len): causal attention over the step's own K/V
  (no page reads; the backend runs it on contiguous tensors).
- tail: the longest suffix of queries at positions T-r..T-1 is one causal request over all T keys.
- inside (recompute: queries at positions p < T - r): queries are grouped into blocks of `block`
  positions, `[b, b + block)`. Part A: the block's m queries over keys [0, b), one non-causal request
  (m <= block <= b). The kernel places query j at b - m + j, so q is pre-rotated by
  `p - (b - m + j)` (RoPE composes: R(a) R(p - a) = R(p)). Part B: the same queries over keys
  [b, b + block) with causality by position (Triton, small). The two halves merge by log-sum-exp.

Kv "units" are pool slots (page size 1, over the slot view of the pool, so copy-on-write slots and
partial segment pages are addressable) or whole pages (when every slice is page-aligned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice

from .flashinfer_heads import LN2, HeadPlan, plan_heads


@dataclass
class Requests:
    """A set of FlashInfer requests (rows = (kv head, request), head-major) with `units` per row.

    `qo_indptr`, `kv_indptr` `[R*Hkv + 1]` int32 host; `last_page_len` `[R*Hkv]` int32 host;
    `gather` `[nnz]` int64 device: flat unit offsets into the batch unit table (layer-independent);
    `q_rows` `[nq]` int64 device: token rows of the batch feeding the requests (request order);
    `q_delta` `[nq]` int64 device or None: rotation to apply to q before the kernel (pre-rotation).
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    last_page_len: torch.Tensor
    gather: torch.Tensor
    q_rows: torch.Tensor
    q_delta: torch.Tensor | None
    causal: bool
    rows_identity: bool = False  # q_rows == 0..nq-1 (q feeds the requests as it is)

    @property
    def num_q(self) -> int:
        return int(self.q_rows.shape[0])


@dataclass
class Inside:
    """Part B of inside queries (Triton): rows (block, kv head), keys [b, b + block) of the block.

    `q_rows` `[n_in]` batch rows of all inside queries (block order); `q_pos` `[n_in]` int32 their
    positions; per row: `row_q_start` (into q_rows), `row_q_len`, `row_head` `[Rb]` int32;
    `kv_indptr` `[Rb + 1]` int32; `kv_gather` `[nnz]` int64 into the slot table; `kv_pos` `[nnz]` int32.
    `part_a` `[n_in]` bool: whether the query also has a part-A result (its block starts after 0);
    `a_index` `[n_in]` int64: its index among part-A queries (valid where part_a).
    """

    q_rows: torch.Tensor
    q_pos: torch.Tensor
    row_q_start: torch.Tensor
    row_q_len: torch.Tensor
    row_head: torch.Tensor
    kv_indptr: torch.Tensor
    kv_gather: torch.Tensor
    kv_pos: torch.Tensor
    part_a: torch.Tensor
    a_index: torch.Tensor
    max_q_len: int


@dataclass
class Prefix:
    """Part A of inside queries over rotated contiguous K/V (the alternative to pre-rotated q): per
    layer the backend gathers each listed slice's K (rotated once, at kv positions) and V into buffers
    `[buf_len, Hkv, D]` (slice `i` at rows `offsets[i]`..), and runs one non-causal request per block
    over rows [offset, offset + b) with native GQA heads and no in-kernel RoPE; q is rotated at its
    true position. `slices` `[(slice index, offset, T)]`; `qo_indptr`, `kv_indptr` `[R + 1]` int32 host;
    `indices` `[nnz]` int32 device (buffer rows); `q_rows`, `q_pos` `[nq]` int64 device."""

    slices: list[tuple[int, int, int]]
    buf_len: int
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    indices: torch.Tensor
    q_rows: torch.Tensor
    q_pos: torch.Tensor


@dataclass
class FIPlan:
    """The whole batch: which path each token takes. `units` `[L, M]` int32 (device): every slice's kv
    units concatenated, slice-major then head then unit; `slot_units` `[L, Ms]` int64: the same in slots
    (part B reads slots). `fresh` lists (slice index, q rows) served from the step's own K/V. When a slice
    has per-head visibility (`kv_visible`), every slice's tail queries go to `heads` (`flashinfer_heads`) instead of
    `causal`."""

    page_size: int  # unit size: 1 (slots) or the pool's page size
    units: torch.Tensor
    slot_units: torch.Tensor
    causal: Requests | None
    full: Requests | None
    inside: Inside | None
    prefix: Prefix | None
    fresh: list[tuple[int, slice]]
    is_decode: bool
    heads: HeadPlan | None = None  # tail queries by (layer, kv head) row when some slice has local heads


def tail_len(q_pos: torch.Tensor, t: int) -> int:
    """Length of the longest suffix of `q_pos` (host, ascending) equal to t-r..t-1."""
    n = q_pos.shape[0]
    want = torch.arange(t - n, t)
    eq = (q_pos == want).flip(0)
    if bool(eq.all()):
        return n
    return int(eq.long().argmin())  # first mismatch from the end


def plan_batch(
    batch: ForwardBatch,
    num_kv_heads: int,
    page_size: int,
    block: int,
    device: torch.device,
    fresh_ok: bool,
    max_local_slices: int = 8,
    local_decode: bool = False,
    local_inside: bool = True,
) -> FIPlan | None:
    """Map `batch` (every slice `pos_is_index`) onto FlashInfer requests; None where FlashInfer cannot
    serve it (the caller runs Triton): a slice with per-head visibility whose queries are not all at its
    tail unless `local_inside`, or whose local rows do not see their tail, or more than `max_local_slices`
    slices with per-head visibility (each costs two host syncs and per-layer index slicing in
    `flashinfer_heads.plan_heads`: a large decode batch of such sequences keeps Triton's device-built plan), or,
    unless `local_decode`, a decode-only batch with such a slice (Triton's one launch per layer over the
    few local keys has not been measured against `flashinfer_heads`' ~10 launches per layer yet; the question phase
    is what this path is for)."""
    hkv = num_kv_heads
    positions = batch.positions.cpu()
    seqs = batch.seqs
    has_inside = False
    has_local = False
    kinds = []  # per slice: (fresh, r, q_pos)
    for s in seqs:
        qp = positions[s.q_start : s.q_start + s.q_len]
        t = s.num_kv
        is_local = s.kv_visible is not None
        is_fresh = fresh_ok and s.q_len == t and s.q_len > 1 and not is_local
        r = s.q_len if is_fresh else tail_len(qp, t)
        # Inside queries (recompute) of a slice with local heads: its global rows take part A/B below, its
        # local rows (every query) run on Triton over their few visible keys (`flashinfer_heads.LocalInside`): a local
        # row's inside query sees a position-dependent prefix of its visible keys, one FlashInfer request
        # per distinct prefix. `local_inside=False`: the whole batch on Triton.
        if is_local and r < s.q_len and not local_inside:
            return None
        has_inside |= r < s.q_len
        has_local |= is_local
        kinds.append((is_fresh, r, qp))
    if has_local and sum(s.kv_visible is not None for s in seqs) > max_local_slices:
        return None
    if has_local and not local_decode and all(s.q_len == 1 for s in seqs):
        return None
    ps = page_size if (not has_inside and all(s.layout.page_aligned for s in seqs)) else 1
    # unit tables: slice-major, then head, then unit
    unit_offsets, slot_offsets = [], []
    units, slot_units = [], []
    off = soff = 0
    for s in seqs:
        t = s.num_kv
        u = s.kv_slots[:, :, ::ps] // ps if ps > 1 else s.kv_slots  # [L, Hkv, U]
        nu = u.shape[2]
        units.append(u.reshape(u.shape[0], hkv * nu))
        slot_units.append(s.kv_slots.reshape(s.kv_slots.shape[0], hkv * t))
        unit_offsets.append((off, nu))
        slot_offsets.append((soff, t))
        off += hkv * nu
        soff += hkv * t
    x_units = (units[0] if len(units) == 1 else torch.cat(units, 1)).to(torch.int32)
    x_slots = slot_units[0] if len(slot_units) == 1 else torch.cat(slot_units, 1)

    causal_rq: list[tuple[int, int, int, int, int, int]] = []  # (slice, kv_lo, kv_hi, q_row0, qo_len, b)
    full_rq: list[tuple[int, int, int, int, int, int]] = []
    full_rows: list[torch.Tensor] = []
    full_delta: list[torch.Tensor] = []
    inside_blocks: list[tuple[int, int, int, int]] = []  # (slice, b, first query index in slice, m)
    fresh: list[tuple[int, slice]] = []
    for si, (s, (is_fresh, r, qp)) in enumerate(zip(seqs, kinds)):
        t = s.num_kv
        if is_fresh:
            fresh.append((si, slice(s.q_start, s.q_start + s.q_len)))
            continue
        if r:
            causal_rq.append((si, 0, t, s.q_start + s.q_len - r, r, 0))
        n_in = s.q_len - r
        if n_in:
            blk = qp[:n_in] // block
            ids, counts = torch.unique_consecutive(blk, return_counts=True)
            j = 0
            for bid, m in zip(ids.tolist(), counts.tolist()):
                b = bid * block
                inside_blocks.append((si, b, j, m))
                if b > 0:
                    rows = torch.arange(s.q_start + j, s.q_start + j + m)
                    full_rq.append((si, 0, b, -1, m, b))
                    full_rows.append(rows)
                    full_delta.append(qp[j : j + m] - (b - m + torch.arange(m)))
                j += m

    def requests(rqs: list, rows: torch.Tensor, delta: torch.Tensor | None, causal: bool) -> Requests | None:
        if not rqs:
            return None
        qo, kvn, lpl, starts = [], [], [], []
        for h in range(hkv):
            for si, lo, hi, _, qlen, _ in rqs:
                base, nu = unit_offsets[si]
                u_lo, u_hi = lo // ps, -(-hi // ps)
                qo.append(qlen)
                kvn.append(u_hi - u_lo)
                lpl.append(hi - (u_hi - 1) * ps if ps > 1 else 1)
                starts.append(base + h * nu + u_lo)
        kvn_t = torch.tensor(kvn, dtype=torch.int64)
        qo_indptr = torch.zeros(len(qo) + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.tensor(qo).cumsum(0)
        kv_indptr = torch.zeros(len(kvn) + 1, dtype=torch.int32)
        kv_indptr[1:] = kvn_t.cumsum(0)
        excl = kv_indptr[:-1].long()
        base = (torch.tensor(starts, dtype=torch.int64) - excl).repeat_interleave(kvn_t)
        gather = base + torch.arange(int(kv_indptr[-1]))
        identity = bool(torch.equal(rows, torch.arange(rows.shape[0])))
        return Requests(
            rows_identity=identity,
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            last_page_len=torch.tensor(lpl, dtype=torch.int32),
            gather=gather.to(device, non_blocking=True),
            q_rows=rows.to(device, non_blocking=True),
            q_delta=None if delta is None else delta.to(device, non_blocking=True),
            causal=causal,
        )

    heads = None
    if has_local:
        tails = [(si, q0, n) for si, _, _, q0, n, _ in causal_rq]
        local_in = [i for i, (s, k) in enumerate(zip(seqs, kinds)) if s.kv_visible is not None and k[1] < s.q_len]
        heads = plan_heads(seqs, tails, local_in, unit_offsets, ps, hkv, positions, device)
        if heads is None:
            return None
        causal_rq = []
    causal_rows = torch.cat([torch.arange(q0, q0 + n) for _, _, _, q0, n, _ in causal_rq]) if causal_rq else None
    causal = requests(causal_rq, causal_rows, None, True) if causal_rows is not None else None
    full = requests(full_rq, torch.cat(full_rows), torch.cat(full_delta), False) if full_rq else None
    inside = _plan_inside(seqs, positions, inside_blocks, full_rows, slot_offsets, hkv, block, device)
    is_decode = not fresh and inside is None and heads is None and all(s.q_len == 1 for s in seqs)
    prefix = _plan_prefix(seqs, positions, full_rq, full_rows, device) if full_rq else None
    return FIPlan(ps, x_units, x_slots, causal, full, inside, prefix, fresh, is_decode, heads)


def _plan_prefix(
    seqs: list[SeqSlice],
    positions: torch.Tensor,
    full_rq: list[tuple[int, int, int, int, int, int]],
    full_rows: list[torch.Tensor],
    device: torch.device,
) -> Prefix:
    offsets: dict[int, int] = {}
    slices: list[tuple[int, int, int]] = []
    for si, *_ in full_rq:
        if si not in offsets:
            offsets[si] = sum(t for _, _, t in slices)
            slices.append((si, offsets[si], seqs[si].num_kv))
    qo = [m for *_, m, _ in full_rq]
    kvn = [b for *_, b in full_rq]
    qo_indptr = torch.zeros(len(qo) + 1, dtype=torch.int32)
    qo_indptr[1:] = torch.tensor(qo).cumsum(0)
    kv_indptr = torch.zeros(len(kvn) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.tensor(kvn).cumsum(0)
    indices = torch.cat([offsets[si] + torch.arange(b) for si, *_, b in full_rq])
    rows = torch.cat(full_rows)
    return Prefix(
        slices=slices,
        buf_len=sum(t for _, _, t in slices),
        qo_indptr=qo_indptr,
        kv_indptr=kv_indptr,
        indices=indices.to(device=device, dtype=torch.int32),
        q_rows=rows.to(device),
        q_pos=positions[rows].to(device),
    )


def _plan_inside(
    seqs: list[SeqSlice],
    positions: torch.Tensor,
    blocks: list[tuple[int, int, int, int]],
    full_rows: list[torch.Tensor],
    slot_offsets: list[tuple[int, int]],
    hkv: int,
    block: int,
    device: torch.device,
) -> Inside | None:
    if not blocks:
        return None
    q_rows, q_pos, part_a, a_index = [], [], [], []
    row_q_start, row_q_len, row_head, kvn, starts, kpos = [], [], [], [], [], []
    n_a = 0
    q0 = 0
    per_block = []
    for si, b, j, m in blocks:
        s = seqs[si]
        rows = torch.arange(s.q_start + j, s.q_start + j + m)
        q_rows.append(rows)
        q_pos.append(positions[s.q_start + j : s.q_start + j + m])
        has_a = b > 0
        part_a.append(torch.full((m,), has_a))
        a_index.append(torch.arange(n_a, n_a + m) if has_a else torch.zeros(m, dtype=torch.int64))
        n_a += m if has_a else 0
        hi = min(s.num_kv, b + block)
        per_block.append((si, b, hi, q0, m))
        q0 += m
    for h in range(hkv):
        for si, b, hi, qs, m in per_block:
            base, t = slot_offsets[si]
            row_q_start.append(qs)
            row_q_len.append(m)
            row_head.append(h)
            kvn.append(hi - b)
            starts.append(base + h * t + b)
            kpos.append(torch.arange(b, hi))
    kvn_t = torch.tensor(kvn, dtype=torch.int64)
    kv_indptr = torch.zeros(len(kvn) + 1, dtype=torch.int64)
    kv_indptr[1:] = kvn_t.cumsum(0)
    gather = (torch.tensor(starts, dtype=torch.int64) - kv_indptr[:-1]).repeat_interleave(kvn_t)
    gather = gather + torch.arange(int(kv_indptr[-1]))

    def i32(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=torch.int32, non_blocking=True)

    del full_rows
    return Inside(
        q_rows=torch.cat(q_rows).to(device),
        q_pos=i32(torch.cat(q_pos)),
        row_q_start=i32(torch.tensor(row_q_start)),
        row_q_len=i32(torch.tensor(row_q_len)),
        row_head=i32(torch.tensor(row_head)),
        kv_indptr=i32(kv_indptr),
        kv_gather=gather.to(device),
        kv_pos=i32(torch.cat(kpos)),
        part_a=torch.cat(part_a).to(device),
        a_index=torch.cat(a_index).to(device),
        max_q_len=max(m for *_, m in per_block),
    )


# ------------------------------------------------------------------------------- torch emulation


def emulate_prefill(
    q: torch.Tensor,
    k_units: torch.Tensor,
    v_units: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
    causal: bool,
    inv_freq: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `BatchPrefillWithPagedKVCacheWrapper` (num_kv_heads=1, ROPE_LLAMA, NHD) computes, in fp32.

    q `[nnz_q, g, D]`; `k_units`, `v_units` `[num_units, unit, D]` (unit = page size); host indptrs.
    Returns (o `[nnz_q, g, D]` q.dtype, lse `[nnz_q, g]` float32 in base 2, as FlashInfer returns it).
    """
    nq, g, d = q.shape
    ps = k_units.shape[1]
    o = torch.zeros(nq, g, d, dtype=torch.float32, device=q.device)
    lse = torch.full((nq, g), float("-inf"), dtype=torch.float32, device=q.device)
    half = d // 2

    def rot(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ang = pos.float()[:, None] * inv_freq.float()[None, :]  # [n, D/2]
        c, s = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        while c.dim() < x.dim():
            c, s = c[:, None], s[:, None]
        xr = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * c + xr * s

    for r in range(qo_indptr.shape[0] - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        k0, k1 = int(kv_indptr[r]), int(kv_indptr[r + 1])
        if q1 == q0:
            continue
        pages = indices[k0:k1].long()
        kv_len = (k1 - k0 - 1) * ps + int(last_page_len[r]) if k1 > k0 else 0
        k = k_units[pages].reshape(-1, d)[:kv_len].float()
        v = v_units[pages].reshape(-1, d)[:kv_len].float()
        qo_len = q1 - q0
        qpos = torch.arange(kv_len - qo_len, kv_len, device=q.device)
        qr = rot(q[q0:q1].float(), qpos)  # [qo, g, D]
        kr = rot(k, torch.arange(kv_len, device=q.device))
        s = torch.einsum("qgd,td->qgt", qr, kr) * sm_scale
        if causal:
            keep = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]  # [qo, T]
            s = s.masked_fill(~keep[:, None, :], float("-inf"))
        ls = torch.logsumexp(s, -1)  # [qo, g]
        p = torch.exp(s - ls[..., None]).nan_to_num(0.0)
        o[q0:q1] = torch.einsum("qgt,td->qgd", p, v)
        lse[q0:q1] = ls / LN2
    return o.to(q.dtype), lse


def emulate_prefill_gqa(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `BatchPrefillWithPagedKVCacheWrapper` computes with page size 1, no RoPE, no mask, native GQA.

    q `[nq, Hq, D]` (already rotated); `k_rows`, `v_rows` `[M, Hkv, D]` (K already rotated).
    Returns (o `[nq, Hq, D]` q.dtype, lse `[nq, Hq]` float32 base 2)."""
    nq, hq, d = q.shape
    hkv = k_rows.shape[1]
    g = hq // hkv
    o = torch.zeros(nq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((nq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(qo_indptr.shape[0] - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        rows = indices[int(kv_indptr[r]) : int(kv_indptr[r + 1])].long()
        k = k_rows[rows].float().repeat_interleave(g, dim=1)  # [T, Hq, D]
        v = v_rows[rows].float().repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,thd->qht", q[q0:q1].float(), k) * sm_scale
        ls = torch.logsumexp(s, -1)  # [qo, Hq]
        o[q0:q1] = torch.einsum("qht,thd->qhd", torch.exp(s - ls[..., None]), v)
        lse[q0:q1] = ls / LN2
    return o.to(q.dtype), lse
