"""Fused K/V page write for the new tokens of a step (pre-RoPE K, V) into head-granular pool slots.

A slot < 0 means "no destination" (padding rows of a CUDA-graph batch) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    K, V, SLOTS, KP, VP, stride_kn, stride_kh, stride_vn, stride_vh, stride_sh, N,
    D: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)  # token
    h = tl.program_id(1)  # kv head
    slot = tl.load(SLOTS + h * stride_sh + i).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, D)
    k = tl.load(K + i * stride_kn + h * stride_kh + offs)
    v = tl.load(V + i * stride_vn + h * stride_vh + offs)
    tl.store(KP + slot * D + offs, k.to(KP.dtype.element_ty))
    tl.store(VP + slot * D + offs, v.to(VP.dtype.element_ty))


def write_kv_pages(
    k_slots: torch.Tensor, v_slots: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k, v `[N, Hkv, D]` at `slots [Hkv, N]` (int32/int64) of the pool views `[num_slots, D]`.

    One Triton program per (token, kv head); converts to the pool dtype.
    """
    n, hkv, d = k.shape
    if n == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or slots.stride(-1) != 1:
        raise ValueError("k, v and slots must be contiguous in their last dim")
    _write_kv_kernel[(n, hkv)](
        k, v, slots, k_slots, v_slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), slots.stride(0), n, D=d,
    )  # fmt: skip


def write_kv_pages_torch(
    k_slots: torch.Tensor, v_slots: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Torch fallback of `write_kv_pages` (same contract, slots < 0 skipped)."""
    s = slots.long()  # [Hkv, N]
    keep = s >= 0
    kt = k.transpose(0, 1)  # [Hkv, N, D]
    vt = v.transpose(0, 1)
    k_slots[s[keep]] = kt[keep].to(k_slots.dtype)
    v_slots[s[keep]] = vt[keep].to(v_slots.dtype)
