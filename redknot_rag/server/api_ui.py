"""The web page (`/ui`) and the read-only routes only it needs: `/ui/info`, `/ui/head_profile`, `/ui/kv_pending`.

The page is plain HTML/CSS/JS from `static/` (no build step, nothing loaded from elsewhere: the
Content-Security-Policy below forbids it). The page's files are public (they hold no data); the
data routes check the user key like every other API route. `/` redirects to `/ui`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.requests import Request as HttpRequest

from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
from redknot_rag.server.auth import principal_of, require_admin
from redknot_rag.server.errors import ApiError
from redknot_rag.server.runtime import Runtime

# Reuse policies the page offers (each is a name `reuse.make_policy` accepts; tests check that).
POLICIES = ("redknot", "redknot-local", "redknot-dense", "cacheblend", "epic", "naive", "full")
_MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # Only our own files, no inline script, no framing: the page works on an offline machine.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def static_dir() -> Path:
    return Path(str(resources.files("redknot_rag.server") / "static"))


def _static_files() -> dict[str, Path]:
    """name → path of every servable file (a fixed list taken at startup: no path from the URL is opened)."""
    return {p.name: p for p in static_dir().iterdir() if p.is_file() and p.suffix in _MEDIA_TYPES}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)


def make_router(rt: Runtime, user: Callable[[HttpRequest], None]) -> APIRouter:
    """Routes of the page; `user` is the app's user-key check (run by the data routes only)."""
    router = APIRouter()
    files = _static_files()
    profile_cache: list[dict[str, Any] | None] = []  # [] until first asked; the profile is fixed per process

    @router.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui", status_code=307)

    @router.get("/ui", include_in_schema=False)
    async def page():
        return _file(files["index.html"])

    @router.get("/ui/info")
    async def info(request: HttpRequest):
        user(request)
        rag = rt.rag
        namespaces: list[str] = []
        if rag is not None:
            namespaces = await rt.run_blocking(rag.db.list_namespaces)
            allowed = principal_of(request).namespaces  # a tenant key sees its own namespaces only
            namespaces = [n for n in namespaces if allowed is None or n in allowed]
        default = rt.default_policy
        return {
            "model": rt.model_name,
            "rag": rag is not None,
            "namespaces": namespaces,
            "reuse_policy": default,
            "policies": [default, *(p for p in POLICIES if p != default)],
            "max_new_tokens_limit": rt.settings.max_new_tokens_limit,
            "query_max_new_tokens": QUERY_DEFAULTS.max_new_tokens,  # the page starts at /query's own default
            "auth": rt.settings.api_key is not None or rt.settings.admin_key is not None,
        }

    @router.get("/ui/head_profile")
    async def head_profile(request: HttpRequest):
        """The served model's head profile: `[num_layers][num_kv_heads]` classes (0 local, 1 global) and scores."""
        user(request)
        if not profile_cache:
            profile_cache.append(await rt.run_blocking(_load_profile, rt))
        prof = profile_cache[0]
        if prof is None:
            raise ApiError(
                404,
                f"no head profile matches the served model {rt.engine.runner.name!r} "
                "(run `redknot profile-heads` to calibrate one)",
            )
        return prof

    @router.get("/ui/kv_pending")
    async def kv_pending(request: HttpRequest, namespace: str = "default"):
        """Chunks of `namespace` whose KV is not stored yet: the page polls this while an upload runs (admin)."""
        user(request)
        require_admin(principal_of(request))
        if rt.rag is None:
            raise ApiError(503, "RAG is not enabled on this server: start it with --data-dir")
        rows = await rt.run_blocking(rt.rag.db.chunks_missing_kv, namespace)
        return {"namespace": namespace, "chunks": len(rows), "tokens": sum(r.num_tokens for r in rows)}

    @router.get("/ui/{name}", include_in_schema=False)
    async def static(name: str):
        path = files.get(name)
        if path is None:
            raise ApiError(404, f"no file {name!r} in the page's files")
        return _file(path)

    return router


def _load_profile(rt: Runtime) -> dict[str, Any] | None:
    from redknot_rag.heads import load_profile_for

    prof = load_profile_for(rt.engine.runner.name, rt.engine.runner.weights_fingerprint)
    if prof is None:
        return None
    out = asdict(prof)
    out["num_global"] = prof.num_global
    return out
