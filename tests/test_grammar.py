"""Constrained decoding on xgrammar through the engine's `logits_processor` hook (CPU, default model)."""

from __future__ import annotations

import json
import re

import pytest

from redknot_rag.chat import chat_prompt_ids
from redknot_rag.engine.grammar import Grammar, GrammarBackend
from redknot_rag.sampling import InvalidRequestError, SamplingParams

CITIES = ["Amsterdam", "Barcelona", "Copenhagen", "Dublin", "Edinburgh", "Florence", "Geneva", "Helsinki",
          "Istanbul", "Jerusalem", "Kyoto", "Lisbon", "Madrid", "Nairobi", "Oslo", "Prague", "Quebec City",
          "Reykjavik", "Stockholm", "Tallinn"]  # fmt: skip
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "address", "tags"],
}


def run(engine, prompt: str, **sp) -> tuple[str, dict]:
    """Generate with a grammar built from SamplingParams fields, through the hook the server uses."""
    p = SamplingParams(**{"max_new_tokens": 64, **sp})
    mc = engine.model_config
    backend = GrammarBackend.of(engine.tokenizer, mc.vocab_size, tuple(mc.eos_token_ids))
    g = Grammar.from_params(p)
    assert g is not None
    req = engine.make_request(chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": prompt}]), p)
    req.logits_processor = backend.processor(g)
    engine.submit(req)
    while not req.is_finished:
        engine.step()
    return req.output_text, req.finish_reason


def test_regex_greedy_and_sampled(engine):
    pat = r"\(\d{3}\) \d{3}-\d{4}"
    text, fin = run(engine, "What is your phone number?", regex=pat)
    assert re.fullmatch(pat, text) and fin["type"] == "stop", (text, fin)
    for seed in (1, 2):
        text, fin = run(engine, "Give a date.", regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", temperature=1.0,
                        seed=seed)  # fmt: skip
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", text), text


def test_twenty_way_select_sampled(engine):
    for seed in range(3):
        text, _ = run(engine, "Name a city.", regex="(" + "|".join(CITIES) + ")", temperature=1.5, seed=seed)
        assert text in CITIES, text


def test_nested_json_schema(engine):
    text, fin = run(engine, "Describe a person as JSON.", json_schema=json.dumps(NESTED), max_new_tokens=120)
    assert fin["type"] == "stop", (text, fin)
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "address", "tags"} and isinstance(obj["age"], int)
    assert set(obj["address"]) == {"city", "zip"} and re.fullmatch("[0-9]{5}", obj["address"]["zip"])
    assert set(obj["tags"]) <= {"a", "b"} and len(obj["tags"]) <= 2


def test_ebnf(engine):
    ebnf = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{3,30} "."'
    text, fin = run(engine, "Is the sky blue?", ebnf=ebnf, temperature=0.8, seed=5)
    assert re.fullmatch(r"(yes|no) because [a-z ]{3,30}\.", text) and fin["type"] == "stop", text


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"regex": "(unclosed"}, "invalid regex"),
        ({"regex": "[a-"}, "invalid regex"),
        ({"ebnf": "root ::= (("}, "invalid ebnf"),
        ({"json_schema": "{nope"}, "json_schema is not valid json"),
        ({"json_schema": "[1]"}, "json_schema must be a json object"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one"),
    ],
)
def test_bad_grammar_is_a_clear_error(engine, fields, needle):
    mc = engine.model_config
    backend = GrammarBackend.of(engine.tokenizer, mc.vocab_size, tuple(mc.eos_token_ids))
    with pytest.raises(InvalidRequestError, match=re.compile(re.escape(needle), re.I)):
        g = Grammar.from_params(SamplingParams(**fields))
        assert g is not None
        backend.processor(g)
