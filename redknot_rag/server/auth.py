"""Bearer-key checks: `api_key` for the API, `admin_key` (or `api_key` when unset) for ingest/delete."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from redknot_rag.server.errors import ApiError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return request.headers.get("x-api-key")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def check_key(request: Request, api_key: str | None, admin_key: str | None, admin: bool) -> None:
    """Raise 401 (missing/wrong key) or 403 (an API key on an admin route)."""
    need_admin = admin_key if admin and admin_key else None
    if need_admin is None and api_key is None:
        return
    token = _bearer(request)
    if token is None:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    if admin_key is not None and _same(token, admin_key):
        return  # the admin key opens every route
    if need_admin is not None:
        if api_key is not None and _same(token, api_key):
            raise ApiError(403, "this route needs the admin key")
        raise ApiError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
    if api_key is not None and not _same(token, api_key):
        raise ApiError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
