"""Server settings: limits, keys and defaults that the routes enforce (frozen; built from CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from redknot_rag.limits import MAX_DOCUMENT_BYTES, MAX_QUESTION_CHARS
from redknot_rag.server.auth import TenantKey


@dataclass(frozen=True)
class ServerSettings:
    """Keys and tenants: see auth.py. Limits answer 413 (body bytes, prompt or question tokens,
    document bytes) and 400 (`max_new_tokens` over `max_new_tokens_limit`); a full engine queue
    answers 429. `default_max_tokens` None: a chat completion without max_tokens gets
    `min(context // 16, max_new_tokens_limit)` new tokens at most (512 for an 8K context)."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    admin_key: str | None = None
    tenant_keys: tuple[TenantKey, ...] = ()
    data_dir: Path | None = None
    ingest_root: Path | None = None  # admin `paths` ingest reads files under it only; None: `paths` refused
    reuse_policy: str | None = None  # None: the model's measured default (head profile), else redknot
    redis_url: str | None = None
    max_request_bytes: int = 4 << 20
    max_new_tokens_limit: int = 4096
    default_max_tokens: int | None = None
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    max_question_chars: int = MAX_QUESTION_CHARS
    max_batch_size: int = 256
    served_model_name: str | None = None
    graceful_timeout_s: float = 30.0
    health_stall_s: float = 30.0  # /health answers 503 when the engine has not run a step for this long
    log_requests: bool = True
