"""The FastAPI application: routers, key checks, error mapping, access logs, lifespan.

Error mapping (one JSON shape, see errors.py): bad JSON 400, schema 422, invalid parameters
400, too large 413, queue full 429, unknown namespace/document 404, shutting down 503. An
unexpected exception answers 500 for that request only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from redknot_rag.engine import EngineOverloadedError
from redknot_rag.retrieval.docdb import UnknownNamespaceError
from redknot_rag.sampling import InvalidRequestError
from redknot_rag.server import api_openai, api_rag, api_sglang, api_ui
from redknot_rag.server.auth import check_key
from redknot_rag.server.errors import ApiError, describe_validation_errors, error_response
from redknot_rag.server.runtime import Runtime

log = logging.getLogger("redknot.server")
_ROUTE_LABELS = ("/documents/",)


class AccessLog:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact): one JSON log line
    and one `redknot_http_requests_total` increment per HTTP request."""

    def __init__(self, app: ASGIApp, rt: Runtime) -> None:
        self.app = app
        self.rt = rt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = next((p + "{doc_id}" for p in _ROUTE_LABELS if path.startswith(p)), path)
            if status[0] == 404 and route == path and route not in _KNOWN_PATHS:
                route = "unknown"
            self.rt.metrics.count_http(route, status[0])
            if self.rt.settings.log_requests and path not in ("/metrics", "/health"):
                log.info(
                    "http",
                    extra={
                        "method": scope.get("method"),
                        "path": path,
                        "status": status[0],
                        "ms": round((time.perf_counter() - t0) * 1e3, 1),
                        "client": (scope.get("client") or ("?",))[0],
                    },
                )


_KNOWN_PATHS: set[str] = set()


def create_app(rt: Runtime) -> FastAPI:
    """The app over a Runtime; the engine loop starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        rt.engine.start()
        log.info("server ready", extra={"model": rt.model_name, "rag": rt.rag is not None})
        try:
            yield
        finally:
            log.info("shutting down: cancelling in-flight engine requests")
            rt.shutdown()

    app = FastAPI(title="RedKnot-RAG", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = rt
    s = rt.settings

    def user_key(request: HttpRequest) -> None:
        check_key(request, s.api_key, s.admin_key, admin=False)

    def admin_key(request: HttpRequest) -> None:
        check_key(request, s.api_key, s.admin_key, admin=True)

    public = APIRouter()

    @public.get("/health")
    async def health():
        if rt.draining:
            raise ApiError(503, "server is shutting down")
        return {"status": "ok"}

    @public.get("/metrics")
    async def metrics():
        return PlainTextResponse(rt.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(public)
    guarded = [Depends(user_key)]
    app.include_router(api_sglang.make_router(rt), dependencies=guarded)
    app.include_router(api_openai.make_router(rt), dependencies=guarded)
    # /ingest and DELETE /documents call `admin_key` themselves (the admin key also opens user routes)
    app.include_router(api_rag.make_router(rt, admin_key), dependencies=guarded)
    app.include_router(api_ui.make_router(rt, user_key))  # the page is public; its data routes check the key
    _KNOWN_PATHS.update(getattr(r, "path", "") for r in app.routes)
    _add_error_handlers(app)
    app.add_middleware(AccessLog, rt=rt)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.headers)

    @app.exception_handler(InvalidRequestError)
    async def invalid(_: HttpRequest, e: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(_: HttpRequest, e: EngineOverloadedError) -> JSONResponse:
        return error_response(429, f"server overloaded: {e}; retry later", {"Retry-After": "1"})

    @app.exception_handler(UnknownNamespaceError)
    async def unknown_ns(_: HttpRequest, e: UnknownNamespaceError) -> JSONResponse:
        return error_response(404, f"unknown namespace: {e}")

    @app.exception_handler(RequestValidationError)
    async def validation(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        return error_response(422, f"invalid request: {describe_validation_errors(list(e.errors()))}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        msg = str(e.detail)
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
        return error_response(e.status_code, msg, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: HttpRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, f"internal error: {type(e).__name__}: {e}")
