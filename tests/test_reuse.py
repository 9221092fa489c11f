"""Position-independent reuse on the real default model: relocation is exact, recompute is exact,
shared pages are never written, and pages are returned."""

from __future__ import annotations

import pytest
import torch

from redknot_rag.chat import ChatFormat, encode
from redknot_rag.rag.chunk_prefill import ChunkPrefiller
from redknot_rag.rag.layout import PromptLayout
from redknot_rag.request import ReusedContext
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
    runner = engine.runner
    free_before = runner.free_pages  # other modules' services may hold pages of this engine
    layout = PromptLayout.for_tokenizer(tok)
    anchor = list(layout.anchor_ids)
    assert anchor == encode(tok, ChatFormat.from_tokenizer(tok).prefix)
    pf = ChunkPrefiller(runner, layout.anchor_ids)
    chunks = [encode(tok, t) for t in TEXTS]
    segs = [runner.write_segment(k, v) for k, v in pf.prefill(chunks)]
    q = encode(
        tok, "Question: What is the access code for the Dorbrecht archive?" + ChatFormat.from_tokenizer(tok).suffix
    )
    yield engine, pf, anchor, chunks, segs, q
    pages = torch.cat([s.pages.flatten() for s in segs])
    for s in segs:
        runner.drop_segment(s)
    pf.close()
    # this module's segments are gone; other modules' services sharing the session engine may only have
    # given pages back meanwhile (their caches evict when this module's sequences need room)
    assert int(runner.allocator.refcount[pages.numpy()].sum()) == 0
    assert runner.free_pages >= free_before


def _forward(engine, kv, ids, pos):
    return engine.runner.append_forward(kv, ids, pos, logits=True).logits


def _new(engine):
    return engine.runner.new_seq_kv()


@pytest.mark.parametrize("offset", [0, 700])
def test_relocation_is_exact(setup, offset):
    """A chunk's stored KV (computed behind the anchor at positions from 0) reused at offset p gives the
    logits of the same tokens prefilled at offset p."""
    engine, pf, anchor, chunks, segs, q = setup
    a, c = len(anchor), chunks[2]
    reused = _new(engine)
    direct = _new(engine)
    try:
        engine.runner.attach(reused, pf.anchor, torch.arange(offset, offset + a))
        engine.runner.attach(reused, segs[2], torch.arange(offset + a, offset + a + len(c)))
        pos_q = torch.arange(offset + a + len(c), offset + a + len(c) + len(q))
        got = _forward(engine, reused, q, pos_q)
        ids = anchor + c + q
        ref = _forward(engine, direct, ids, torch.arange(offset, offset + len(ids)))[-len(q) :]
        diff = (got - ref).abs().max().item()
        print(f"offset {offset}: max |logit diff| {diff:.2e}")
        # exact in real arithmetic (attention depends on relative positions only); fp32 rounding of the
        # rotation angles differs between absolute positions, ~1e-4 on logits of magnitude ~20 at 700
        assert diff < 5e-4
    finally:
        engine.runner.release(reused)
        engine.runner.release(direct)


def _snapshot(engine, segs):
    return [
        (
            engine.runner.pool.k_slots[s.slots(engine.config.page_size)].clone(),
            engine.runner.pool.v_slots[s.slots(engine.config.page_size)].clone(),
        )
        for s in segs
    ]


def _first_logits(engine, prompt, asm):
    """Run the request; returns (request, first sampled position's logits `[vocab]`)."""
    req = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
    if asm.kv is not None:
        req.reuse = ReusedContext(asm.kv, asm.context_len, asm.reused_tokens, asm.recomputed_tokens, "test")
    seen = []
    req.logits_processor = lambda r, logits: seen.append(logits.clone()) or logits
    engine.submit(req)
    while not req.is_finished:
        engine.step()
    return req, seen[0]


@pytest.mark.parametrize(
    "policy", ["naive", "epic:8", "cacheblend:0.2", "redknot:0.2", "epic:100000", "ape:0.8", "ape:1.2:redknot:0.2"]
)
def test_policies_never_write_shared_pages_and_full_recompute_is_exact(setup, policy):
    engine, pf, anchor, chunks, segs, q = setup
    runner = engine.runner
    inp = ReuseInput(anchor, pf.anchor, chunks, segs, q)
    prompt = inp.context_ids + q
    before = _snapshot(engine, segs + [pf.anchor])
    _, full = _first_logits(engine, prompt, make_policy("full").assemble(runner, inp))
    asm = make_policy(policy).assemble(runner, inp)
    req, got = _first_logits(engine, prompt, asm)
    after = _snapshot(engine, segs + [pf.anchor])
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(before, after))
    assert req.cached_tokens == asm.reused_tokens
    kl = (full.log_softmax(-1).exp() * (full.log_softmax(-1) - got.log_softmax(-1))).sum().item()
    print(f"{policy}: reused {asm.reused_tokens}, recomputed {asm.recomputed_tokens}, first-token KL {kl:.4f}")
    if policy == "epic:100000":  # everything recomputed in place: must equal full prefill
        assert asm.reused_tokens == 0
        assert (full - got).abs().max().item() < 1e-3
    assert kl < 1.0


def test_probe_truncate_returns_pages(setup):
    engine, pf, anchor, chunks, segs, q = setup
    runner = engine.runner
    free = runner.free_pages
    kv = relocate(runner, ReuseInput(anchor, pf.anchor, chunks, segs, q))
    n = kv.num_tokens
    runner.append(kv, torch.arange(n, n + 40))
    runner.truncate(kv, n)
    assert kv.num_tokens == n
    runner.release(kv)
    assert runner.free_pages == free


@pytest.mark.parametrize("policy", ["epic:8", "redknot:0.2", "epic:100000", "ape:0.8:redknot:0.2"])
def test_recompute_in_one_forward_with_the_question_equals_two_passes(setup, policy):
    """Deferred recompute (the selected tokens recomputed in the engine's first forward, together with the
    question) gives the logits of recomputing first and prefilling the question after; shared pages stay
    untouched and every page comes back."""
    engine, pf, anchor, chunks, segs, q = setup
    runner = engine.runner
    free = runner.free_pages
    inp = ReuseInput(anchor, pf.anchor, chunks, segs, q)
    prompt = inp.context_ids + q
    before = _snapshot(engine, segs + [pf.anchor])
    two = make_policy(policy).assemble(runner, inp)
    _, ref = _first_logits(engine, prompt, two)
    one = make_policy(policy).assemble(runner, inp, defer_recompute=True)
    assert one.deferred and torch.equal(one.recomputed_index, two.recomputed_index)
    req = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
    req.reuse = ReusedContext(one.kv, one.context_len, one.reused_tokens, one.recomputed_tokens, policy)
    req.reuse.pending = one.recomputed_index
    seen = []
    req.logits_processor = lambda r, logits: seen.append(logits.clone()) or logits
    engine.submit(req)
    engine.step()  # the first step recomputes the pending tokens and prefills the question
    assert req.reuse.pending is None and req.output_ids
    while not req.is_finished:
        engine.step()
    diff = (seen[0] - ref).abs().max().item()
    print(f"{policy}: one forward vs two passes, max |first-token logit diff| {diff:.2e}")
    assert diff < 1e-3
    after = _snapshot(engine, segs + [pf.anchor])
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(before, after))
    assert runner.free_pages == free
