"""Constrained decoding on xgrammar (the grammar engine SGLang uses): JSON schema, regex, EBNF.

A `Grammar` names what the output must match; `GrammarBackend` (one per tokenizer) compiles it
once to an xgrammar `CompiledGrammar` (in a worker process, bounded in size and time, cached:
engine/grammar_compiler.py) and hands each request a fresh `GrammarProcessor`. The processor is the
engine's `Request.logits_processor` hook: at every decode step it feeds the matcher the tokens
emitted since its last call and sets every logit the grammar disallows to -inf. Stop tokens are
allowed exactly when the grammar can end here.

The engine fills the masks of all constrained requests of a step at once: `StepGrammarMask`
fills one `[rows, ⌈vocab/32⌉]` int32 bitmask in a single xgrammar batch call on a worker thread
while the forward runs, and applies it to the step's logits in one call. A processor whose row
was masked that way only checks that something is left; called alone (no batch mask this step),
it fills and applies its own `[1, ⌈vocab/32⌉]` mask. xgrammar was chosen by measurement
(bench/grammar/README.md).

EBNF uses xgrammar's GBNF dialect (`root ::= ...`), as SGLang's `ebnf` parameter does.
"""

from __future__ import annotations

import functools
import json
import re._compiler as re_compiler
import re._constants as re_constants
import re._parser as re_parser
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import regex
import torch
import xgrammar as xgr

from redknot_rag.engine.grammar_compiler import GrammarCompileError, GrammarCompilerPool, GrammarTimeoutError
from redknot_rag.sampling import InvalidRequestError, SamplingParams

GrammarKind = Literal["regex", "json_schema", "ebnf"]
_NEG_INF = torch.tensor(float("-inf"))
MAX_GRAMMAR_CHARS = 100_000  # a regex, EBNF or JSON schema (as JSON text)
GRAMMAR_COMPILE_TIMEOUT_S = 10.0  # a compile running longer is killed and answered 400


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
        self.compilers = GrammarCompilerPool(self.info, timeout_s=GRAMMAR_COMPILE_TIMEOUT_S)

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> GrammarBackend:
        key = (id(tokenizer), vocab_size, stop_ids)
        with cls._lock:
            b = cls._cache.get(key)
            if b is None:
                b = cls._cache[key] = cls(tokenizer, vocab_size, stop_ids)
            return b

    def compile(self, g: Grammar) -> xgr.CompiledGrammar:
        """Compile in a worker process within `GRAMMAR_COMPILE_TIMEOUT_S` (or fetch from the pool's cache);
        a grammar over `MAX_GRAMMAR_CHARS`, one xgrammar rejects or one that compiles too long is HTTP 400."""
        what = {"regex": "regex", "ebnf": "ebnf", "json_schema": "json_schema"}[g.kind]
        if len(g.source) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"{what} has {len(g.source)} characters; the limit is {MAX_GRAMMAR_CHARS}")
        if g.kind == "regex" and regex_has_empty_class(g.source):
            raise InvalidRequestError(f"invalid regex {g.source[:200]!r}: a character class in it matches no character")
        if g.kind == "json_schema":
            try:
                schema = json.loads(g.source)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from e
            except RecursionError:
                raise InvalidRequestError("json_schema is nested too deeply") from None
            if not isinstance(schema, dict | bool):
                raise InvalidRequestError("json_schema must be a JSON object")
        try:
            return self.compilers.compile(g.kind, g.source)
        except GrammarCompileError as e:
            raise InvalidRequestError(f"invalid {what} {g.source[:200]!r}: {e}") from e
        except GrammarTimeoutError as e:
            raise InvalidRequestError(f"{what} too complex: {e}; simplify it") from e

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
        # set by `StepGrammarMask.apply`: this step's logits row is already masked by `_step_row`
        # ([1, ceil(vocab/32)] int32, a row of the step's bitmask) for output length `_step_n`
        self._step_n = -1
        self._step_row: torch.Tensor | None = None

    def sync(self, output_ids: list[int]) -> bool:
        """Feed the matcher the tokens emitted since the last call; whether it still needs a mask
        (False once it is dead or terminated: then only stop tokens are allowed)."""
        for tok in output_ids[self._n :]:
            if self.is_dead or self.matcher.is_terminated() or not self.matcher.accept_token(tok):
                self.is_dead = True
        self._n = len(output_ids)
        return not (self.is_dead or self.matcher.is_terminated())

    def __call__(self, req: Any, logits: torch.Tensor) -> torch.Tensor:
        if not self.sync(req.output_ids):
            keep = torch.full_like(logits, float("-inf"))
            keep[self.stop_ids] = 0.0
            masked = logits + keep
            return masked if _has_finite(masked) else keep
        row = self.bitmask
        if self._step_n == len(req.output_ids) and self._step_row is not None:
            out, row = logits, self._step_row  # masked with the whole step (penalties keep -inf at -inf)
        else:
            self.matcher.fill_next_token_bitmask(self.bitmask)
            out = self._apply(logits, row)
        if not _has_finite(out):  # all the grammar allows was masked upstream (min_new_tokens)
            out = self._apply(torch.zeros_like(logits), row)
        if not _has_finite(out):  # the grammar allows nothing here: end the request, never break it
            out = torch.full_like(logits, float("-inf"))
            out[self.stop_ids] = 0.0
        return out

    def _apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """A new `[vocab]` tensor: `logits` where `bitmask` `[1, ceil(vocab/32)]` allows, -inf elsewhere.
        On CPU the bits are unpacked with numpy (one row: bench/grammar/README.md)."""
        if logits.device.type != "cpu":
            out = logits.clone()  # the row may be a view into the batch's logits
            xgr.apply_token_bitmask_inplace(out, bitmask[0].to(out.device), vocab_size=self.vocab_size)
            return out
        return torch.where(_allowed(bitmask[0], self.vocab_size), logits, _NEG_INF)


class StepGrammarMask:
    """The grammar masks of one engine step: one bitmask `[num_rows, ceil(vocab/32)]` int32 whose row
    `r` is the mask for logits row `r`, filled for the constrained requests that sample this step in a
    single xgrammar batch call, on a worker thread that runs while the forward runs.

    Invariant that makes the overlap safe: a matcher only advances in `GrammarProcessor.sync`, which
    the engine thread runs for every member before `start` and next after this step's sampling (the
    step's `apply` joins the fill first). So while the forward runs, only the worker reads the
    matchers, and their state is the one after the last sampled token, the state this step's logits
    continue. Stale masks are impossible: a matcher is never written while its row is being filled.
    """

    _pool: ThreadPoolExecutor | None = None
    _filler: xgr.BatchGrammarMatcher | None = None
    _lock = threading.Lock()

    def __init__(self, members: list[tuple[GrammarProcessor, int, int]], num_rows: int, vocab_size: int) -> None:
        """`members`: (processor, logits row, output length) of each constrained request that samples
        this step; its matcher is synced to that output length."""
        self.members = members
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)  # [num_rows, ceil(vocab/32)] int32
        self.rows = [row for _, row, _ in members]
        self._fill: Future | None = None

    @classmethod
    def _worker(cls) -> tuple[ThreadPoolExecutor, xgr.BatchGrammarMatcher]:
        with cls._lock:
            if cls._pool is None or cls._filler is None:
                cls._pool = ThreadPoolExecutor(1, thread_name_prefix="redknot-grammar")
                cls._filler = xgr.BatchGrammarMatcher(max_threads="auto")
            return cls._pool, cls._filler

    def start(self) -> StepGrammarMask:
        """Launch the fill (xgrammar releases the GIL while it fills, so the forward proceeds)."""
        pool, filler = self._worker()
        matchers = [p.matcher for p, _, _ in self.members]
        self._fill = pool.submit(filler.batch_fill_next_token_bitmask, matchers, self.bitmask, self.rows)
        return self

    def wait(self) -> bool:
        """Join the fill; False if it failed (the members then fill their own masks, one by one, so a
        request whose grammar fails fails alone)."""
        assert self._fill is not None, "start() first"
        return self._fill.exception() is None

    def apply(self, logits: torch.Tensor) -> None:
        """Join the fill and mask the members' rows of the step's logits `[num_rows, vocab]` float32 in
        place; each member then knows its row is masked for this output length. On a GPU that is one
        xgrammar kernel call; on CPU the rows are unpacked with numpy, 4-6x faster than xgrammar's CPU
        kernel on real grammar masks (bench/grammar/README.md)."""
        if not self.wait():
            return
        with torch.inference_mode():  # the forward's logits are inference tensors
            if logits.device.type != "cpu":
                bitmask = self.bitmask.to(logits.device)
                xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=self.rows)
            else:
                for row in self.rows:
                    x = logits[row]  # [vocab] view, masked in place
                    torch.where(_allowed(self.bitmask[row], self.vocab_size), x, _NEG_INF, out=x)
        for proc, row, n in self.members:
            proc._step_n, proc._step_row = n, self.bitmask[row : row + 1]


JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI response_format {"type": "json_object"}


def _allowed(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bitmask row `[ceil(vocab/32)]` int32 (little-endian words: token i is bit i) → `[vocab]` bool."""
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little", count=vocab_size)
    return torch.from_numpy(bits.view(np.bool_))


def _has_finite(x: torch.Tensor) -> bool:
    """Whether any entry of a `[vocab]` row is above -inf (`amax`: ~15x cheaper than `isfinite().any()`)."""
    return bool(x.amax() > float("-inf"))


def compile_stop_regex(pattern: str) -> regex.Pattern:
    """A `stop_regex` (searched in the output text, not a grammar); a bad one is HTTP 400."""
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError, ValueError) as e:
        raise InvalidRequestError(f"invalid regex {pattern!r}: {e}") from e


_MAX_CLASSES_CHECKED = 64  # distinct character classes tested for emptiness (each scan is up to ~12 ms)
_REPEATS = (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT, re_constants.POSSESSIVE_REPEAT)


def regex_has_empty_class(pattern: str) -> bool:
    """Whether `pattern` holds a character class that no character belongs to (`[^\\s\\S]`), on any
    path. xgrammar compiles such a class to a byte-level mask that still lets partial UTF-8 tokens
    through, so the output would violate the regex (an emoji for `(yes|[^\\s\\S])`). A pattern Python
    cannot parse (xgrammar's dialect differs a little) is left to xgrammar."""
    try:
        parsed = re_parser.parse(pattern)
        classes = {repr(av): av for av in _classes(parsed)}
    except (re_constants.error, RecursionError, OverflowError, ValueError):
        return False
    for items in list(classes.values())[:_MAX_CLASSES_CHECKED]:
        sub = re_parser.SubPattern(parsed.state, [(re_constants.IN, items)])
        if re_compiler.compile(sub, parsed.state.flags).search(_every_character()) is None:
            return True
    return False


def _classes(seq: Any) -> Iterator[Any]:
    """The items of every character class (`IN` node) of a parsed pattern, depth first."""
    for op, av in seq:
        if op is re_constants.IN:
            yield av
        elif op is re_constants.BRANCH:
            for branch in av[1]:
                yield from _classes(branch)
        elif op in _REPEATS:
            yield from _classes(av[2])
        elif op is re_constants.SUBPATTERN:
            yield from _classes(av[-1])
        elif op is re_constants.ATOMIC_GROUP:
            yield from _classes(av)
        elif op in (re_constants.ASSERT, re_constants.ASSERT_NOT):
            yield from _classes(av[1])
        elif op is re_constants.GROUPREF_EXISTS:
            for part in av[1:]:
                if part is not None:
                    yield from _classes(part)


@functools.cache
def _every_character() -> str:
    """Every Unicode scalar value, once (surrogates excluded): ~1.1M characters."""
    return "".join(map(chr, (*range(0xD800), *range(0xE000, 0x110000))))
