"""`redknot serve`: load the engine (and the RAG service with --data-dir) and run uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
from pathlib import Path
from typing import Any

from redknot_rag.server.settings import ServerSettings

log = logging.getLogger("redknot.server")


def register_cli(subparsers: Any) -> None:
    from redknot_rag.cli import add_engine_args
    from redknot_rag.store.config import add_store_args

    p = subparsers.add_parser("serve", help="serve the HTTP API (RAG, SGLang native, OpenAI)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--data-dir", type=Path, default=None, help="RAG data (documents, index, KV store)")
    p.add_argument("--api-key", default=None, help="Bearer key for the API (default: open)")
    p.add_argument("--admin-key", default=None, help="Bearer key for /ingest and DELETE (default: --api-key)")
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument(
        "--max-queued-requests", type=int, default=256, help="engine queue length; beyond it requests get 429"
    )
    p.add_argument("--reuse-policy", default="redknot", help="default KV reuse policy of /query")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDKNOT_REDIS_URL"),
        help="shared Redis cold tier for chunk KV (env REDKNOT_REDIS_URL)",
    )
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    p.add_argument("--max-new-tokens-limit", type=int, default=4096, help="larger max_new_tokens get 400")
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGTERM before cancelling them",
    )
    p.add_argument("--log-level", default="info")
    add_store_args(p)
    add_engine_args(p)
    p.set_defaults(func=_cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        admin_key=args.admin_key,
        data_dir=args.data_dir,
        reuse_policy=args.reuse_policy,
        max_request_bytes=args.max_request_bytes,
        max_new_tokens_limit=args.max_new_tokens_limit,
        served_model_name=args.served_model_name,
        graceful_timeout_s=args.graceful_timeout,
        redis_url=args.redis_url,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from redknot_rag.cli import engine_config_from_args
    from redknot_rag.engine import Engine
    from redknot_rag.server.app import create_app
    from redknot_rag.server.logs import setup_json_logging
    from redknot_rag.server.runtime import Runtime

    setup_json_logging(args.log_level)
    settings = settings_from_args(args)
    config = dataclasses.replace(
        engine_config_from_args(args),
        max_running_requests=args.max_running_requests,
        max_queued_requests=args.max_queued_requests,
    )
    engine = Engine(config)
    rag = make_rag(engine, settings, store_config_for(engine, args))
    app = create_app(Runtime(engine, settings, rag))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.graceful_timeout_s),
            timeout_keep_alive=30,
        )
    )
    log.info("listening", extra={"host": settings.host, "port": settings.port, "engine": engine.info()})
    server.run()
    return 0


def store_config_for(engine: Any, args: argparse.Namespace) -> Any:
    """The chunk KV store settings from the `--store-*` flags (the head profile only when asked for)."""
    from redknot_rag.store.config import store_config_from_args

    profile = None
    if getattr(args, "store_local_heads", "off") == "profile":
        from redknot_rag.heads import load_profile_for

        profile = load_profile_for(engine)
    return store_config_from_args(args, profile)


def make_rag(engine: Any, settings: ServerSettings, store_config: Any = None) -> Any:
    """The RAG service over `settings.data_dir`, or None without one."""
    if settings.data_dir is None:
        return None
    from redknot_rag.rag import RagService

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {}
    if store_config is not None:
        if "store_config" in inspect.signature(RagService).parameters:
            kw["store_config"] = store_config
        else:
            log.warning("this RagService does not take store settings yet; --store-* flags are ignored")
    if settings.redis_url:
        os.environ["REDKNOT_REDIS_URL"] = settings.redis_url
        if "redis_url" in inspect.signature(RagService).parameters:
            kw["redis_url"] = settings.redis_url
    return RagService(engine, settings.data_dir, settings.reuse_policy, **kw)
