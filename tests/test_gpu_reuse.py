"""Reuse on the GPU through the engine (FlashInfer backend, tiny random bf16 model): 1,000 reused
requests leave the pool as they found it, and shared chunk pages are never written."""

from __future__ import annotations

import pytest
import torch
from kernel_fixtures import StubTokenizer, random_weights, tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_engine():
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import LoadedModel

    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=2, vocab=512)
    torch.manual_seed(0)
    w = random_weights(cfg, torch.bfloat16, "cuda")
    loaded = LoadedModel(cfg, w, StubTokenizer(), "tiny-random", "random:tiny")
    return Engine(
        EngineConfig(device="cuda", dtype="bfloat16", attention_backend="flashinfer", mem_fraction=0.02),
        loaded=loaded,
    )


def test_gpu_thousand_reused_requests_free_pages(gpu_engine):
    from redknot_rag.rag.chunk_prefill import ChunkPrefiller
    from redknot_rag.request import ReusedContext
    from redknot_rag.reuse import ReuseInput, make_policy
    from redknot_rag.sampling import SamplingParams

    e = gpu_engine
    r = e.runner
    g = torch.Generator().manual_seed(0)
    anchor = torch.randint(10, 500, (32,), generator=g).tolist()
    chunks = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (100, 64, 37, 200)]
    before = r.allocator.num_free
    pf = ChunkPrefiller(r, anchor)
    segs = [r.write_segment(k, v) for k, v in pf.prefill(chunks)]
    shared = torch.cat([s.pages.flatten() for s in [pf.anchor, *segs]]).to("cuda")
    k0, v0 = r.pool.k[shared].clone(), r.pool.v[shared].clone()
    held = r.allocator.num_free
    policies = [make_policy(n) for n in ("naive", "epic:4", "redknot-dense:0.1", "full")]
    paths: set[str] = set()
    for i in range(1000):
        pick = [j for j in range(4) if (i >> j) & 1] or [i % 4]
        q = torch.randint(10, 500, (1 + i % 9,), generator=g).tolist()
        inp = ReuseInput(anchor, pf.anchor, [chunks[j] for j in pick], [segs[j] for j in pick], q)
        asm = policies[i % 4].assemble(r, inp)
        prompt = inp.context_ids + q
        req = e.make_request(prompt, SamplingParams(max_new_tokens=1 + i % 2, ignore_eos=True))
        if asm.kv is not None:
            pol = policies[i % 4].name
            req.reuse = ReusedContext(asm.kv, asm.context_len, asm.reused_tokens, asm.recomputed_tokens, pol)
        e.submit(req)
        while not req.is_finished:
            e.step()
        assert req.error is None, req.error
        paths.add(r.backend.path)
    assert r.allocator.num_free == held, "pages leaked by reused requests"
    assert torch.equal(r.pool.k[shared], k0) and torch.equal(r.pool.v[shared], v0), "a shared page was written"
    print("backend paths seen:", sorted(paths))
    assert any("flashinfer" in p for p in paths)
    for s in [*segs, pf.anchor]:
        r.drop_segment(s)
    assert r.allocator.num_free == before


def test_gpu_engine_decode_uses_cuda_graphs(gpu_engine):
    """Decode-only steps replay the runner's CUDA graphs and give the eager tokens (greedy, bf16)."""
    from redknot_rag.sampling import SamplingParams

    e, r = gpu_engine, gpu_engine.runner
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (64, 100, 7)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    outs = {}
    for mode in (False, True):
        r.cuda_graphs = mode
        before = r.graph_replays
        outs[mode] = [q.output_ids for q in e.generate(prompts, params)]
        assert (r.graph_replays > before) == mode
    r.cuda_graphs = True
    same = sum(a == b for x, y in zip(outs[False], outs[True]) for a, b in zip(x, y))
    assert same >= 0.9 * 3 * 16, (outs, same)
