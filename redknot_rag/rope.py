"""Rotary position embedding from explicit token positions (K is stored pre-RoPE; see DESIGN.md)."""

from __future__ import annotations

import math

import torch

from redknot_rag.config import ModelConfig


def inv_freq(cfg: ModelConfig, device: torch.device | str = "cpu", *, is_local: bool = False) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` float32, llama3 scaling applied (same arithmetic as HF).
    `is_local`: the sliding-window layers' table (base `rope_local_theta`, never scaled)."""
    dim = cfg.head_dim
    theta = cfg.rope_local_theta if is_local and cfg.rope_local_theta is not None else cfg.rope_theta
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    sc = cfg.rope_scaling
    if sc.kind == "llama3" and not is_local:
        low_wavelen = sc.original_max_position / sc.low_freq_factor
        high_wavelen = sc.original_max_position / sc.high_freq_factor
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / sc.factor, freqs)
        smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        freqs = torch.where(is_medium, smoothed, scaled)
    return freqs


class Rotary:
    """cos/sin tables indexed by position; grows on demand. Tables are `[max_pos, head_dim]` float32.

    A model whose sliding-window layers use their own RoPE base (Gemma 3) gets a second table;
    `for_layer(i)` is the one layer i rotates with (`self` for every layer of a Llama)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", *, is_local: bool = False) -> None:
        self.inv_freq = inv_freq(cfg, device, is_local=is_local)
        self.device = torch.device(device)
        self._cos = torch.empty(0, cfg.head_dim, device=device)
        self._sin = torch.empty(0, cfg.head_dim, device=device)
        self._layer_rotary: list[Rotary] = []
        if not is_local and cfg.has_sliding_layers and cfg.rope_local_theta not in (None, cfg.rope_theta):
            local = Rotary(cfg, device, is_local=True)
            self._layer_rotary = [local if cfg.is_sliding(i) else self for i in range(cfg.num_layers)]

    @property
    def is_per_layer(self) -> bool:
        """True when some layers rotate with another table than `self` (see `for_layer`)."""
        return bool(self._layer_rotary)

    def for_layer(self, layer: int) -> Rotary:
        return self._layer_rotary[layer] if self._layer_rotary else self

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self._cos.shape[0], 4096)
        pos = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [n, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [n, D]
        self._cos, self._sin = emb.cos(), emb.sin()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: any int shape `[...]` → (cos, sin) `[..., head_dim]` in `dtype`."""
        if positions.numel() and int(positions.max()) >= self._cos.shape[0]:
            self._grow(int(positions.max()) + 1)
        return self._cos[positions].to(dtype), self._sin[positions].to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x` `[..., T, D]` (any leading dims) by `positions` broadcastable to `[..., T]`."""
        cos, sin = self.cos_sin(positions, x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
