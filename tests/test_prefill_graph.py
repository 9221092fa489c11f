"""CUDA graphs for small one-sequence prefill steps (`redknot_rag/graphs/prefill.py`).

CPU: the padded request layout keeps the real query rows' attention exactly what the unpadded layout
gives (FlashInfer emulated in torch). GPU (marked `gpu`): the graphed step equals the eager one, in
logits (bf16: max |diff| <= 5e-2 of max(1, max |logit|), the tolerance of the other bf16 model tests)
and in the KV it writes, the rest of the pool stays bit-identical (padding rows write nothing), and
page refcounts are exactly what the eager step leaves.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (the kernels package imports it)
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_fixtures import (  # noqa: E402
    SeqSpec,
    StubTokenizer,
    build_batch,
    random_pool,
    random_weights,
    tiny_config,
)

from redknot_rag.attention.flashinfer_plan import emulate_prefill  # noqa: E402
from redknot_rag.graphs.prefill import padded_requests  # noqa: E402
from redknot_rag.kvcache import PageAllocator  # noqa: E402
from redknot_rag.rope import Rotary  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_padded_requests_layout():
    pages = torch.arange(2 * 2 * 3, dtype=torch.int32).view(2, 2, 3) + 100  # [L=2, Hkv=2, P=3]
    rq = padded_requests(m=5, n=16, pages=pages, kv_len=40, page_size=16)
    assert rq.qo_indptr.tolist() == [0, 5, 16, 21, 32]  # (head 0, real), (head 0, pad), (head 1, real), ...
    assert rq.kv_indptr.tolist() == [0, 3, 4, 7, 8]
    assert rq.last_page_len.tolist() == [8, 11, 8, 11]  # 40 = 2 * 16 + 8; 11 padding queries over 11 keys
    assert rq.indices.tolist()[1] == [106, 107, 108, 0, 109, 110, 111, 0]  # layer 1; padding reads page 0
    full = padded_requests(m=16, n=16, pages=pages, kv_len=48, page_size=16)
    assert full.qo_indptr.tolist() == [0, 16, 16, 32, 32]  # no padding: empty requests over one key
    assert full.last_page_len.tolist() == [16, 1, 16, 1]


@pytest.mark.parametrize("m,n,kv_len", [(5, 16, 70), (16, 16, 48), (1, 32, 17), (40, 64, 160)])
def test_padded_requests_keep_real_rows(m, n, kv_len):
    """Real rows of the padded layout equal the unpadded layout's (emulated FlashInfer, bit for bit),
    whatever the padding rows hold; padding rows get finite outputs."""
    cfg = tiny_config(head_dim=64, group=4, num_kv_heads=2, num_layers=1)
    ps, hkv, g, d = 16, cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
    pool = random_pool(cfg, 64, ps, torch.float32, "cpu")
    pool.k[0].fill_(1e4)  # page 0: huge keys would dominate any real row that read them
    p = -(-kv_len // ps)
    pages = torch.randperm(63)[: hkv * p].view(1, hkv, p) + 1  # [L, Hkv, P], never page 0
    inv_freq, scale = Rotary(cfg, "cpu").inv_freq, cfg.attn_scale
    q_real = torch.randn(hkv, m, g, d)  # rows (head, token)
    plain_indptr = torch.arange(hkv + 1, dtype=torch.int32)
    want, _ = emulate_prefill(
        q_real.reshape(hkv * m, g, d), pool.k, pool.v, plain_indptr * m, plain_indptr * p, pages[0].reshape(-1),
        torch.full((hkv,), kv_len - (p - 1) * ps, dtype=torch.int32), True, inv_freq, scale,
    )  # fmt: skip
    rq = padded_requests(m, n, pages, kv_len, ps)
    q_pad = torch.randn(hkv, n, g, d) * 100
    q_pad[:, :m] = q_real
    got, _ = emulate_prefill(
        q_pad.reshape(hkv * n, g, d), pool.k, pool.v, rq.qo_indptr, rq.kv_indptr, rq.indices[0],
        rq.last_page_len, True, inv_freq, scale,
    )  # fmt: skip
    got = got.view(hkv, n, g, d)
    assert torch.equal(got[:, :m], want.view(hkv, m, g, d))
    assert torch.isfinite(got).all()


# ----------------------------------------------------------------------------------------------- GPU


def _tiny_model(num_layers: int = 2):
    from redknot_rag.model import CausalLM

    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=num_layers, vocab=512)
    torch.manual_seed(0)
    return cfg, CausalLM(cfg, random_weights(cfg, torch.bfloat16, "cuda"))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= 5e-2 * max(1.0, want.abs().max().item())


@gpu
@pytest.mark.gpu
def test_gpu_prefill_graph_matches_eager():
    """Question prefills after page-aligned segments (and a fresh short prompt), m new tokens in
    buckets 16-128: graph replay == eager FlashInfer forward; the pool outside the step's slots is
    bit-identical, the step's slots hold the eager K/V (bf16)."""
    from redknot_rag.graphs.prefill import PrefillGraphRunner
    from redknot_rag.runner import load_backend

    cfg, model = _tiny_model()
    pool = random_pool(cfg, 3000, 16, torch.bfloat16, "cuda")
    alloc = PageAllocator(3000)
    be = load_backend("flashinfer", cfg, pool, Rotary(cfg, "cuda"))
    runner = PrefillGraphRunner(model, be, max_kv_tokens=2048)
    runner.capture()
    cases = [
        SeqSpec(private=64, q_len=64, segments=((32, 0), (512, 32))),  # a 64-token question after naive reuse
        SeqSpec(private=40, q_len=40, segments=((32, 0), (128, 32), (256, 160))),  # bucket 64, 24 padding rows
        SeqSpec(private=2, q_len=2, segments=((32, 0),)),  # bucket 16
        SeqSpec(private=150, q_len=100, segments=((48, 0),)),  # private context before the step, bucket 128
        SeqSpec(private=77, q_len=77),  # a fresh short prompt (eager: contiguous SDPA)
        SeqSpec(private=128, q_len=128, segments=((16, 0),)),
    ]
    for spec in cases:
        batch = build_batch(cfg, pool, alloc, [spec])
        s = batch.seqs[0]
        k0, v0 = pool.k_slots.clone(), pool.v_slots.clone()
        want = model.forward(batch, be)
        k_eager, v_eager = pool.k_slots.clone(), pool.v_slots.clone()
        pool.k_slots.copy_(k0)
        pool.v_slots.copy_(v0)
        bucket = runner.prepare(batch)
        assert bucket is not None and bucket.n >= spec.q_len
        got = runner.replay(bucket, 1).clone()
        assert _close(got, want), (spec, (got - want).abs().max().item())
        assert got.argmax(-1).item() == want.argmax(-1).item()
        new = torch.zeros(pool.k_slots.shape[0], dtype=torch.bool, device="cuda")
        new[s.new_slots.flatten()] = True
        assert torch.equal(pool.k_slots[~new], k0[~new]) and torch.equal(pool.v_slots[~new], v0[~new])
        assert _close(pool.k_slots[new].float(), k_eager[new].float())
        assert _close(pool.v_slots[new].float(), v_eager[new].float())
    # not graphed: two sequences, a step larger than the largest bucket, a non-page-aligned segment
    for specs in (
        [SeqSpec(private=20, q_len=20), SeqSpec(private=9, q_len=9)],
        [SeqSpec(private=129, q_len=129)],
        [SeqSpec(private=10, q_len=10, segments=((37, 0),))],
    ):
        assert runner.prepare(build_batch(cfg, pool, alloc, specs)) is None


