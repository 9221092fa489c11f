"""Attention backends behind one interface: plan once per batch, run per layer.

Backends read pre-RoPE K from head-granular pages and rotate it (and q) from explicit positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

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
        self.pool = pool
        self.rotary = rotary

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store pre-RoPE k and v `[N, Hkv, D]` of the batch's new tokens into their page slots."""

    @abstractmethod
    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q `[N, Hq, D]` pre-RoPE → attention output `[N, Hq, D]`."""


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
    """A registered backend by name (GPU backends register when `redknot_rag.kernels.backends` imports;
    `runner.load_backend` does that import, so this module never imports the kernels)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](cfg, pool, rotary)


@register_backend("torch")
class TorchBackend(AttentionBackend):
    """Reference backend (CPU and GPU, any shape): gathers K/V slots, rotates K, masks by position.

    Sliding-window layers (Gemma 3) mask by position too: a query at position p sees keys with
    p - sliding_window < position <= p, wherever the keys sit in the pages (reused chunks included)."""

    def plan(self, batch: ForwardBatch) -> None:
        cfg, dev = self.cfg, self.pool.device
        self.new_slots = batch.new_slots().to(dev)  # [L, Hkv, N]
        self.q_pos = batch.positions.to(dev)
        dec = [s for s in batch.seqs if s.is_decode]
        self.prefills = [s for s in batch.seqs if not s.is_decode]
        self.dec_rows = torch.tensor([s.q_start for s in dec], dtype=torch.int64, device=dev)
        if dec:
            tmax = max(s.num_kv for s in dec)
            b = len(dec)
            slots = torch.zeros(cfg.num_layers, b, cfg.num_kv_heads, tmax, dtype=torch.int64, device=dev)
            kpos = torch.zeros(b, tmax, dtype=torch.int64, device=dev)
            mask = torch.zeros(cfg.num_layers, b, cfg.num_kv_heads, tmax, dtype=torch.bool, device=dev)
            for i, s in enumerate(dec):
                t = s.num_kv
                slots[:, i, :, :t] = s.kv_slots
                kpos[i, :t] = s.kv_pos
                mask[:, i, :, :t] = True if s.kv_visible is None else s.kv_visible
            self.dec_slots, self.dec_kpos, self.dec_mask = slots, kpos, mask

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self.new_slots[layer]  # [Hkv, N]
        self.pool.k_slots[slots] = k.transpose(0, 1).to(self.pool.dtype)  # [Hkv, N, D]
        self.pool.v_slots[slots] = v.transpose(0, 1).to(self.pool.dtype)

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        hkv, g, d = cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        rotary = self.rotary.for_layer(layer)
        window = cfg.sliding_window if cfg.is_sliding(layer) else None
        q = rotary.apply(q.transpose(0, 1), self.q_pos).transpose(0, 1)  # [N, Hq, D]
        out = torch.empty_like(q)
        scale = cfg.attn_scale
        if self.dec_rows.numel():
            b = self.dec_rows.shape[0]
            slots = self.dec_slots[layer]  # [B, Hkv, T]
            k = self.pool.k_slots[slots].to(q.dtype)  # [B, Hkv, T, D]
            v = self.pool.v_slots[slots].to(q.dtype)
            k = rotary.apply(k, self.dec_kpos[:, None, :])
            qd = q[self.dec_rows].view(b, hkv, g, d)  # [B, Hkv, g, D]
            scores = torch.einsum("bhgd,bhtd->bhgt", qd, k).float() * scale
            mask = self.dec_mask[layer]  # [B, Hkv, T]
            if window is not None:
                in_window = self.dec_kpos > self.q_pos[self.dec_rows][:, None] - window  # [B, T]
                mask = mask & in_window[:, None, :]
            scores.masked_fill_(~mask[:, :, None, :], float("-inf"))
            probs = scores.softmax(-1).to(v.dtype)
            out[self.dec_rows] = torch.einsum("bhgt,bhtd->bhgd", probs, v).reshape(b, hkv * g, d)
        for s in self.prefills:
            slots = s.kv_slots[layer]  # [Hkv, T]
            kpos = s.kv_pos
            k = rotary.apply(self.pool.k_slots[slots].to(q.dtype), kpos)  # [Hkv, T, D]
            v = self.pool.v_slots[slots].to(q.dtype)
            rows = slice(s.q_start, s.q_start + s.q_len)
            qpos = self.q_pos[rows]
            mask = kpos[None, :] <= qpos[:, None]  # [Tq, T]
            if window is not None:
                mask = mask & (kpos[None, :] > qpos[:, None] - window)
            mask = mask[None].expand(hkv, -1, -1)  # [Hkv, Tq, T]
            if s.kv_visible is not None:
                mask = mask & s.kv_visible[layer, :, None, :]
            qs = q[rows].view(s.q_len, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, Tq, D]
            o = F.scaled_dot_product_attention(
                qs, k[:, None], v[:, None], attn_mask=mask[:, None], scale=scale
            )  # [Hkv, g, Tq, D]
            out[rows] = o.permute(2, 0, 1, 3).reshape(s.q_len, hkv * g, d)
        return out
