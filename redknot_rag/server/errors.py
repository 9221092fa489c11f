"""API errors: one JSON shape for every failure, `{"error": {"message", "type", "code"}}`.

OpenAI clients read `error.message`; SGLang's frontend shows the body of any non-200 answer.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    """Every non-2xx answer (and the SSE error event of a failed stream)."""

    object: str = "error"
    error: ErrorDetail


_WHY = {
    400: "invalid request (bad parameter, malformed JSON)",
    401: "missing or invalid API key",
    403: "this key may not use this route",
    404: "unknown route, namespace, document, model or request",
    405: "method not allowed",
    413: "too large (body, prompt or question tokens, document)",
    422: "the body does not match the schema",
    429: "queue full; retry after Retry-After seconds",
    503: "shutting down or stalled",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why} for code, why in _WHY.items()
}


class ApiError(Exception):
    """Raised anywhere in a route; answered as `status` with `message`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"object": "error", "error": {"message": message, "type": _TYPES.get(status, "error"), "code": status}}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def describe_validation_errors(errors: list[Any]) -> str:
    """pydantic errors → one readable line: `sampling_params.max_new_tokens: Input should be...; ...`."""
    parts = []
    for e in errors[:8]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if not str(x).startswith("function-"))
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (+{len(errors) - 8} more)" if len(errors) > 8 else ""
    return "; ".join(parts) + more
