"""Attention backends behind one interface: plan once per batch, run per layer.

Backends read pre-RoPE K from head-granular pages and rotate it (and q) from explicit positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from redknot_rag.batch import ForwardBatch
from redknot_rag.config import ModelConfig
from redknot_rag.kvcache import KVPool
from redknot_rag.rope import Rotary


class AttentionBackend(ABC):
    """`plan(batch)` once per step; `write_kv` + `run` per layer. Shapes: q `[N, Hq, D]`, k/v `[N, Hkv, D]`."""

    name: str = "base"
    path: str = "base"  # what the last plan() chose (backends with several kernel paths update it)

    def __init__(self, cfg: ModelConfig, pool: KVPool, rotary: Rotary) -> None:
        self.cfg = cfg
        self.pool = pool  # the runner's pool: the pages this backend writes (`write_kv`) and reads (`run`)
        self.rotary = rotary
        self.page_size = pool.page_size  # geometry for planners and graph runners, which need no pages
        self.device = pool.device

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store pre-RoPE k and v `[N, Hkv, D]` of the batch's new tokens into their page slots."""

    @abstractmethod
    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q `[N, Hq, D]` pre-RoPE → attention output `[N, Hq, D]`."""

    # CUDA-graph hooks (decode). The runner's graph capture reaches a backend's metadata only through
    # these: it owns the graphs, the backend owns the static buffers its kernels read.
    def init_capture_graph(self, bs: int, max_kv_tokens: int) -> Any:
        """Static metadata for decode batches of up to `bs` sequences over at most `max_kv_tokens`
        keys per layer (summed over sequences and kv heads)."""
        raise NotImplementedError(f"the {self.name} attention backend has no CUDA-graph decode")

    def prepare_for_capture(self, state: Any) -> None:
        """Make `write_kv`/`run` read `state`'s static buffers (before capture and each replay)."""
        raise NotImplementedError(f"the {self.name} attention backend has no CUDA-graph decode")

    def prepare_for_replay(self, state: Any, batch: ForwardBatch) -> bool:
        """Copy a real decode batch's metadata into `state` and read it; False: it does not fit
        (nothing installed; the caller runs the step eagerly)."""
        raise NotImplementedError(f"the {self.name} attention backend has no CUDA-graph decode")


def require_uniform_layers(cfg: ModelConfig, backend: str) -> None:
    """Raise for models a backend cannot run yet: sliding-window layers with their own RoPE table,
    or a softmax scale other than head_dim ** -0.5 (Gemma 3). The torch and triton backends run them."""
    if cfg.has_sliding_layers or abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-12:
        raise NotImplementedError(
            f"the {backend} attention backend does not support sliding-window layers or query_pre_attn_scalar "
            "yet; use attention_backend='torch' or 'triton'"
        )


_REGISTRY: dict[str, Callable[[ModelConfig, KVPool, Rotary], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def deco(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        _REGISTRY[name] = cls
        cls.name = name
        cls.path = name
        return cls

    return deco


def create_backend(name: str, cfg: ModelConfig, pool: KVPool, rotary: Rotary) -> AttentionBackend:
    """A registered backend by name (GPU backends register when `redknot_rag.attention.gpu` imports;
    `runner.load_backend` does that import, so this module never imports triton or flashinfer)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](cfg, pool, rotary)
