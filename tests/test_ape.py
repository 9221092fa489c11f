"""APE-style attention temperature on reused spans (`ape:T[:base]`), on the random tiny-gqa model (fp32 CPU):
the policy grammar, T=1 is its base bit for bit, the selection is the base's and deterministic, shared pages
are never written, and the question's layer-0 attention logits over reused chunk tokens are exactly the
base's divided by T (computed by hand from the captured query and the pool's K)."""

from __future__ import annotations

import pytest
import torch

from redknot_rag.attention.probe import ProbeBackend
from redknot_rag.reuse import ApePolicy, NaivePolicy, RedKnotPolicy, ReuseInput, make_policy

TEXTS = [
    "The lighthouse on Varn Island was built in 1887 and painted red in 1902.",
    "Copper kettles were traded along the river for salt, wool and dried fish.",
    "The access code for the Dorbrecht archive is 4578. Visitors must sign the ledger.",
]


@pytest.fixture(scope="module")
def tiny():
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.rag.chunk_prefill import ChunkPrefiller
    from redknot_rag.rag.layout import PromptLayout

    engine = Engine(EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.02))
    runner = engine.runner
    layout = PromptLayout.for_tokenizer(engine.tokenizer)
    pf = ChunkPrefiller(runner, layout.anchor_ids)
    chunks = [layout.chunk_ids(t) for t in TEXTS]
    segs = [runner.write_segment(k, v) for k, v in pf.prefill(chunks)]
    q = layout.question_ids("What is the access code for the Dorbrecht archive?")
    inp = ReuseInput(list(layout.anchor_ids), pf.anchor, chunks, segs, q)
    yield engine, inp
    for s in segs:
        runner.drop_segment(s)
    pf.close()


def test_policy_grammar():
    pol = make_policy("ape:0.9")
    assert isinstance(pol, ApePolicy) and pol.temperature == 0.9 and isinstance(pol.base, NaivePolicy)
    pol = make_policy("ape:1.1:redknot:0.05:4")
    assert isinstance(pol, ApePolicy) and isinstance(pol.base, RedKnotPolicy)
    assert pol.base.ratio == 0.05 and pol.base.head_tokens == 4
    for bad in ("ape", "ape:", "ape:x", "ape:0", "ape:-1", "ape:nan", "ape:9", "ape:0.9:full", "ape:0.9:ape:1.1"):
        with pytest.raises(ValueError, match="reuse policy"):
            make_policy(bad)
    with pytest.raises(ValueError, match="unknown reuse policy"):
        make_policy("ape:0.9:bogus")


def _logits(engine, kv, q):
    """Question logits `[len(q), vocab]` over the assembled `kv` (the question KV is dropped again)."""
    n = kv.num_tokens
    try:
        return engine.runner.append_forward(kv, q, torch.arange(n, n + len(q)), logits=True).logits
    finally:
        engine.runner.truncate(kv, n)


def _pages(engine, inp):
    pool, ps = engine.runner.pool, engine.config.page_size
    return [(pool.k_slots[s.slots(ps)].clone(), pool.v_slots[s.slots(ps)].clone()) for s in [inp.anchor, *inp.chunks]]


@pytest.mark.parametrize("base", ["naive", "redknot:0.3"])
def test_temperature_one_is_the_base_bit_for_bit(tiny, base):
    engine, inp = tiny
    runner = engine.runner
    ref, got = make_policy(base).assemble(runner, inp), make_policy(f"ape:1:{base}").assemble(runner, inp)
    try:
        assert torch.equal(ref.recomputed_index, got.recomputed_index)
        assert torch.equal(_logits(engine, ref.kv, inp.question_ids), _logits(engine, got.kv, inp.question_ids))
    finally:
        runner.release(ref.kv)
        runner.release(got.kv)


def test_selection_is_the_base_selection_and_deterministic(tiny):
    engine, inp = tiny
    runner = engine.runner
    free = runner.free_pages
    seen = []
    for name in ("redknot:0.3", "ape:0.8:redknot:0.3", "ape:0.8:redknot:0.3"):
        asm = make_policy(name).assemble(runner, inp, defer_recompute=True)
        seen.append(asm.recomputed_index)
        runner.release(asm.kv)
    assert seen[0].numel() > 0 and all(torch.equal(seen[0], s) for s in seen[1:])
    assert runner.free_pages == free


class _CaptureQ(ProbeBackend):
    """The probe backend that also keeps layer 0's pre-RoPE queries of the probed slice `[Tq, Hq, D]`."""

    def run(self, layer, q):
        if layer == 0 and self._slice is not None:
            s = self._slice
            self.q0 = q[s.q_start : s.q_start + s.q_len].float().clone()
            self.kv0 = (s.kv_slots[0].clone(), s.kv_pos.clone())  # [Hkv, T] slots, [T] positions
        return super().run(layer, q)


def _layer0_scores(engine, kv, q):
    """Layer-0 attention logits of the question over the context and itself, by hand from the captured
    queries and the pool's K: `[Hkv, g, Tq, T_ctx + Tq]`, the causal mask `[Tq, T_ctx + Tq]`, and the
    probe's recorded layer-0 attention mass `[Hkv, T_ctx + Tq]` (what the backend computed)."""
    runner = engine.runner
    cfg = runner.model_config
    probe = _CaptureQ(cfg, runner.pool, runner.rotary, layers=[0])
    n = kv.num_tokens
    try:
        runner.append_forward(kv, q, torch.arange(n, n + len(q)), backend=probe)
        slots, kv_pos = probe.kv0
        rot = runner.rotary.for_layer(0)
        k = rot.apply(runner.pool.k_slots[slots].float(), kv_pos)  # [Hkv, T, D], read before truncating
    finally:
        runner.truncate(kv, n)
    tq, hq, d = probe.q0.shape
    hkv = k.shape[0]
    q_pos = torch.arange(n, n + tq)
    qr = rot.apply(probe.q0.transpose(0, 1), q_pos).view(hkv, hq // hkv, tq, d)  # [Hkv, g, Tq, D]
    scores = torch.einsum("hgqd,htd->hgqt", qr, k) * cfg.attn_scale
    return scores, kv_pos[None, :] <= q_pos[:, None], probe.attn[0]


@pytest.mark.parametrize("temperature", [0.5, 1.25])
def test_reused_logits_are_divided_by_the_temperature(tiny, temperature):
    engine, inp = tiny
    runner = engine.runner
    free = runner.free_pages
    before = _pages(engine, inp)
    base = make_policy("naive").assemble(runner, inp)
    ape = make_policy(f"ape:{temperature}").assemble(runner, inp)
    try:
        ref, mask, _ = _layer0_scores(engine, base.kv, inp.question_ids)
        got, _, mass = _layer0_scores(engine, ape.kv, inp.question_ids)
    finally:
        runner.release(base.kv)
        runner.release(ape.kv)
    a, n = len(inp.anchor_ids), base.context_len
    expect = ref.clone()
    expect[..., a:n] = ref[..., a:n] / temperature  # every chunk token is reused under naive
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[..., a:n], ref[..., a:n])
    assert torch.equal(got[..., :a], ref[..., :a]) and torch.equal(got[..., n:], ref[..., n:])  # anchor, question
    # the backend attended with exactly those logits: its attention mass is softmax(expected logits)
    want = expect.masked_fill(~mask, float("-inf")).softmax(-1).sum(dim=(1, 2))  # [Hkv, T]
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-5)
    after = _pages(engine, inp)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(before, after))
    assert runner.free_pages == free
