"""`redknot serve`: turn the flags into settings, build the RAG service (`rag.factory.build_service`, over
--data-dir, by default the folder `redknot ingest` writes to) and run uvicorn.

Shutdown (SIGTERM or Ctrl-C): the server drains. /health and new requests answer 503 at once while
requests in flight go on for up to --graceful-timeout seconds; what is still running then is
cancelled with an explicit error (an SSE error event, or a 503 body) and a log line each; then the
process exits. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from redknot_rag.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_TOKENS, MAX_QUESTION_CHARS
from redknot_rag.rag.factory import DEFAULT_DATA_DIR, ServiceSettings
from redknot_rag.reuse import POLICY_NAMES
from redknot_rag.server.auth import TenantKey
from redknot_rag.server.settings import ServerSettings

log = logging.getLogger("redknot.server")


def register_cli(subparsers: Any) -> None:
    from redknot_rag.options import HelpFormatter, add_engine_args
    from redknot_rag.store.store_config import add_store_args

    p = subparsers.add_parser("serve", help="serve the HTTP API (RAG, SGLang native, OpenAI)")
    p.formatter_class = HelpFormatter
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=30000, help="port to listen on")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="RAG data (documents, index, KV store): the folder `redknot ingest` writes to",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("REDKNOT_API_KEY"),
        help="Bearer key for the user routes over every namespace (env REDKNOT_API_KEY; default: open)",
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("REDKNOT_ADMIN_KEY"),
        help="Bearer key for every route, incl. /ingest, /documents, /flush_cache (env REDKNOT_ADMIN_KEY; "
        "default: --api-key)",
    )
    p.add_argument(
        "--tenant-key",
        action="append",
        default=[],
        metavar="KEY=NS[,NS...]",
        help="a user key bound to these namespaces only (repeatable)",
    )
    p.add_argument("--max-running-requests", type=int, default=64, help="requests decoding at once")
    p.add_argument(
        "--max-queued-requests", type=int, default=256, help="engine queue length; beyond it requests get 429"
    )
    p.add_argument(
        "--reuse-policy",
        default=None,
        help="default KV reuse policy (default: the one measured for the model, recorded with its head profile; "
        "else redknot). Known: " + POLICY_NAMES,
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDKNOT_REDIS_URL"),
        help="shared Redis cold tier for chunk KV (env REDKNOT_REDIS_URL)",
    )
    p.add_argument(
        "--ingest-root",
        type=Path,
        default=None,
        help="folder whose files /ingest `paths` may read (symlinks resolved; anything outside answers 403); "
        "without it, `paths` answers 403",
    )
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    p.add_argument("--max-new-tokens-limit", type=int, default=4096, help="larger max_new_tokens get 400")
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="new tokens of a chat completion without max_tokens (default: context / 16)",
    )
    p.add_argument(
        "--max-document-bytes", type=int, default=MAX_DOCUMENT_BYTES, help="larger documents or files get 413"
    )
    p.add_argument(
        "--max-document-tokens",
        type=int,
        default=MAX_DOCUMENT_TOKENS,
        help="documents of more tokens get 413 (tokens bound a document's KV; characters do not)",
    )
    p.add_argument("--max-question-chars", type=int, default=MAX_QUESTION_CHARS, help="longer questions get 413")
    p.add_argument("--served-model-name", default=None, help="model name of /v1 (default: the model file's name)")
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGTERM before cancelling them",
    )
    p.add_argument(
        "--health-stall-s", type=float, default=30.0, help="/health answers 503 when the engine is stuck this long"
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallel ranks (one process per device; KV heads must divide). Starts ranks 1..N-1 itself "
        "unless run under torchrun; HTTP on rank 0",
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    add_store_args(p)
    add_engine_args(p)
    p.set_defaults(func=_cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        admin_key=args.admin_key,
        tenant_keys=tuple(TenantKey.parse(t) for t in args.tenant_key),
        data_dir=args.data_dir,
        ingest_root=args.ingest_root,
        reuse_policy=args.reuse_policy,
        max_request_bytes=args.max_request_bytes,
        max_new_tokens_limit=args.max_new_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_document_bytes=args.max_document_bytes,
        max_question_chars=args.max_question_chars,
        served_model_name=args.served_model_name,
        graceful_timeout_s=args.graceful_timeout,
        health_stall_s=args.health_stall_s,
        redis_url=args.redis_url,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from redknot_rag.options import service_settings_from_args
    from redknot_rag.server.logs import quiet_progress_bars, setup_json_logging

    setup_json_logging(args.log_level)
    quiet_progress_bars()
    settings = settings_from_args(args)
    service = service_settings_from_args(args, settings.reuse_policy)  # a bad policy name fails before the model
    service = dataclasses.replace(
        service,
        engine=dataclasses.replace(
            service.engine,
            max_running_requests=args.max_running_requests,
            max_queued_requests=args.max_queued_requests,
        ),
    )
    runner = None
    if args.tp != 1:
        from redknot_rag.tp import launch

        runner = launch(service.engine, args.tp)
        if runner is None:  # a follower rank: rank 0 closed it
            return 0
    try:
        return _serve(service, settings, runner)
    finally:
        if runner is not None:
            runner.close()  # releases the follower ranks


def _serve(service: ServiceSettings, settings: ServerSettings, runner: Any) -> int:
    import uvicorn

    from redknot_rag.rag.factory import build_service
    from redknot_rag.server.app import create_app
    from redknot_rag.server.runtime import Runtime

    rag = build_service(service, runner)
    rt = Runtime(rag.engine, settings, rag)
    app = create_app(rt)
    server = _draining_server_class(uvicorn.Server)(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,  # after the drain: only idle keep-alive connections are left
            timeout_keep_alive=30,
        ),
        rt,
    )
    log.info("listening", extra={"host": settings.host, "port": settings.port, "engine": rag.engine.info()})
    server.run()
    return 0


_FLUSH_S = 3.0  # after cancelling leftovers: time for their error events to reach the clients


def _draining_server_class(base: Any) -> Any:
    """uvicorn.Server that drains on the first exit signal (see the module docstring)."""

    class DrainingServer(base):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, rt: Any) -> None:
            super().__init__(config)
            self.rt = rt
            self.drain_deadline: float | None = None
            self.cancelled_at: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_deadline is not None:  # a second signal: stop now
                return super().handle_exit(sig, frame)
            self.drain_deadline = time.monotonic() + self.rt.settings.graceful_timeout_s
            self.rt.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:  # type: ignore[has-type]
                now = time.monotonic()
                if not self.rt.jobs:
                    log.info("drained: no request in flight")
                    self.should_exit = True
                elif self.cancelled_at is None and now >= self.drain_deadline:
                    n = self.rt.cancel_in_flight("server shutting down: the graceful timeout ended first")
                    log.warning("graceful timeout: cancelling requests in flight", extra={"in_flight": n})
                    self.cancelled_at = now
                elif self.cancelled_at is not None and now - self.cancelled_at > _FLUSH_S:
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer
