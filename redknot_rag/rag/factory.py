"""The one composition root: engine (model, KV pool, engine thread) + chunk store + `RagService`, from
typed settings. `redknot serve`, `ingest`, `docs`, `query`, `demo` and `eval` all build their service
here; the CLI modules only turn flags into `ServiceSettings`.

Defaults live here once: the data folder (`DEFAULT_DATA_DIR`, the same for ingest, query and serve) and
the default reuse policy (the model's measured one, recorded with its head profile; `rag.service`
falls back to `DEFAULT_POLICY` where a profile records none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from redknot_rag.config import EngineConfig
from redknot_rag.limits import MAX_DOCUMENT_TOKENS
from redknot_rag.reuse import make_policy
from redknot_rag.store.store_config import DEFAULT_STORE_DTYPE, HeadCompression, StoreConfig

if TYPE_CHECKING:
    from redknot_rag.heads import HeadProfile
    from redknot_rag.rag.service import RagService
    from redknot_rag.runner import KVRunner

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "redknot"


@dataclass(frozen=True)
class ServiceSettings:
    """What a RAG service is built from. A named `reuse_policy` is parsed here, at construction (before
    any model loads), so a bad name fails at once wherever it came from (flag, setting, test)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    data_dir: Path = DEFAULT_DATA_DIR
    reuse_policy: str | None = None  # None: the model's measured default (its head profile)
    store: StoreConfig = field(default_factory=lambda: StoreConfig(dtype=DEFAULT_STORE_DTYPE))  # as the CLI
    local_heads_from_profile: bool = False  # `--store-local-heads profile`: heads from the model's profile
    # store settings that depend on the loaded model (the eval harness's named settings): replaces `store`
    store_for_model: Callable[[KVRunner, HeadProfile | None], StoreConfig] | None = None
    chunk_tokens: int = 256
    max_document_tokens: int = MAX_DOCUMENT_TOKENS  # larger documents are refused (TooLargeError, 413)
    # the forward runs on the engine's own thread, as in the server; False for a caller that steps the
    # engine itself (the fidelity harness: `Engine.step(only=...)` per policy)
    threaded: bool = True

    def __post_init__(self) -> None:
        if self.reuse_policy is not None:
            make_policy(self.reuse_policy)  # ValueError naming the known policies
        object.__setattr__(self, "data_dir", Path(self.data_dir))


def build_service(settings: ServiceSettings, runner: KVRunner | None = None) -> RagService:
    """Load the model (or take `runner`, e.g. a tensor-parallel one), start the engine thread unless
    `settings.threaded` is off, and open the service over `settings.data_dir` (created if absent)."""
    from redknot_rag.engine import Engine
    from redknot_rag.heads import load_profile_for
    from redknot_rag.rag.service import RagService

    engine = Engine(settings.engine, runner=runner)
    if settings.threaded:
        engine.start()
    store = settings.store
    r = engine.runner
    if settings.store_for_model is not None:
        store = settings.store_for_model(r, load_profile_for(r.name, r.weights_fingerprint))
    elif settings.local_heads_from_profile:
        profile = load_profile_for(r.name, r.weights_fingerprint)
        if profile is None:
            raise ValueError("--store-local-heads profile needs a head profile for this model (redknot profile-heads)")
        store = dataclasses.replace(store, heads=HeadCompression.from_profile(profile))
    return RagService(
        engine,
        settings.data_dir,
        settings.reuse_policy,
        chunk_tokens=settings.chunk_tokens,
        store_config=store,
        max_document_tokens=settings.max_document_tokens,
    )
