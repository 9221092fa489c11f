"""SegPagedAttention kernels against the torch reference backend.

CPU tests run the Triton kernels under TRITON_INTERPRET=1 (set before triton is imported; tiny sizes).
GPU tests (marked `gpu`) check flashinfer and triton in bf16 against the torch reference, and full-model
logits, and CUDA-graph replay against eager.
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
    random_weights,
    tiny_config,
)

from redknot_rag.attention import TorchBackend  # noqa: E402
from redknot_rag.attention.flashinfer_backend import build_page_tables, is_contiguous_layout  # noqa: E402
from redknot_rag.attention.triton_backend import TritonBackend  # noqa: E402
from redknot_rag.kernels.kv_write import write_kv_pages, write_kv_pages_torch  # noqa: E402
from redknot_rag.kernels.paged_attention import SegPagedMeta, merge_states, rope_tables, seg_paged_attention  # noqa: E402
from redknot_rag.kvcache import PageAllocator  # noqa: E402
from redknot_rag.model import CausalLM  # noqa: E402
from redknot_rag.rope import Rotary  # noqa: E402
from redknot_rag.runner import load_backend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIXED = [
    SeqSpec(private=37),  # decode, private pages only, partial last page
    SeqSpec(private=9, q_len=5, segments=((21, 0), (13, 40))),  # prefill after two segments, gap
    SeqSpec(private=20, segments=((30, 0),), local_sink=4, local_window=8),  # local heads
    SeqSpec(private=3, q_len=3),  # fresh prefill
]


def _compare_backends(cfg, page_size, specs, dtype, device, make, atol, num_splits=None):
    pool = random_pool(cfg, 1500, page_size, dtype, device)
    alloc = PageAllocator(1500)
    batch = build_batch(cfg, pool, alloc, specs)
    rot = Rotary(cfg, device)
    ref = TorchBackend(cfg, pool, rot)
    be = make(cfg, pool, rot)
    if num_splits is not None:
        be.force_num_splits = num_splits
    ref.plan(batch)
    be.plan(batch)
    errs = layer_errors(cfg, be, ref, batch.num_tokens, device, dtype)
    assert max(errs) < atol, errs
    return be


@pytest.mark.parametrize(
    "head_dim,group,page_size,llama3",
    [(64, 1, 16, False), (64, 4, 1, False), (128, 8, 16, False), (128, 4, 16, True), (64, 8, 1, True)],
)
def test_triton_matches_torch(head_dim, group, page_size, llama3):
    cfg = tiny_config(head_dim=head_dim, group=group, llama3=llama3)
    _compare_backends(cfg, page_size, MIXED, torch.float32, DEV, TritonBackend, atol=1e-4)


def test_triton_split_kv_merge():
    cfg = tiny_config(head_dim=64, group=4)
    specs = [SeqSpec(private=150), SeqSpec(private=40, segments=((64, 0),), local_sink=4, local_window=16)]
    _compare_backends(cfg, 16, specs, torch.float32, DEV, TritonBackend, atol=1e-4, num_splits=3)


def _attn_ref(q, k, v, scale):
    s = torch.einsum("hd,td->ht", q, k) * scale
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


def test_kernel_lse_and_merge_states():
    torch.manual_seed(0)
    d, g, t = 64, 4, 40
    k = torch.randn(t, d, device=DEV)
    v = torch.randn(t, d, device=DEV)
    q = torch.randn(1, g, d, device=DEV)
    cos, sin = rope_tables(torch.zeros(d // 2, device=DEV), 8, torch.float32)  # identity rotation

    def run(lo: int, hi: int):
        i32 = dict(dtype=torch.int32, device=DEV)
        meta = SegPagedMeta(
            q_pos=torch.tensor([5], **i32),
            row_q_start=torch.tensor([0], **i32),
            row_q_len=torch.tensor([1], **i32),
            row_head=torch.tensor([0], **i32),
            kv_indptr=torch.tensor([0, hi - lo], **i32),
            kv_slots=torch.arange(lo, hi, **i32),
            kv_pos=torch.zeros(hi - lo, **i32),
            max_q_len=1,
        )
        return seg_paged_attention(q, k, v, meta, cos, sin, g)

    o_all, lse_all = run(0, t)
    o_ref, lse_ref = _attn_ref(q[0], k, v, d**-0.5)  # fp32: the kernel uses IEEE fp32 dots
    torch.testing.assert_close(o_all[0], o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_all[0], lse_ref, atol=1e-5, rtol=1e-5)
    o1, l1 = run(0, 13)
    o2, l2 = run(13, t)
    o, lse = merge_states(o1, l1, o2, l2)
    torch.testing.assert_close(o, o_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_all, atol=1e-5, rtol=1e-5)
    # an empty side: output 0 / lse -inf, and merging with it is the identity
    o0, l0 = run(5, 5)
    assert torch.all(o0 == 0) and torch.all(torch.isneginf(l0))
    o, lse = merge_states(o_all, lse_all, o0, l0)
    torch.testing.assert_close(o, o_all)
    o, lse = merge_states(o0, l0, o0, l0)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))


def test_write_kv_matches_torch():
    n, hkv, d = 5, 3, 64
    kp = torch.zeros(40, d, device=DEV)
    vp = torch.zeros(40, d, device=DEV)
    kp2, vp2 = kp.clone(), vp.clone()
    slots = torch.randperm(40, device=DEV)[: n * hkv].view(hkv, n).to(torch.int32)
    slots[1, 2] = -1  # padding: skipped
    kv = torch.randn(n, 2 * hkv, d, device=DEV)
    k, v = kv.split([hkv, hkv], dim=1)
    write_kv_pages(kp, vp, slots, k, v)
    write_kv_pages_torch(kp2, vp2, slots, k, v)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)
    assert torch.equal(kp[slots[0, 0].long()], k[0, 0])


def test_page_tables_cover_slots():
    cfg = tiny_config(head_dim=64, group=2, num_kv_heads=2, num_layers=3)
    pool = random_pool(cfg, 400, 4, torch.float32, "cpu")
    alloc = PageAllocator(400)
    ok = build_batch(cfg, pool, alloc, [SeqSpec(private=9, segments=((8, 0),)), SeqSpec(private=6, q_len=2)])
    assert is_contiguous_layout(ok, 4)
    for batch, decode in [(ok, False)]:
        pt = build_page_tables(batch, 4)
        assert pt.is_decode == decode
        # rows (head, seq) for prefill: rebuild every row's slots from its pages and compare
        nseq = len(batch.seqs)
        for layer in range(cfg.num_layers):
            for h in range(cfg.num_kv_heads):
                for i, s in enumerate(batch.seqs):
                    r = h * nseq + i
                    pages = pt.indices[layer, pt.indptr[r] : pt.indptr[r + 1]].long()
                    t = s.num_kv
                    rebuilt = (pages[:, None] * 4 + torch.arange(4)).flatten()[:t]
                    assert int(pt.last_page_len[r]) == t - 4 * (pages.numel() - 1)
                    assert torch.equal(rebuilt, s.kv_slots[layer, h])
    dec = build_batch(cfg, pool, alloc, [SeqSpec(private=9), SeqSpec(private=4)])
    pt = build_page_tables(dec, 4)
    assert pt.is_decode and pt.indptr.tolist() == [0, 3, 6, 7, 8]
    gap = build_batch(cfg, pool, alloc, [SeqSpec(private=3, segments=((8, 5),))])
    partial = build_batch(cfg, pool, alloc, [SeqSpec(private=3, segments=((6, 0),))])
    local = build_batch(cfg, pool, alloc, [SeqSpec(private=30, local_sink=2, local_window=4)])
    assert not is_contiguous_layout(gap, 4)
    assert not is_contiguous_layout(partial, 4)
    assert not is_contiguous_layout(local, 4)


def _model_logits(cfg, backend_name, specs, dtype, device, page_size=16):
    torch.manual_seed(0)
    w = random_weights(cfg, dtype, device)
    model = CausalLM(cfg, w)
    outs = []
    for name in ("torch", backend_name):
        torch.manual_seed(1)
        pool = random_pool(cfg, 2000, page_size, dtype, device)
        alloc = PageAllocator(2000)
        torch.manual_seed(2)
        batch = build_batch(cfg, pool, alloc, specs)
        be = load_backend(name, cfg, pool, Rotary(cfg, device))
        outs.append(model.forward(batch, be))
    return outs


def test_model_logits_triton_vs_torch_cpu():
    cfg = tiny_config(head_dim=64, group=2, num_layers=2, vocab=64)
    ref, got = _model_logits(cfg, "triton", MIXED, torch.float32, DEV)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


def test_model_logits_triton_vs_torch_cpu_sliding_layers():
    """Gemma-3-style attention: a sliding layer (window 6, own RoPE base) and a global one, q scaled by
    query_pre_attn_scalar; segments, position gaps and local heads in the batch."""
    from dataclasses import replace

    cfg = replace(
        tiny_config(head_dim=64, group=2, num_layers=2, vocab=64),
        layer_types=("sliding", "full"),
        sliding_window=6,
        rope_local_theta=100.0,
        query_pre_attn_scalar=48,
    )
    ref, got = _model_logits(cfg, "triton", MIXED, torch.float32, DEV)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    # the window does bind here: without it the torch reference gives other logits
    unwindowed, _ = _model_logits(replace(cfg, sliding_window=1 << 20), "torch", MIXED, torch.float32, DEV)
    assert (unwindowed - ref).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flashinfer", "triton"])
@pytest.mark.parametrize("layout", ["contiguous_decode", "contiguous_prefill", "segments_local"])
def test_gpu_backend_bf16(name, layout):
    """bf16 vs the torch reference (which rotates in bf16): tolerance 2e-2 absolute on O(1) outputs."""
    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=2)
    specs = {
        "contiguous_decode": [SeqSpec(private=700), SeqSpec(private=33), SeqSpec(private=1)],
        "contiguous_prefill": [SeqSpec(private=300, q_len=77), SeqSpec(private=5, q_len=5), SeqSpec(private=40)],
        "segments_local": MIXED,
    }[layout]
    be = _compare_backends(
        cfg, 16, specs, torch.bfloat16, "cuda", lambda c, p, r: load_backend(name, c, p, r), atol=2e-2
    )
    if name == "flashinfer":
        assert be.use_triton == (layout == "segments_local")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flashinfer", "triton"])
def test_gpu_model_logits(name):
    """Full CausalLM logits, bf16: max |diff| < 5e-2 of logits with std ~1, and same argmax mostly."""
    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=4, vocab=512)
    specs = [SeqSpec(private=200, q_len=200), SeqSpec(private=64, q_len=1), SeqSpec(private=17, q_len=3)]
    ref, got = _model_logits(cfg, name, specs, torch.bfloat16, "cuda")
    assert (got - ref).abs().max().item() < 5e-2 * max(1.0, ref.abs().max().item())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flashinfer", "triton"])
def test_gpu_cuda_graph_decode(name):
    """Graph replay equals the eager step for decode batches of changing sizes and lengths."""
    from redknot_rag.graphs.decode import DecodeGraphRunner

    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=2, vocab=256)
    torch.manual_seed(0)
    model = CausalLM(cfg, random_weights(cfg, torch.bfloat16, "cuda"))
    pool = random_pool(cfg, 4000, 16, torch.bfloat16, "cuda")
    alloc = PageAllocator(4000)
    be = load_backend(name, cfg, pool, Rotary(cfg, "cuda"))
    runner = DecodeGraphRunner(model, be, max_kv_tokens=8192, batch_sizes=(1, 2, 4, 8))
    runner.capture()
    for lens in ([100], [5, 300, 17], [64, 64, 1, 2, 800], [33, 34]):
        batch = build_batch(cfg, pool, alloc, [SeqSpec(private=t) for t in lens])
        slot = runner.prepare(batch)
        assert slot is not None
        got = runner.replay(slot, len(lens)).clone()
        want = model.forward(batch, load_backend("torch", cfg, pool, Rotary(cfg, "cuda")))
        assert (got - want).abs().max().item() < 5e-2 * max(1.0, want.abs().max().item())