@gpu
@pytest.mark.gpu
def test_gpu_runner_question_prefill_graph_pages_and_refcounts():
    """Through `KVRunner.forward` (what the engine and the RAG bench call): a naive-reuse question
    prefill replays a prefill graph, gives the eager logits, and leaves pages, refcounts and the pool
    exactly as the eager step does; shared chunk pages are never written."""
    from redknot_rag.batch import ForwardBatch
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import LoadedModel
    from redknot_rag.rag.chunk_prefill import ChunkPrefiller
    from redknot_rag.reuse import ReuseInput, relocate
    from redknot_rag.sampling import SamplingParams

    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=2, vocab=512)
    torch.manual_seed(0)
    loaded = LoadedModel(
        cfg, random_weights(cfg, torch.bfloat16, "cuda"), StubTokenizer(), "tiny-random", "random:tiny"
    )
    e = Engine(
        EngineConfig(device="cuda", dtype="bfloat16", attention_backend="flashinfer", mem_fraction=0.02), loaded=loaded
    )
    r = e.runner
    g = torch.Generator().manual_seed(0)
    anchor = torch.randint(10, 500, (32,), generator=g).tolist()
    chunks = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (128, 64, 256)]
    pf = ChunkPrefiller(r, anchor)
    segs = [r.write_segment(k, v) for k, v in pf.prefill(chunks)]
    shared = torch.cat([s.pages.flatten() for s in [pf.anchor, *segs]]).to("cuda")
    before_free = r.allocator.num_free
    for q_len in (64, 23, 100):
        question = torch.randint(10, 500, (q_len,), generator=g).tolist()
        inp = ReuseInput(anchor, pf.anchor, chunks, segs, question)
        res = {}
        for graphs in (False, True):
            r.prefill_graphs = graphs
            k0, v0 = r.pool.k.clone(), r.pool.v.clone()
            kv = relocate(r, inp)
            n_ctx = kv.num_tokens
            pos = torch.arange(n_ctx, n_ctx + q_len)
            slots = r.append(kv, pos)
            batch = ForwardBatch(torch.tensor(question), pos, [kv.slice(0, q_len, slots)], torch.tensor([q_len - 1]))
            replays = r.prefill_graph_replays
            logits = r.forward(batch).clone()
            assert (r.prefill_graph_replays == replays + 1) == graphs
            res[graphs] = (logits, r.allocator.refcount.copy(), r.allocator.num_free, slots.clone())
            assert torch.equal(r.pool.k[shared], k0[shared]) and torch.equal(r.pool.v[shared], v0[shared])
            r.release(kv)
            assert r.allocator.num_free == before_free
        (le, rce, fe, se), (lg, rcg, fg, sg) = res[False], res[True]
        assert _close(lg, le), (q_len, (lg - le).abs().max().item())
        # the same pages in use with the same counts (which page a token got depends on the free list's order)
        assert (rce == rcg).all() and fe == fg and torch.equal((se // 16).unique(), (sg // 16).unique())
    # and through the engine's scheduler: a short prompt's prefill step replays a graph, tokens as eager
    # (graphs first: the decode graphs are then captured right after a prefill graph was installed)
    outs = {}
    for graphs in (True, False):
        r.prefill_graphs = graphs
        replays = r.prefill_graph_replays
        outs[graphs] = [q.output_ids for q in e.generate([anchor + chunks[1]], SamplingParams(max_new_tokens=8))]
        assert (r.prefill_graph_replays > replays) == graphs
    assert outs[True][0][0] == outs[False][0][0]
    for s in [*segs, pf.anchor]:
        r.drop_segment(s)
