"""Request body limits and parsing: size (413), malformed JSON (400), schema (422; 400 on /v1).

Python's json module accepts what JSON does not (NaN, Infinity, lone UTF-16 surrogates such as
"\\ud800"); those are refused here with 400, before any model sees them. So is JSON nested deeper
than `MAX_JSON_DEPTH`: every later step (validation, re-encoding, grammar compilation) recurses over
the body, and a body of 100,000 `[` would end in a RecursionError (a 500) at whichever comes first."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from redknot_rag.server.errors import ApiError, describe_validation_errors

M = TypeVar("M", bound=BaseModel)
MAX_JSON_DEPTH = 64  # arrays/objects inside one another; a JSON schema in a body needs far fewer


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes (checked on Content-Length and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> None:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


async def read_model(
    request: Request, model: type[M], limit: int, allow_empty: bool = False, schema_status: int = 422
) -> M:
    """Parse the body as JSON and validate it against `model` (strict types, no unknown fields). A body
    that does not match answers `schema_status` (the OpenAI routes answer 400, as OpenAI does)."""
    raw = await read_body(request, limit)
    if not raw.strip():
        if allow_empty:
            return model()
        raise ApiError(400, "request body is empty; expected a JSON object")
    too_deep = ApiError(400, f"malformed JSON body: arrays/objects nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    except RecursionError:  # the parser recursed ~1000 levels before it stopped
        raise too_deep from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    try:  # a lone surrogate cannot be encoded as UTF-8: every tokenizer call would fail on it
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "malformed JSON body: a string holds a lone UTF-16 surrogate (not valid Unicode)") from None
    if not isinstance(data, dict):
        raise ApiError(schema_status, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(schema_status, f"invalid request: {describe_validation_errors(e.errors())}") from None


def json_depth(data: object) -> int:
    """How deeply arrays and objects nest in parsed JSON (a scalar is 0, `[]` is 1); iterative, so any
    depth the parser returned is measured without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return deepest
