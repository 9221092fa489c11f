"""One grammar mask per engine step for the whole batch (`StepGrammarMask`), against the per-request path.

CPU, the default model (as tests/test_grammar.py), greedy: a batch mixing constrained requests (JSON
schema, regex, a choice, EBNF) with unconstrained ones must give the tokens each request gives alone
with the per-request mask.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import xgrammar as xgr

from redknot_rag.chat import chat_prompt_ids
from redknot_rag.engine import Engine
from redknot_rag.engine import driver as engine_driver
from redknot_rag.engine.grammar import Grammar, GrammarBackend
from redknot_rag.request import Request
from redknot_rag.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
CHOICES = ["Amsterdam", "Copenhagen", "Kyoto", "Nairobi", "Quebec City"]
# (prompt, SamplingParams fields); the last two are unconstrained
CASES: list[tuple[str, dict[str, Any]]] = [
    ("Describe a person as JSON.", {"json_schema": json.dumps(SCHEMA)}),
    ("What is your phone number?", {"regex": r"\(\d{3}\) \d{3}-\d{4}"}),
    ("Name a city.", {"regex": "(" + "|".join(CHOICES) + ")"}),
    ("Is the sky blue?", {"ebnf": 'root ::= ("yes" | "no") " because " [a-z ]{3,20} "."'}),
    ("Say hello.", {}),
    ("Count to five.", {"frequency_penalty": 0.5}),
]


def _requests(engine: Engine) -> list[Request]:
    mc = engine.model_config
    backend = GrammarBackend.of(engine.tokenizer, mc.vocab_size, tuple(mc.eos_token_ids))
    reqs = []
    for prompt, fields in CASES:
        p = SamplingParams(**{"max_new_tokens": 24, **fields})
        req = engine.make_request(chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": prompt}]), p)
        g = Grammar.from_params(p)
        if g is not None:
            req.logits_processor = backend.processor(g)
        reqs.append(req)
    return reqs


def _drive(engine: Engine, reqs: list[Request]) -> None:
    for r in reqs:
        engine.submit(r)
    for _ in range(200):
        if all(r.is_finished for r in reqs):
            return
        engine.step()
    raise AssertionError("requests did not finish")


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    """Each request run by itself with the per-request mask (the batch mask switched off)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(engine_driver, "start_grammar_masks", lambda built: None)
    try:
        out = []
        for req in _requests(engine):
            _drive(engine, [req])
            assert req.error is None, req.error
            out.append(req.output_ids)
        return out
    finally:
        mp.undo()


def test_batch_mask_matches_requests_run_alone(engine, alone, monkeypatch):
    """All six requests in the same steps; the mask is filled once per step, in one batch call covering
    exactly the constrained requests that sample in it, and no per-request fill runs."""
    fills: list[int] = []
    batch_fill = xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask

    def spy(self, matchers, bitmask, indices=None, debug_print=False):
        fills.append(len(matchers))
        return batch_fill(self, matchers, bitmask, indices, debug_print)

    def no_single_fill(*a, **k):
        raise AssertionError("a per-request fill ran while the batch mask was on")

    monkeypatch.setattr(xgr.BatchGrammarMatcher, "batch_fill_next_token_bitmask", spy)
    monkeypatch.setattr(xgr.GrammarMatcher, "fill_next_token_bitmask", no_single_fill)
    reqs = _requests(engine)
    for r in reqs:
        engine.submit(r)
    constrained = [r for r in reqs if r.logits_processor is not None]
    steps = 0
    while not all(r.is_finished for r in reqs):
        sampling = [r for r in constrained if not r.is_finished]  # every prompt prefills in the first step
        before = len(fills)
        engine.step()
        steps += 1
        assert len(fills) - before == (1 if sampling else 0), (steps, fills[before:])
        if sampling:
            assert fills[-1] == len(sampling), (steps, fills[-1], len(sampling))
        assert steps < 200
    assert [r.output_ids for r in reqs] == alone
    for r in reqs:
        assert r.error is None and r.finish_reason is not None, (r.error, r.finish_reason)
    texts = [r.output_text for r in reqs]
    assert set(json.loads(texts[0])) == {"name", "age"}
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", texts[1]) and texts[2] in CHOICES, texts
    assert re.fullmatch(r"(yes|no) because [a-z ]{3,20}\.", texts[3]), texts[3]


def test_a_failing_grammar_fails_only_its_request(engine, alone):
    """A matcher that breaks the batch fill (and its own fill) fails its request alone: the others of the
    batch fall back to their own masks and give the same tokens as alone; no KV page leaks."""
    free = engine.runner.allocator.num_free
    reqs = _requests(engine)
    proc = reqs[1].logits_processor

    class Broken:
        """Accepts tokens like the real matcher; filling a mask fails (as a broken grammar would)."""

        def __init__(self, real: xgr.GrammarMatcher) -> None:
            self.real = real
            self.stop_token_ids = real.stop_token_ids

        def accept_token(self, tok: int) -> bool:
            return self.real.accept_token(tok)

        def is_terminated(self) -> bool:
            return self.real.is_terminated()

        def fill_next_token_bitmask(self, bitmask, index=0):
            raise RuntimeError("grammar engine failed")

    proc.matcher = Broken(proc.matcher)  # type: ignore[union-attr]
    _drive(engine, reqs)
    assert reqs[1].error and "grammar engine failed" in reqs[1].error, reqs[1].error
    assert reqs[1].output_ids == []
    for i, r in enumerate(reqs):
        if i != 1:
            assert r.error is None and r.output_ids == alone[i], (i, r.error)
    assert engine.runner.allocator.num_free == free
