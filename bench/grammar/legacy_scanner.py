"""The hand-written scanner that server/constrained.py used before issue 16, kept only as the
baseline of bench/grammar/run.py (not imported by the server).

Constrained decoding: a token mask that keeps the output a prefix of some regex match.

At each step the candidates are scanned in logit order and a token is allowed when the output
text followed by the token's text is still a *partial* full match of the pattern (the
third-party `regex` module's `partial=True`). EOS is allowed exactly when the output already
fully matches. Greedy decoding needs one viable candidate; sampling keeps the first
`keep` viable ones (the rest of the distribution is masked). JSON schemas are compiled to a
regex first (`schema_to_regex`), covering the subset that structured-output callers use.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import regex
import torch


class InvalidRequestError(ValueError):
    pass


_SAMPLED_KEEP = 32  # viable candidates kept when sampling (temperature > 0)


class TokenTexts:
    """`text[i]`: the decoded text of token i alone; special tokens map to None (never allowed)."""

    _cache: dict[int, TokenTexts] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer: Any) -> None:
        n = len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        texts: list[str | None] = []
        for i in range(n):
            if i in special:
                texts.append(None)
                continue
            s = tokenizer.decode([i])
            texts.append(None if (not s or "\ufffd" in s) else s)
        self.text = texts

    @classmethod
    def of(cls, tokenizer: Any) -> TokenTexts:
        with cls._lock:
            tt = cls._cache.get(id(tokenizer))
            if tt is None:
                tt = cls._cache[id(tokenizer)] = cls(tokenizer)
            return tt


def compile_regex(pattern: str) -> regex.Pattern:
    """Compile a user pattern; a bad one is an InvalidRequestError (HTTP 400)."""
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError, ValueError) as e:
        raise InvalidRequestError(f"invalid regex {pattern!r}: {e}") from e


class RegexProcessor:
    """`Request.logits_processor`: masks logits `[vocab]` float32 to tokens that keep the regex viable.

    Runs on the engine thread; holds the text of what it let through so far.
    """

    def __init__(self, pattern: str, texts: TokenTexts, eos_ids: tuple[int, ...], greedy: bool) -> None:
        self.rx = compile_regex(pattern)
        self.texts = texts
        self.eos_ids = tuple(eos_ids)
        self.keep = 1 if greedy else _SAMPLED_KEEP
        self._text = ""
        self._n = 0

    def _sync(self, output_ids: list[int]) -> str:
        for tok in output_ids[self._n :]:
            self._text += self.texts.text[tok] or ""
        self._n = len(output_ids)
        return self._text

    def is_viable(self, text: str) -> bool:
        return self.rx.fullmatch(text, partial=True) is not None

    def is_complete(self, text: str) -> bool:
        return self.rx.fullmatch(text) is not None

    def __call__(self, req: Any, logits: torch.Tensor) -> torch.Tensor:
        text = self._sync(req.output_ids)
        allowed: list[int] = []
        order = torch.argsort(logits, descending=True).tolist()
        finite = int(torch.isfinite(logits).sum())
        for tok in order[:finite]:
            s = self.texts.text[tok]
            if s is None or not self.is_viable(text + s):
                continue
            allowed.append(tok)
            if len(allowed) >= self.keep:
                break
        if self.is_complete(text) or not allowed:  # done, or a dead end: let it stop
            allowed.extend(self.eos_ids)
        mask = torch.full_like(logits, float("-inf"))
        idx = torch.tensor(allowed, dtype=torch.int64)
        mask[idx] = 0.0
        out = logits + mask
        if not torch.isfinite(out).any():  # everything allowed was masked upstream (min_new_tokens)
            out = mask
        return out


# ---- JSON schema → regex ------------------------------------------------------------------
_WS = r"[ \n]?"
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])*"'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_SIMPLE = {"string": _STRING, "integer": _INTEGER, "number": _NUMBER, "boolean": r"(?:true|false)", "null": "null"}
_MAX_DEPTH = 8


def _literal(value: Any) -> str:
    return re.escape(json.dumps(value, ensure_ascii=False))


def schema_to_regex(schema: Any, depth: int = 0) -> str:
    """A regex matching JSON texts valid under `schema` (compact, properties in declared order).

    Supported: type (incl. lists of types), enum, const, string (plain), integer, number,
    boolean, null, array (items, minItems/maxItems up to small counts), object (properties; all
    listed properties are emitted, in order), anyOf/oneOf. `$ref` and pattern keywords are not.
    """
    if depth > _MAX_DEPTH:
        raise InvalidRequestError("json_schema nests too deeply")
    if schema is True or schema == {}:
        return _any_json(2)
    if not isinstance(schema, dict):
        raise InvalidRequestError("json_schema must be an object")
    if "$ref" in schema:
        raise InvalidRequestError("json_schema: $ref is not supported")
    if "const" in schema:
        return _literal(schema["const"])
    if "enum" in schema:
        return "(?:" + "|".join(_literal(v) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return "(?:" + "|".join(schema_to_regex(s, depth + 1) for s in schema[key]) + ")"
    typ = schema.get("type")
    if isinstance(typ, list):
        return "(?:" + "|".join(schema_to_regex({**schema, "type": t}, depth + 1) for t in typ) + ")"
    if typ in _SIMPLE:
        return _SIMPLE[typ]
    if typ == "array":
        item = schema_to_regex(schema.get("items", {}), depth + 1)
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        if hi is not None and int(hi) == 0:
            return r"\[" + _WS + r"\]"
        first = item
        rest_lo = max(lo - 1, 0)
        rest_hi = "" if hi is None else str(int(hi) - 1)
        body = f"{first}(?:{_WS},{_WS}{item}){{{rest_lo},{rest_hi}}}"
        return r"\[" + _WS + (body if lo > 0 else f"(?:{body})?") + _WS + r"\]"
    if typ == "object" or "properties" in schema:
        props = schema.get("properties")
        if not props:
            return _any_object(2)
        parts = [f"{_literal(name)}{_WS}:{_WS}{schema_to_regex(sub, depth + 1)}" for name, sub in props.items()]
        return r"\{" + _WS + f"{_WS},{_WS}".join(parts) + _WS + r"\}"
    raise InvalidRequestError(f"json_schema: unsupported schema {json.dumps(schema)[:200]}")


def _any_json(depth: int) -> str:
    alts = [_STRING, _NUMBER, "true", "false", "null"]
    if depth > 0:
        inner = _any_json(depth - 1)
        alts.append(r"\[" + _WS + f"(?:{inner}(?:{_WS},{_WS}{inner})*)?" + _WS + r"\]")
        alts.append(_any_object(depth - 1))
    return "(?:" + "|".join(alts) + ")"


def _any_object(depth: int) -> str:
    value = _any_json(depth) if depth > 0 else f"(?:{_STRING}|{_NUMBER}|true|false|null)"
    member = f"{_STRING}{_WS}:{_WS}{value}"
    return r"\{" + _WS + f"(?:{member}(?:{_WS},{_WS}{member})*)?" + _WS + r"\}"


def json_schema_regex(json_schema: str | dict) -> str:
    """Parse a schema given as a JSON string (SGLang's field) or dict and compile it to a regex."""
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from e
    return schema_to_regex(json_schema)


def any_json_object_regex() -> str:
    """OpenAI `response_format: {"type": "json_object"}`: any JSON object (nesting depth ≤ 2)."""
    return _any_object(2)
