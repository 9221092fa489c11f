"""Server settings: limits, keys and defaults that the routes enforce (frozen; built from CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    """`api_key` guards every route but /health and /metrics; `admin_key` guards ingestion and
    deletion (falls back to `api_key` when unset). Limits answer 413 (bytes, prompt tokens) and
    400 (`max_new_tokens` over `max_new_tokens_limit`); a full engine queue answers 429."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    admin_key: str | None = None
    data_dir: Path | None = None
    reuse_policy: str = "redknot"
    redis_url: str | None = None
    max_request_bytes: int = 4 << 20
    max_new_tokens_limit: int = 4096
    max_batch_size: int = 256
    served_model_name: str | None = None
    graceful_timeout_s: float = 30.0
    log_requests: bool = True
