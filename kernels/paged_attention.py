"""SegPagedAttention in Triton: attention over head-granular pool slots with explicit positions.

One *row* is one (sequence, kv_head) of one layer. A row lists its visible keys in CSR form:
`kv_indptr [R + 1]` into `kv_slots [nnz]` (pool slot = page * page_size + offset) and `kv_pos [nnz]`
(RoPE position of that key). Invisible keys (the middle of a local head's context) are simply not
listed, so sink + window with a position gap costs only the keys that are read.

Invariants:
- Pool K is pre-RoPE; the kernel rotates K and q from `kv_pos` / `q_pos` with cos/sin tables
  `[max_pos, D/2]` built from the model's `inv_freq` (`rope_tables`: any RoPE variant whose angle is
  `pos * inv_freq[j]`, llama3 scaling included) — the arithmetic of `redknot_rag.rope.Rotary`, whose
  tables are also cast to the activation dtype. Table loads, not in-kernel sin/cos: the latter made
  decode compute-bound (~30% of HBM peak on H100).
- A key is attended iff it is listed for the row and `q_pos - window < kv_pos <= q_pos` (causal by
  position; `window` is a sliding-window layer's size, unbounded by default).
- Outputs come with a natural-log log-sum-exp, so results over disjoint key sets merge exactly
  (`merge_states`); a row with no visible key has output 0 and lse -inf.
- The q heads of one kv head (GQA group g) are processed together: tile row m is
  (token m // g, q head kv_head * g + m % g).
- Long rows split into `num_splits` chunks (sized in-kernel from each row's length, so a fixed grid
  serves changing lengths under CUDA graphs); partials are merged by `_merge_splits_kernel`.
- Queries inside the context (recompute) and at its tail run in the same launch. Where every row lists
  its keys by ascending position (`kv_sorted`: the planner knows it from the sequences' layouts), a
  tile of queries reads keys only up to its last query's position (found by binary search in `kv_pos`):
  with queries sorted by position the tiles of a recompute batch read a triangle, not the square.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30  # wider than any position: q_pos - window stays in int32


@dataclass
class SegPagedMeta:
    """Per-layer attention metadata (device tensors, all int32).

    `q_pos [N]`; per row: `row_q_start`, `row_q_len`, `row_head` `[R]`; `kv_indptr [R + 1]`,
    `kv_slots [nnz]`, `kv_pos [nnz]`. `max_q_len` bounds `row_q_len` (sizes the grid). `kv_sorted`:
    every row lists its keys by ascending position (tiles then stop at their last query's position).
    """

    q_pos: torch.Tensor
    row_q_start: torch.Tensor
    row_q_len: torch.Tensor
    row_head: torch.Tensor
    kv_indptr: torch.Tensor
    kv_slots: torch.Tensor
    kv_pos: torch.Tensor
    max_q_len: int
    kv_sorted: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.row_head.shape[0])


@triton.jit
def _seg_paged_attn_kernel(
    Q, K, V, O, LSE,
    QPOS, ROW_Q_START, ROW_Q_LEN, ROW_HEAD, KV_INDPTR, KV_SLOT, KV_POS, COS, SIN,
    stride_qn, stride_qh, stride_os, stride_on, stride_oh, stride_ls, stride_ln,
    sm_scale_log2, WINDOW,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    SORTED: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    HALF: tl.constexpr = D // 2

    q_start = tl.load(ROW_Q_START + r)
    q_len = tl.load(ROW_Q_LEN + r)
    head = tl.load(ROW_HEAD + r)
    if pid_m * BLOCK_M >= q_len * G:
        return
    kv_begin = tl.load(KV_INDPTR + r)
    kv_len = tl.load(KV_INDPTR + r + 1) - kv_begin

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_m // G
    qh = head * G + offs_m % G
    m_valid = tok < q_len
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, D)
    qpos = tl.load(QPOS + q_start + tok, mask=m_valid, other=0)
    if SORTED:  # keys ascending by position: read only those up to the tile's last query position
        q_last = tl.max(tl.where(m_valid, qpos, -1), 0)
        b_lo = kv_len * 0
        b_hi = kv_len
        while b_lo < b_hi:  # first key with position > q_last
            mid = (b_lo + b_hi) // 2
            if tl.load(KV_POS + kv_begin + mid) <= q_last:
                b_lo = mid + 1
            else:
                b_hi = mid
        kv_len = b_lo
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    # q: rotate by its own position, in float32
    q_ptr = Q + (q_start + tok)[:, None] * stride_qn + qh[:, None] * stride_qh
    q_lo = tl.load(q_ptr + offs_h[None, :], mask=m_valid[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_ptr + HALF + offs_h[None, :], mask=m_valid[:, None], other=0.0).to(tl.float32)
    t_q = qpos.to(tl.int64)[:, None] * HALF + offs_h[None, :]
    cq = tl.load(COS + t_q).to(tl.float32)
    sq = tl.load(SIN + t_q).to(tl.float32)
    dt = K.dtype.element_ty
    qr_lo = (q_lo * cq - q_hi * sq).to(dt)
    qr_hi = (q_hi * cq + q_lo * sq).to(dt)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        slot = tl.load(KV_SLOT + kv_begin + offs_n, mask=n_valid, other=0).to(tl.int64)
        kpos = tl.load(KV_POS + kv_begin + offs_n, mask=n_valid, other=0)
        k_ptr = K + slot[:, None] * D
        k_lo = tl.load(k_ptr + offs_h[None, :], mask=n_valid[:, None], other=0.0).to(tl.float32)
        k_hi = tl.load(k_ptr + HALF + offs_h[None, :], mask=n_valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + slot[:, None] * D + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        t_k = kpos.to(tl.int64)[:, None] * HALF + offs_h[None, :]
        ck = tl.load(COS + t_k).to(tl.float32)
        sk = tl.load(SIN + t_k).to(tl.float32)
        kr_lo = (k_lo * ck - k_hi * sk).to(dt)
        kr_hi = (k_hi * ck + k_lo * sk).to(dt)
        s = tl.dot(qr_lo, tl.trans(kr_lo), input_precision=PREC)
        s += tl.dot(qr_hi, tl.trans(kr_hi), input_precision=PREC)  # [BLOCK_M, BLOCK_N] fp32
        s = s * sm_scale_log2
        keep = n_valid[None, :] & (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - WINDOW)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = O + split * stride_os + (q_start + tok)[:, None] * stride_on + qh[:, None] * stride_oh
    tl.store(o_ptr + offs_d[None, :], out.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + split * stride_ls + (q_start + tok) * stride_ln + qh, lse, mask=m_valid)


@triton.jit
def _merge_splits_kernel(
    OP, LP, O, LSE, num_splits, stride_os, stride_ls, n_heads,
    D: tl.constexpr,
):  # fmt: skip
    """OP `[S, N*H, D]` fp32, LP `[S, N*H]` fp32 → O `[N*H, D]`, LSE `[N*H]` (natural log)."""
    i = tl.program_id(0)
    offs_d = tl.arange(0, D)
    m = tl.full([1], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(LP + s * stride_ls + i + tl.zeros([1], tl.int32)))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(LP + s * stride_ls + i + tl.zeros([1], tl.int32))
        w = tl.exp(lse_s - m_safe)
        den += w
        acc += tl.sum(w) * tl.load(OP + s * stride_os + i * D + offs_d)
    has = den > 0
    out = acc / tl.sum(tl.where(has, den, 1.0))
    tl.store(O + i * D + offs_d, out.to(O.dtype.element_ty))
    tl.store(LSE + i + tl.zeros([1], tl.int32), tl.where(has, m + tl.log(tl.where(has, den, 1.0)), m))


def seg_paged_attention(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    meta: SegPagedMeta,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_kv_groups: int,
    sm_scale: float | None = None,
    num_splits: int = 1,
    block_n: int = 64,
    out: torch.Tensor | None = None,
    window: int | None = None,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of pre-RoPE q over the keys listed in `meta` (`window`: only keys with
    position > q position - window, a sliding-window layer).

    q `[N, Hq, D]` (pre-RoPE, pool dtype); `k_slots`, `v_slots` `[num_slots, D]` (pre-RoPE K);
    `cos`, `sin` `[max_pos, D/2]` (`rope_tables`; every listed position must be < max_pos).
    Every (token, q head) must belong to exactly one meta row. `block_m`: (token, q head) pairs per
    tile (16 or 64 by default, from `max_q_len`; 128 halves the key reloads of a long recompute).
    Returns (out `[N, Hq, D]` q.dtype, lse `[N, Hq]` float32, natural log, -inf where nothing visible).
    """
    n, hq, d = q.shape
    g = num_kv_groups
    if q.stride(-1) != 1 or k_slots.stride(0) != d or v_slots.stride(0) != d:
        raise ValueError("q, k_slots and v_slots must be contiguous in head_dim; slots rows dense")
    scale = d**-0.5 if sm_scale is None else sm_scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if block_m is None:
        block_m = 16 if meta.max_q_len * g <= 16 else 64
    grid_m = triton.cdiv(max(meta.max_q_len, 1) * g, block_m)
    grid = (grid_m, meta.num_rows, num_splits)
    if num_splits == 1:
        o_part, lse_part = out, torch.empty(n, hq, dtype=torch.float32, device=q.device)
        lse = lse_part
        stride_os, stride_ls = 0, 0
    else:
        o_part = torch.empty(num_splits, n, hq, d, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_splits, n, hq, dtype=torch.float32, device=q.device)
        stride_os, stride_ls = o_part.stride(0), lse_part.stride(0)
    on_stride = o_part.stride(-3) if num_splits > 1 else out.stride(0)
    oh_stride = o_part.stride(-2) if num_splits > 1 else out.stride(1)
    ln_stride = lse_part.stride(-2)
    _seg_paged_attn_kernel[grid](
        q, k_slots, v_slots, o_part, lse_part,
        meta.q_pos, meta.row_q_start, meta.row_q_len, meta.row_head,
        meta.kv_indptr, meta.kv_slots, meta.kv_pos, cos, sin,
        q.stride(0), q.stride(1), stride_os, on_stride, oh_stride, stride_ls, ln_stride,
        scale * LOG2E, _NO_WINDOW if window is None else int(window),
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", SORTED=meta.kv_sorted,
        num_warps=8 if block_m >= 128 else 4, num_stages=2,
    )  # fmt: skip
    if num_splits == 1:
        return out, lse
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous when num_splits > 1")
    _merge_splits_kernel[(n * hq,)](
        o_part, lse_part, out, lse, num_splits, o_part.stride(0), lse_part.stride(0), hq, D=d
    )
    return out, lse


def rope_tables(inv_freq: torch.Tensor, max_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) `[max_pos, D/2]` in `dtype`: angle = float32(pos) * inv_freq, as `Rotary` computes it."""
    pos = torch.arange(max_pos, device=inv_freq.device, dtype=torch.float32)
    ang = pos[:, None] * inv_freq.float()[None, :]  # [max_pos, D/2]
    return ang.cos().to(dtype).contiguous(), ang.sin().to(dtype).contiguous()


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over two disjoint key sets: o `[..., D]`, lse `[...]` float32 natural log.

    Returns (o `[..., D]` in o1.dtype, lse `[...]` float32). Where both lse are -inf the output is 0.
    """
    m = torch.maximum(lse1, lse2)
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w1 = torch.exp(lse1 - m_safe)
    w2 = torch.exp(lse2 - m_safe)
    den = w1 + w2
    den_safe = torch.where(den > 0, den, torch.ones_like(den))
    o = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / den_safe[..., None]
    lse = torch.where(den > 0, m_safe + torch.log(den_safe), m)
    return o.to(o1.dtype), lse
