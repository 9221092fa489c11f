"""The FastAPI application: routers, key checks, error mapping, access logs, lifespan.

Error mapping (one JSON shape, see errors.py): bad JSON 400, schema 422 (400 on the /v1 routes, as
OpenAI answers), invalid parameters (including any ValueError a route lets through, e.g. a parser
error) 400, too large 413, queue full 429, unknown namespace/document/model 404, shutting down or KV
pool exhausted 503. An unexpected exception answers 500 for that request only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from redknot_rag.engine import EngineOverloadedError
from redknot_rag.kvcache import OutOfPagesError
from redknot_rag.limits import TooLargeError
from redknot_rag.retrieval.docdb import UnknownNamespaceError
from redknot_rag.sampling import InvalidRequestError
from redknot_rag.server import api_openai, api_rag, api_sglang, api_ui, spec
from redknot_rag.server.auth import authenticate, require_admin
from redknot_rag.server.errors import ERROR_RESPONSES, ApiError, describe_validation_errors, error_response
from redknot_rag.server.metrics import CONTENT_TYPE
from redknot_rag.server.runtime import Runtime

log = logging.getLogger("redknot.server")


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
            self.rt.metrics.count_http(route_label(scope), status[0])
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


def route_label(scope: Scope) -> str:
    """The matched route's template (`/documents/{doc_id:path}`), also for a 405 on a known path; a
    path no route knows is `unknown` (one series, however many paths clients try)."""
    route = scope.get("route")
    return str(getattr(route, "path", "")) or "unknown"


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

    def principal(request: HttpRequest) -> None:
        """Authenticate once per request; routes read `request.state.principal` (auth.principal_of)."""
        request.state.principal = authenticate(request, s.api_key, s.admin_key, s.tenant_keys)

    public = APIRouter()

    @public.get("/health", responses={503: ERROR_RESPONSES[503]})
    async def health():
        """200 while serving; 503 while draining for shutdown or when the engine thread is stalled."""
        if rt.draining:
            raise ApiError(503, "server is draining for shutdown")
        stalled = await rt.engine_stalled()
        if stalled is not None:
            raise ApiError(503, f"engine stalled: no step finished for {stalled:.0f} s")
        return {"status": "ok"}

    @public.get("/metrics", responses={k: ERROR_RESPONSES[k] for k in (401, 403)})
    async def metrics(request: HttpRequest):
        """Prometheus text. With keys configured only the admin key reads it: it shows every tenant's
        activity and the store's size."""
        require_admin(authenticate(request, s.api_key, s.admin_key, s.tenant_keys))
        return Response(await rt.run_blocking(rt.metrics.render), media_type=CONTENT_TYPE)

    app.include_router(public)
    guarded = [Depends(principal)]
    # admin-only routes check `require_admin` themselves (the admin key also opens the user routes)
    for router in (api_sglang.make_router(rt), api_openai.make_router(rt), api_rag.make_router(rt)):
        app.include_router(router, dependencies=guarded, responses=ERROR_RESPONSES)
    # the page is public; its data routes check the key
    app.include_router(api_ui.make_router(rt, principal), responses=ERROR_RESPONSES)
    spec.install(app)
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
        # the same answer whether it does not exist or belongs to another tenant; no list, no path
        return error_response(404, f"unknown namespace {e.namespace!r}")

    @app.exception_handler(OutOfPagesError)
    async def out_of_pages(_: HttpRequest, e: OutOfPagesError) -> JSONResponse:
        return error_response(503, "KV pool exhausted; retry later", {"Retry-After": "1"})

    @app.exception_handler(TooLargeError)
    async def too_large(_: HttpRequest, e: TooLargeError) -> JSONResponse:
        return error_response(413, str(e))

    @app.exception_handler(ValueError)
    async def value_error(_: HttpRequest, e: ValueError) -> JSONResponse:
        # input the routes could only judge deep down (parser errors, a lone surrogate, ...)
        return error_response(400, f"invalid request: {e}")

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
