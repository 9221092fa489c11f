"""Position-independent reuse on the real default model: relocation is exact, recompute is exact,
shared pages are never written, and pages are returned."""

from __future__ import annotations

import pytest
import torch

from redknot_rag.chat import ChatFormat, encode
from redknot_rag.chunkkv import ChunkPrefiller, write_segment
from redknot_rag.reuse import ReuseInput, make_policy, relocate
from redknot_rag.sampling import SamplingParams

TEXTS = [
    "The lighthouse on Varn Island was built in 1887 and painted red in 1902.\n\n",
    "Copper kettles were traded along the river for salt, wool and dried fish.\n\n",
    "The access code for the Dorbrecht archive is 4578. Visitors must sign the ledger.\n\n",
]


@pytest.fixture(scope="module")
def setup(engine):
    tok = engine.tokenizer
    free_before = engine.allocator.num_free  # other modules' services may hold pages of this engine
    anchor = encode(tok, ChatFormat.from_tokenizer(tok).prefix)
    pf = ChunkPrefiller(engine, anchor)
    chunks = [encode(tok, t) for t in TEXTS]
    segs = [write_segment(engine.pool, engine.allocator, k, v) for k, v in pf.prefill(chunks)]
    q = encode(
        tok, "Question: What is the access code for the Dorbrecht archive?" + ChatFormat.from_tokenizer(tok).suffix
    )
    yield engine, pf, anchor, chunks, segs, q
    for s in segs:
        engine.allocator.decref(s.pages.numpy())
    engine.allocator.decref(pf.anchor.segment.pages.numpy())
    assert engine.allocator.num_free == free_before


def _forward(engine, kv, ids, pos):
    return engine.append_forward(kv, ids, pos, logits=True)[0]


def _new(engine):
    return engine.new_seq_kv()


@pytest.mark.parametrize("offset", [0, 700])
def test_relocation_is_exact(setup, offset):
    """A chunk's stored KV (computed behind the anchor at positions from 0) reused at offset p gives the
    logits of the same tokens prefilled at offset p."""
    engine, pf, anchor, chunks, segs, q = setup
    a, c = len(anchor), chunks[2]
    reused = _new(engine)
    direct = _new(engine)
    try:
        reused.attach(pf.anchor.segment, torch.arange(offset, offset + a), engine.allocator)
        reused.attach(segs[2], torch.arange(offset + a, offset + a + len(c)), engine.allocator)
        pos_q = torch.arange(offset + a + len(c), offset + a + len(c) + len(q))
        got = _forward(engine, reused, q, pos_q)
        ids = anchor + c + q
        ref = _forward(engine, direct, ids, torch.arange(offset, offset + len(ids)))[-len(q) :]
        diff = (got - ref).abs().max().item()
        print(f"offset {offset}: max |logit diff| {diff:.2e}")
        assert diff < 1e-4
    finally:
        reused.release(engine.allocator)
        direct.release(engine.allocator)


def _snapshot(engine, segs):
    return [
        (
            engine.pool.k_slots[s.slots(engine.config.page_size)].clone(),
            engine.pool.v_slots[s.slots(engine.config.page_size)].clone(),
        )
        for s in segs
    ]


def _first_logits(engine, prompt, asm):
    kw = {}
    if asm.kv is not None:
        kw = dict(prebuilt_kv=asm.kv, prebuilt_len=asm.context_len, reused_tokens=asm.reused_tokens)
    req = engine.make_request(prompt, SamplingParams(max_new_tokens=1), keep_first_logits=True, **kw)
    engine.submit(req)
    while not req.is_finished:
        engine.step()
    return req


@pytest.mark.parametrize("policy", ["naive", "epic:8", "cacheblend:0.2", "redknot:0.2", "epic:100000"])
def test_policies_never_write_shared_pages_and_full_recompute_is_exact(setup, policy):
    engine, pf, anchor, chunks, segs, q = setup
    inp = ReuseInput(anchor, pf.anchor.segment, chunks, segs, q)
    prompt = inp.context_ids + q
    before = _snapshot(engine, segs + [pf.anchor.segment])
    full = _first_logits(engine, prompt, make_policy("full", engine).assemble(engine, inp))
    asm = make_policy(policy, engine).assemble(engine, inp)
    req = _first_logits(engine, prompt, asm)
    after = _snapshot(engine, segs + [pf.anchor.segment])
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(before, after))
    assert req.cached_tokens == asm.reused_tokens
    kl = (
        (
            full.first_logits.log_softmax(-1).exp()
            * (full.first_logits.log_softmax(-1) - req.first_logits.log_softmax(-1))
        )
        .sum()
        .item()
    )
    print(f"{policy}: reused {asm.reused_tokens}, recomputed {asm.recomputed_tokens}, first-token KL {kl:.4f}")
    if policy == "epic:100000":  # everything recomputed in place: must equal full prefill
        assert asm.reused_tokens == 0
        assert (full.first_logits - req.first_logits).abs().max().item() < 1e-3
    assert kl < 1.0


def test_probe_truncate_returns_pages(setup):
    engine, pf, anchor, chunks, segs, q = setup
    free = engine.allocator.num_free
    kv = relocate(engine, ReuseInput(anchor, pf.anchor.segment, chunks, segs, q))
    n = kv.num_tokens
    kv.append(torch.arange(n, n + 40), engine.allocator)
    kv.truncate(n, engine.allocator)
    assert kv.num_tokens == n
    kv.release(engine.allocator)
    assert engine.allocator.num_free == free
