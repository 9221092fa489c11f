"""Constrained decoding on xgrammar (the grammar engine SGLang uses): JSON schema, regex, EBNF.

A `Grammar` names what the output must match; `GrammarBackend` (one per tokenizer) compiles it
once to an xgrammar `CompiledGrammar` (cached by the compiler) and hands each request a fresh
`GrammarProcessor`. The processor is the engine's `Request.logits_processor` hook: at every
decode step it feeds the matcher the tokens emitted since its last call, fills a `[1, ⌈vocab/32⌉]`
int32 bitmask and sets every disallowed logit to -inf. Stop tokens are allowed exactly when
the grammar can end here. xgrammar was chosen by measurement (bench/grammar/README.md).

EBNF uses xgrammar's GBNF dialect (`root ::= ...`), as SGLang's `ebnf` parameter does.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import regex
import torch
import xgrammar as xgr

from redknot_rag.sampling import InvalidRequestError, SamplingParams

GrammarKind = Literal["regex", "json_schema", "ebnf"]
# Whitespace the JSON grammars allow between tokens: one character (space or newline) at each
# place JSON allows any. Unbounded whitespace lets a small model loop on blanks until `length`.
_JSON_MAX_WHITESPACE = 1
_NEG_INF = torch.tensor(float("-inf"))


@dataclass(frozen=True)
class Grammar:
    """What the output must match: `source` is a regex, a JSON schema (JSON text) or EBNF."""

    kind: GrammarKind
    source: str = ""

    @classmethod
    def from_params(cls, p: SamplingParams) -> Grammar | None:
        """The grammar SGLang's `regex` / `json_schema` / `ebnf` fields ask for (at most one)."""
        given = [(k, v) for k, v in (("regex", p.regex), ("json_schema", p.json_schema), ("ebnf", p.ebnf)) if v]
        if len(given) > 1:
            raise InvalidRequestError(
                f"give at most one of regex, json_schema, ebnf (got {', '.join(k for k, _ in given)})"
            )
        if not given:
            return None
        kind, source = given[0]
        return cls(kind, source)  # type: ignore[arg-type]


class GrammarBackend:
    """xgrammar's tokenizer info and compiler for one tokenizer and logits width `vocab_size`."""

    _cache: dict[tuple[int, int, tuple[int, ...]], GrammarBackend] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> GrammarBackend:
        key = (id(tokenizer), vocab_size, stop_ids)
        with cls._lock:
            b = cls._cache.get(key)
            if b is None:
                b = cls._cache[key] = cls(tokenizer, vocab_size, stop_ids)
            return b

    def compile(self, g: Grammar) -> xgr.CompiledGrammar:
        """Compile (or fetch from xgrammar's cache); a grammar xgrammar rejects is HTTP 400."""
        try:
            if g.kind == "regex":
                return self.compiler.compile_regex(g.source)
            if g.kind == "ebnf":
                return self.compiler.compile_grammar(g.source)
            schema = json.loads(g.source)
            if not isinstance(schema, dict | bool):
                raise InvalidRequestError("json_schema must be a JSON object")
            return self.compiler.compile_json_schema(
                g.source, any_whitespace=True, max_whitespace_cnt=_JSON_MAX_WHITESPACE
            )
        except InvalidRequestError:
            raise
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from e
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with a parser message
            what = {"regex": "regex", "ebnf": "ebnf grammar", "json_schema": "json_schema"}[g.kind]
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidRequestError(f"invalid {what} {g.source[:200]!r}: {msg}") from e

    def processor(self, g: Grammar) -> GrammarProcessor:
        return GrammarProcessor(self.compile(g), self.vocab_size)


class GrammarProcessor:
    """`Request.logits_processor`: masks logits `[vocab]` float32 to what the grammar allows next.

    Runs on the engine thread. Invariant: the matcher has accepted exactly `output_ids[:_n]`.
    A token the grammar did not allow (only possible if something upstream bypassed the mask)
    leaves the matcher dead; from then on only stop tokens are allowed so the request ends.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab/32)] int32
        self.stop_ids = list(self.matcher.stop_token_ids)
        self.is_dead = False
        self._n = 0

    def _sync(self, output_ids: list[int]) -> None:
        for tok in output_ids[self._n :]:
            if self.is_dead or self.matcher.is_terminated() or not self.matcher.accept_token(tok):
                self.is_dead = True
        self._n = len(output_ids)

    def __call__(self, req: Any, logits: torch.Tensor) -> torch.Tensor:
        self._sync(req.output_ids)
        if self.is_dead or self.matcher.is_terminated():
            keep = torch.full_like(logits, float("-inf"))
            keep[self.stop_ids] = 0.0
            masked = logits + keep
            return masked if _has_finite(masked) else keep
        self.matcher.fill_next_token_bitmask(self.bitmask)
        out = self._apply(logits)
        if not _has_finite(out):  # all the grammar allows was masked upstream (min_new_tokens)
            out = self._apply(torch.zeros_like(logits))
        return out

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A new `[vocab]` tensor: `logits` where the bitmask allows, -inf elsewhere. On CPU the bits are
        unpacked with numpy (≈5× faster than xgrammar's CPU kernel here: bench/grammar/README.md)."""
        if logits.device.type != "cpu":
            out = logits.clone()  # the row may be a view into the batch's logits
            xgr.apply_token_bitmask_inplace(out, self.bitmask[0].to(out.device), vocab_size=self.vocab_size)
            return out
        words = self.bitmask[0].numpy().view(np.uint8)  # little-endian int32 words: token i is bit i
        allowed = np.unpackbits(words, bitorder="little", count=self.vocab_size).view(np.bool_)
        return torch.where(torch.from_numpy(allowed), logits, _NEG_INF)


JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI response_format {"type": "json_object"}


def _has_finite(x: torch.Tensor) -> bool:
    """Whether any entry of a `[vocab]` row is above -inf (`amax`: ~15x cheaper than `isfinite().any()`)."""
    return bool(x.amax() > float("-inf"))


def compile_stop_regex(pattern: str) -> regex.Pattern:
    """A `stop_regex` (searched in the output text, not a grammar); a bad one is HTTP 400."""
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError, ValueError) as e:
        raise InvalidRequestError(f"invalid regex {pattern!r}: {e}") from e
