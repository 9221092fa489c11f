"""The recompute-budget frontier and its oracles (issue 22) on the random tiny-gqa model (fp32 CPU):
- every frontier family recomputes its budget of chunk tokens; at 0 it is naive (selects nothing) and at 1
  it is full prefill (logits equal), which is why the report fills those endpoints in by construction;
- `redknot-chunks` recomputes whole chunks in the probe's order; the oracles are never servable by name,
  recompute the chunks they say and reorder the answer chunk;
- the case generators know the answer chunk;
- the default rule: smallest qualifying budget, never worse than naive, and a report (table, JSON, plot) that
  is written when nothing qualifies."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import alternating_profile

from redknot_rag.evaluation.harness import (
    Record,
    choose_default,
    format_oracle_table,
    format_table,
    frontier_policies,
    plot_frontier,
    report,
)
from redknot_rag.evaluation.reuse_oracles import OracleSelectPolicy, RecomputeChunksPolicy, oracle_arm
from redknot_rag.request import ReusedContext
from redknot_rag.reuse import ReuseInput, make_policy, relocate
from redknot_rag.sampling import SamplingParams

TEXTS = [
    "The lighthouse on Varn Island was built in 1887 and painted red in 1902 by the harbour guild.\n\n",
    "Copper kettles were traded along the river for salt, wool and dried fish every spring.\n\n",
    "The access code for the Dorbrecht archive is 4578. Visitors must sign the ledger first.\n\n",
]


@pytest.fixture(scope="module")
def tiny():
    from redknot_rag.chat import ChatFormat, encode
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.rag.chunk_prefill import ChunkPrefiller
    from redknot_rag.rag.layout import PromptLayout

    engine = Engine(EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.02))
    tok, runner = engine.tokenizer, engine.runner
    layout = PromptLayout.for_tokenizer(tok)
    pf = ChunkPrefiller(runner, layout.anchor_ids)
    chunks = [encode(tok, t) for t in TEXTS]
    segs = [runner.write_segment(k, v) for k, v in pf.prefill(chunks)]
    q = encode(tok, "Question: What is the access code?" + ChatFormat.from_tokenizer(tok).suffix)
    inp = ReuseInput(list(layout.anchor_ids), pf.anchor, chunks, segs, q)
    yield engine, inp
    for s in segs:
        runner.drop_segment(s)
    pf.close()


def _first_logits(engine, inp, asm) -> torch.Tensor:
    req = engine.make_request(inp.context_ids + inp.question_ids, SamplingParams(max_new_tokens=1))
    if asm.kv is not None:
        req.reuse = ReusedContext(asm.kv, asm.context_len, asm.reused_tokens, asm.recomputed_tokens, "test")
    seen: list[torch.Tensor] = []
    req.logits_processor = lambda r, logits: seen.append(logits.clone()) or logits
    engine.submit(req)
    while not req.is_finished:
        engine.step()
    return seen[0]


FAMILIES = ["redknot", "cacheblend", "epic", "redknot-chunks", "redknot-dense"]


def _policy(name, runner):
    return make_policy(name, alternating_profile(runner))


def test_frontier_endpoints_are_naive_and_full(tiny):
    engine, inp = tiny
    runner = engine.runner
    full = _first_logits(engine, inp, make_policy("full").assemble(runner, inp))
    naive = _first_logits(engine, inp, make_policy("naive").assemble(runner, inp))
    assert (full - naive).abs().max().item() > 1e-2  # reuse differs here: the checks below can fail
    n_chunk = sum(map(len, inp.chunk_ids))
    assert frontier_policies(FAMILIES, (0.0, 1.0)) == []  # the report fills these in (frontier_aliases)
    for fam_name in ("redknot:{b}:0", "cacheblend:{b}", "epic-frac:{b}", "redknot-chunks:{b}", "redknot-dense:{b}:0"):
        zero = _policy(fam_name.format(b=0.0), runner).assemble(runner, inp)
        assert zero.recomputed_tokens == 0, fam_name
        assert torch.equal(_first_logits(engine, inp, zero), naive), fam_name
        one = _policy(fam_name.format(b=1.0), runner).assemble(runner, inp)
        assert one.recomputed_tokens == n_chunk, fam_name
        diff = (_first_logits(engine, inp, one) - full).abs().max().item()
        assert diff < 1e-4, (fam_name, diff)
    one = OracleSelectPolicy(1.0).assemble(runner, inp)
    assert one.recomputed_tokens == n_chunk
    assert (_first_logits(engine, inp, one) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["redknot:0.3:0", "cacheblend:0.3", "epic-frac:0.3", "redknot-chunks:0.3"])
def test_frontier_policies_recompute_their_budget(tiny, name):
    engine, inp = tiny
    runner = engine.runner
    asm = _policy(name, runner).assemble(runner, inp)
    try:
        n_chunk = sum(map(len, inp.chunk_ids))
        # epic rounds per chunk; the others round once
        assert abs(asm.recomputed_tokens - 0.3 * n_chunk) <= len(inp.chunk_ids), (asm.recomputed_tokens, n_chunk)
        assert int(asm.recomputed_index.min()) >= len(inp.anchor_ids)  # the anchor is never recomputed
    finally:
        runner.release(asm.kv)


def test_chunk_policy_recomputes_whole_chunks_in_probe_order(tiny):
    engine, inp = tiny
    runner = engine.runner
    spans = inp.chunk_spans()
    sizes = [e - s for s, e in spans]
    n_chunk = sum(sizes)
    pol = _policy("redknot-chunks:0.5", runner)
    kv = relocate(runner, inp)
    try:
        score = pol.question_scores(runner, inp, kv)
        mass = [float(score[s:e].sum()) for s, e in spans]
        idx = set(pol.select(runner, inp, kv).tolist())
    finally:
        runner.release(kv)
    order = sorted(range(len(spans)), key=lambda i: -mass[i])
    budget = round(0.5 * n_chunk)
    expect: set[int] = set()
    for i in order:  # whole chunks while they fit, then a prefix of the next
        take = min(budget, sizes[i])
        expect |= set(range(spans[i][0], spans[i][0] + take))
        budget -= take
        if budget == 0:
            break
    assert idx == expect
    top = order[0]
    assert set(range(*spans[top])) <= idx  # the top-ranked chunk is recomputed whole


def test_oracles_are_not_servable_and_do_what_they_say(tiny):
    engine, inp = tiny
    runner = engine.runner
    for name in ("oracle:select:0.1", "oracle:answer-chunk", "oracle-select:0.1", "oracle-chunks"):
        with pytest.raises(ValueError):
            make_policy(name)
    cache: dict = {}
    arm = oracle_arm("oracle:answer-chunk", 3, (2,), cache)
    assert isinstance(arm.policy, RecomputeChunksPolicy) and arm.policy.chunks == (2,) and arm.order == (0, 1, 2)
    arm = oracle_arm("oracle:other-chunks", 3, (2,), cache)
    assert isinstance(arm.policy, RecomputeChunksPolicy) and arm.policy.chunks == (0, 1)
    assert oracle_arm("oracle:first:naive", 4, (2,), cache).order == (2, 0, 1, 3)
    assert oracle_arm("oracle:last:full", 4, (0, 2), cache).order == (1, 3, 0, 2)
    for bad in ("oracle:answer-chunk", "oracle:last:naive"):
        with pytest.raises(ValueError):
            oracle_arm(bad, 3, (), cache)  # a case that does not know its answer chunk
    with pytest.raises(ValueError):
        oracle_arm("oracle:last:cacheblend:0.1", 3, (1,), cache)
    spans = inp.chunk_spans()
    asm = RecomputeChunksPolicy((2,)).assemble(runner, inp)
    assert asm.recomputed_index.tolist() == list(range(*spans[2]))
    runner.release(asm.kv)
    # the oracle selector ranks by true deviation: the first chunk sits right behind the anchor where it
    # was prefilled, so (nearly) exact; later chunks deviate. The top tokens never come from chunk 0's span.
    sel = OracleSelectPolicy(0.1, cache)
    asm = sel.assemble(runner, inp)
    assert asm.recomputed_tokens == round(0.1 * sum(e - s for s, e in spans))
    assert int(asm.recomputed_index.min()) >= spans[1][0]
    assert len(cache) == 1  # the ranking is kept for the other budgets of the same case
    runner.release(asm.kv)


def test_case_generators_know_the_answer_chunk(tiny):
    engine, _ = tiny
    from redknot_rag.evaluation.harness import fact_cases, planted_cases
    from redknot_rag.evaluation.planted_facts import make_planted_cases

    cases = planted_cases(6, seed=3, tokenizer=engine.tokenizer)
    facts = {c.case_id: c.fact_sentence for c in make_planted_cases(2 * 6 + 8, seed=3, num_distractors=3)}
    assert cases
    for c in cases:
        (i,) = c.answer_chunks
        assert facts[c.case_id] in c.chunks[i]
        assert all(facts[c.case_id] not in t for j, t in enumerate(c.chunks) if j != i)
    for c in fact_cases(6, seed=3):
        assert c.answer_chunks and all(0 <= i < len(c.chunks) for i in c.answer_chunks)


def _p(diff, lo, frac, kl=0.1):
    return {
        "accuracy": 0.5 + diff,
        "accuracy_diff": diff,
        "accuracy_diff_ci95": [lo, diff + 0.05],
        "recompute_fraction": frac,
        "first_token_kl": kl,
    }


def test_default_rule():
    pols = {
        "full": _p(0.0, 0.0, 1.0, 0.0),
        "naive": _p(-0.10, -0.2, 0.0),
        "redknot:0.1:0": _p(-0.015, -0.06, 0.1),  # within 2 points but the CI reaches below -4
        "redknot:0.2:0": _p(-0.01, -0.03, 0.2),  # qualifies
        "redknot:0.3:0": _p(0.0, -0.02, 0.3),  # qualifies, larger budget
        "oracle:select:0.05": _p(0.0, -0.01, 0.05),  # an oracle never becomes the default
        "redknot:1.0:0": {**_p(0.0, 0.0, 1.0), "alias_of": "full"},
    }
    c = choose_default(pols)
    assert c.policy == "redknot:0.2:0" and c.is_qualified and c.shortfall == 0.0
    pols["naive"] = _p(0.0, -0.02, 0.0)  # naive as good as full: nothing worse than naive may qualify
    assert choose_default(pols).policy == "naive"
    del pols["redknot:0.2:0"], pols["redknot:0.3:0"]
    pols["naive"] = _p(-0.10, -0.2, 0.0)
    c = choose_default(pols)
    assert c.policy is None and not c.is_qualified
    assert c.closest == "redknot:0.1:0" and c.shortfall == pytest.approx(0.02, abs=1e-6)


def _rec(case, policy, correct, frac):
    return Record(case, "facts", policy, correct, 0.0 if policy == "full" else 0.2, 1.0, frac, 100, 10.0, 1, 1, "")


def test_report_is_written_when_nothing_qualifies(tmp_path):
    recs = []
    for i in range(20):
        recs += [
            _rec(f"c{i}", "full", True, 100),
            _rec(f"c{i}", "naive", i % 2 == 0, 0),
            _rec(f"c{i}", "redknot:0.1:0", i % 3 != 0, 10),
            _rec(f"c{i}", "oracle:select:0.1", i % 4 != 0, 10),
            _rec(f"c{i}", "oracle:answer-chunk", True, 25),
        ]
    res = report(recs, {"model": "m", "device": "cpu"}, ["redknot", "oracle-select"])
    assert res["default_policy"] is None and not res["default_choice"]["qualified"]
    assert res["default_choice"]["closest"] == "redknot:0.1:0"
    assert set(res["oracles"]) == {"oracle:select:0.1", "oracle:answer-chunk", "oracle:select:0.0", "oracle:select:1.0"}
    assert res["policies"]["redknot:0.0:0"]["alias_of"] == "naive"
    assert res["policies"]["redknot:1.0:0"]["alias_of"] == "full"
    assert "oracle:select:0.1" not in res["policies"]
    for key in ("accuracy", "accuracy_diff", "accuracy_diff_ci95", "first_token_kl", "agreement_32"):
        assert key in res["oracles"]["oracle:answer-chunk"]
    json.dumps(res)
    table, oracles = format_table(res), format_oracle_table(res)
    assert "closest; does not qualify" in table and "(= naive, by construction)" in table
    assert "oracle:answer-chunk" in oracles and "oracle:answer-chunk" not in table
    plot_frontier(res, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
