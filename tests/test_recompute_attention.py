"""Recompute + question in one attention launch per layer: query tiles that stop at their last position.

A reused sequence's step holds queries inside the context (recomputed tokens, ascending) and at its tail
(the question). With keys listed by ascending position (`kv_sorted`), each tile of the Triton kernel reads
keys only up to its last query's position. Checked against the torch reference on the CPU under
TRITON_INTERPRET=1 in fp32 (|diff| < 1e-4), and on the GPU in bf16 (marked `gpu`; |diff| < 3e-2 on O(1)
outputs, the tolerance of test_fi_plan).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_fixtures import layer_errors, random_pool, reuse_batch, tiny_config  # noqa: E402

from redknot_rag.attention import TorchBackend  # noqa: E402
from redknot_rag.attention.triton_backend import TritonBackend  # noqa: E402
from redknot_rag.attention.triton_plan import build_plan  # noqa: E402
from redknot_rag.kernels.paged_attention import rope_tables, seg_paged_attention  # noqa: E402
from redknot_rag.kvcache import PageAllocator  # noqa: E402
from redknot_rag.rope import Rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _recompute(segments: list[int], every: int) -> list[int]:
    """Every `every`-th context token after the first segment (the anchor), ascending."""
    return list(range(segments[0], sum(segments), every))


def _errors(group, page_size, segments, every, question, dtype, block_m=None, num_splits=None, device=DEV):
    cfg = tiny_config(head_dim=64, group=group)
    pool = random_pool(cfg, 4000, page_size, dtype, device)
    alloc = PageAllocator(4000)
    batch = reuse_batch(cfg, pool, alloc, segments, _recompute(segments, every), question)
    rot = Rotary(cfg, device)
    ref, be = TorchBackend(cfg, pool, rot), TritonBackend(cfg, pool, rot)
    be.block_m, be.force_num_splits = block_m, num_splits
    ref.plan(batch)
    be.plan(batch)
    assert be.meta is not None and be.meta.kv_sorted
    return layer_errors(cfg, be, ref, batch.num_tokens, device, dtype)


@pytest.mark.parametrize(
    "group,page_size,block_m,num_splits",
    [(1, 16, None, None), (4, 16, None, None), (4, 1, 16, None), (2, 16, 128, None), (4, 16, 64, 3)],
)
def test_recompute_and_question_match_torch_fp32(group, page_size, block_m, num_splits):
    errs = _errors(group, page_size, [8, 40, 33, 47], 5, 6, torch.float32, block_m, num_splits)
    assert max(errs) < 1e-4, errs


@gpu
@pytest.mark.gpu
def test_recompute_and_question_match_torch_bf16():
    """bf16 on the GPU only: under TRITON_INTERPRET=1 bf16 dots come out wrong for every path of this
    kernel (errors ~1e9 with or without the tile bound), so the CPU checks fp32."""
    errs = _errors(4, 16, [8, 64, 64], 3, 8, torch.bfloat16, block_m=128)
    assert max(errs) < 3e-2, errs


def test_tiles_read_no_key_past_their_last_query():
    """Keys past every query's position hold NaN in V: a tile that read them would turn its output NaN
    (0 * NaN), so finite outputs show the bound holds; the same call without `kv_sorted` reads them."""
    cfg = tiny_config(head_dim=64, group=4)
    pool = random_pool(cfg, 400, 16, torch.float32, DEV)
    alloc = PageAllocator(400)
    segments = [8, 64, 64]
    batch = reuse_batch(cfg, pool, alloc, segments, [20, 21, 40, 70], 0)  # inside queries only
    plan = build_plan(batch, cfg.num_layers, cfg.num_kv_heads, torch.device(DEV))
    meta = plan.layer(0)
    s = batch.seqs[0]
    late = s.kv_slots[0][:, 71:].reshape(-1)  # layer 0, every kv head: keys at positions > 70
    pool.v_slots[late] = float("nan")
    cos, sin = rope_tables(Rotary(cfg, DEV).inv_freq.to(DEV), 256, torch.float32)
    q = torch.randn(batch.num_tokens, cfg.num_q_heads, cfg.head_dim, device=DEV)
    out, _ = seg_paged_attention(q, pool.k_slots, pool.v_slots, meta, cos, sin, cfg.num_kv_groups, block_m=16)
    assert bool(torch.isfinite(out).all())
    meta.kv_sorted = False
    out, _ = seg_paged_attention(q, pool.k_slots, pool.v_slots, meta, cos, sin, cfg.num_kv_groups, block_m=16)
    assert not bool(torch.isfinite(out).all())


def test_unsorted_layouts_keep_the_full_scan():
    cfg = tiny_config(head_dim=64, group=2)
    pool = random_pool(cfg, 400, 16, torch.float32, DEV)
    alloc = PageAllocator(400)
    batch = reuse_batch(cfg, pool, alloc, [8, 32], [10, 11], 4)
    s = batch.seqs[0]
    gap = type(s.layout)(s.layout.num_tokens, pos_is_index=False)
    batch.seqs[0] = type(s)(s.q_start, s.q_len, s.new_slots, s.kv_slots, s.kv_pos, s.kv_visible, gap)
    assert not build_plan(batch, cfg.num_layers, cfg.num_kv_heads, torch.device(DEV)).kv_sorted


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [64, 128])
def test_recompute_matches_torch_bf16_gpu(block_m):
    """A 4K context in 512-token segments, every 10th token recomputed, a 64-token question, GQA 4,
    head_dim 128 (the 8B shape's head): bf16 against the torch reference, |diff| < 3e-2."""
    cfg = tiny_config(head_dim=128, group=4)
    pool = random_pool(cfg, 6000, 16, torch.bfloat16, DEV)
    alloc = PageAllocator(6000)
    segments = [32] + [512] * 8
    batch = reuse_batch(cfg, pool, alloc, segments, _recompute(segments, 10), 64)
    rot = Rotary(cfg, DEV)
    ref, be = TorchBackend(cfg, pool, rot), TritonBackend(cfg, pool, rot)
    be.block_m = block_m
    ref.plan(batch)
    be.plan(batch)
    errs = layer_errors(cfg, be, ref, batch.num_tokens, DEV, torch.bfloat16)
    assert max(errs) < 3e-2, errs
