"""The FlashInfer mapping (`redknot_rag/attention/flashinfer_plan.py`) against the torch reference, on the CPU.

The FlashInfer calls are replaced by their torch emulation (`emulate_prefill`: FlashInfer's
in-kernel RoPE and causal conventions, base-2 LSE); the Triton part of inside queries runs under
TRITON_INTERPRET=1. The same scenarios run on the GPU with the real kernels in test_kernels.py.
fp32 throughout: tolerance 1e-4 on O(1) outputs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_fixtures import (  # noqa: E402
    SeqSpec,
    build_batch,
    layer_errors,
    random_pool,
    reuse_batch,
    tiny_config,
)

from redknot_rag.attention import TorchBackend  # noqa: E402
from redknot_rag.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from redknot_rag.attention.flashinfer_plan import plan_batch, tail_len  # noqa: E402
from redknot_rag.kvcache import PageAllocator  # noqa: E402
from redknot_rag.rope import Rotary  # noqa: E402

# The emulation tests run Triton under TRITON_INTERPRET on CPU tensors, which a CUDA host cannot do; there the
# `gpu` tests below run the same scenarios on the real kernels.
cpu_emulation = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation; the gpu tests cover a GPU host")


def _compare(cfg, pool, batch, block=8, atol=1e-4, part_a="rotated"):
    rot = Rotary(cfg, "cpu")
    ref = TorchBackend(cfg, pool, rot)
    be = FlashInferBackend(cfg, pool, rot, emulate=True)
    be.inside = "split"  # the FlashInfer mapping under test (not the Triton tiles of inside="tiles")
    be.block = block
    be.part_a = part_a
    be.plan(batch)
    ref.plan(batch)
    errs = layer_errors(cfg, be, ref, batch.num_tokens, "cpu", torch.float32)
    assert max(errs) < atol, (errs, be.path)
    return be


def _setup(page_size=4):
    cfg = tiny_config(head_dim=32, group=2, num_kv_heads=2, num_layers=2)
    pool = random_pool(cfg, 3000, page_size, torch.float32, "cpu")
    return cfg, pool, PageAllocator(3000)


def test_tail_len():
    assert tail_len(torch.tensor([3, 4, 5]), 6) == 3
    assert tail_len(torch.tensor([1, 4, 5]), 6) == 2
    assert tail_len(torch.tensor([1, 2]), 6) == 0


@cpu_emulation
@pytest.mark.parametrize(
    "specs,path",
    [
        ([SeqSpec(private=37), SeqSpec(private=9)], "flashinfer"),  # decode, page units
        ([SeqSpec(private=30, q_len=7), SeqSpec(private=9, q_len=2)], "flashinfer"),  # tails
        ([SeqSpec(private=12, q_len=12), SeqSpec(private=20, q_len=3)], "sdpa+flashinfer"),  # fresh + tail
        ([SeqSpec(private=9, q_len=5, segments=((22, 0), (13, 22)))], "flashinfer"),  # partial pages: slots
    ],
)
def test_tails_decode_fresh_and_segments(specs, path):
    cfg, pool, alloc = _setup()
    batch = build_batch(cfg, pool, alloc, specs)
    be = _compare(cfg, pool, batch)
    assert be.path == path


@cpu_emulation
def test_gaps_and_local_heads_fall_back_to_triton():
    cfg, pool, alloc = _setup()
    batch = build_batch(cfg, pool, alloc, [SeqSpec(private=9, q_len=5, segments=((21, 0), (13, 40)))])
    assert _compare(cfg, pool, batch).path == "triton"


@cpu_emulation
@pytest.mark.parametrize(
    "segments,recompute,question",
    [
        ([8, 21, 13], [0, 1, 9, 10, 11, 30, 41], 5),  # scattered, first block (no part A) included
        ([8, 16, 16], list(range(8, 40)), 3),  # everything after the anchor recomputed
        ([8, 21], [12, 13, 20], 0),  # recompute only, no question
        ([8, 21, 13], [], 6),  # question after relocation (slot units: partial pages)
    ],
)
@pytest.mark.parametrize("part_a", ["rotated", "pre-rotated-q"])
def test_recompute_inside_queries_and_question_in_one_forward(segments, recompute, question, part_a):
    cfg, pool, alloc = _setup()
    batch = reuse_batch(cfg, pool, alloc, segments, recompute, question)
    be = _compare(cfg, pool, batch, block=8, part_a=part_a)
    p = be.plan_fi
    assert p is not None and p.page_size == 1
    ctx = sum(segments)
    is_tail = recompute == list(range(ctx - len(recompute), ctx))  # then one causal request serves all
    assert (p.inside is None) == is_tail
    assert (p.full is not None) == (any(i >= 8 for i in recompute) and not is_tail)


@cpu_emulation
def test_plan_requests_cover_prefixes():
    """Part-A requests list exactly keys [0, b) of their block, in order, from the slot table."""
    cfg, pool, alloc = _setup()
    batch = reuse_batch(cfg, pool, alloc, [8, 21, 13], [9, 10, 30], 2)
    p = plan_batch(batch, cfg.num_kv_heads, 4, 8, torch.device("cpu"), True)
    s = batch.seqs[0]
    full = p.full
    assert full is not None
    idx = p.units[0][full.gather]
    r = 0
    for h in range(cfg.num_kv_heads):
        for b in (8, 24):  # blocks of 9,10 and of 30
            lo, hi = int(full.kv_indptr[r]), int(full.kv_indptr[r + 1])
            assert torch.equal(idx[lo:hi].long(), s.kv_slots[0, h, :b])
            r += 1


# ----------------------------------------------------------------------------------------------- GPU
# The real FlashInfer kernels (bf16, page 16, in-kernel RoPE with pre-rotated q) against the torch
# reference (which rotates in bf16): |diff| < 3e-2 on O(1) outputs.

BF16_ATOL = 3e-2


def _compare_gpu(specs_or_batch, page_size=16, block=64, part_a="rotated"):
    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=2)
    pool = random_pool(cfg, 6000, page_size, torch.bfloat16, "cuda")
    alloc = PageAllocator(6000)
    batch = specs_or_batch(cfg, pool, alloc)
    rot = Rotary(cfg, "cuda")
    ref = TorchBackend(cfg, pool, rot)
    be = FlashInferBackend(cfg, pool, rot)
    be.inside = "split"
    be.block = block
    be.part_a = part_a
    be.plan(batch)
    ref.plan(batch)
    errs = layer_errors(cfg, be, ref, batch.num_tokens, "cuda", torch.bfloat16)
    print(be.path, "max |diff|", max(errs))
    assert max(errs) < BF16_ATOL, (be.path, errs)
    return be


@pytest.mark.gpu
@pytest.mark.parametrize(
    "segments,recompute,question",
    [
        ([32, 512, 300, 512], [0, 5, 40, 41, 42, 600, 601, 900, 1200, 1300], 64),  # inside + question
        ([32, 512, 512], list(range(32, 48)) + list(range(544, 560)), 64),  # epic-like runs
        ([32, 512, 512], list(range(32, 1056)), 64),  # recompute everything: one causal request
        ([32, 500, 512], [], 64),  # question after relocation, partial pages (slot units)
        ([32, 512, 512], [], 64),  # question after relocation, aligned (page units)
    ],
)
@pytest.mark.parametrize("part_a", ["rotated", "pre-rotated-q"])
def test_gpu_flashinfer_reuse_paths(segments, recompute, question, part_a):
    be = _compare_gpu(lambda c, p, a: reuse_batch(c, p, a, segments, recompute, question), part_a=part_a)
    assert "flashinfer" in be.path
    assert ("triton-inside" in be.path) == bool(recompute and recompute != list(range(32, 1056)))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "specs,path",
    [
        ([SeqSpec(private=700), SeqSpec(private=33), SeqSpec(private=1)], "flashinfer"),
        ([SeqSpec(private=300, q_len=77), SeqSpec(private=40)], "flashinfer"),
        ([SeqSpec(private=1000, q_len=1000), SeqSpec(private=64, q_len=5)], "sdpa+flashinfer"),
        ([SeqSpec(private=1, segments=((500, 0), (300, 500)))], "flashinfer"),  # decode over slots
    ],
)
def test_gpu_flashinfer_plain_paths(specs, path):
    be = _compare_gpu(lambda c, p, a: build_batch(c, p, a, specs))
    assert be.path == path


@cpu_emulation
def test_auto_inside_rule(monkeypatch):
    """`inside="auto"`: tiles (128 pairs high) for recompute batches, split only for a recompute share over
    `SPLIT_MIN_SHARE` of a context at least `SPLIT_MIN_CONTEXT` long, neither for batches without inside
    queries; the tiles path still matches the torch reference."""
    import redknot_rag.attention.flashinfer_backend as fb

    cfg, pool, alloc = _setup()
    rot = Rotary(cfg, "cpu")
    small = reuse_batch(cfg, pool, alloc, [8, 40, 40], list(range(8, 60)), 6)  # 52 of 88: a large share
    be = FlashInferBackend(cfg, pool, rot, emulate=True)
    assert be.inside == "auto"
    be.plan(small)
    assert be.path == "triton-tiles" and be.triton.block_m == 128
    ref = TorchBackend(cfg, pool, rot)
    ref.plan(small)
    assert max(layer_errors(cfg, be, ref, small.num_tokens, "cpu", torch.float32)) < 1e-4
    monkeypatch.setattr(fb, "SPLIT_MIN_CONTEXT", 64)  # the same batch counted as "long": split
    be.plan(small)
    assert "triton-inside" in be.path and be.triton.block_m is None
    few = reuse_batch(cfg, pool, alloc, [8, 40, 40], [9, 50], 6)  # 2 of 88: tiles even when long
    be.plan(few)
    assert be.path == "triton-tiles"
    tail = reuse_batch(cfg, pool, alloc, [8, 40, 40], [], 6)  # no inside queries: FlashInfer
    be.plan(tail)
    assert "tiles" not in be.path and be.triton.block_m is None
    be.inside = "tile"
    with pytest.raises(ValueError, match="inside must be"):
        be.plan(small)
