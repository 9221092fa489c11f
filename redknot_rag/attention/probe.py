"""Attention probes: a backend wrapper that also records what the new tokens attend to, per head."""

from __future__ import annotations

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.config import ModelConfig
from redknot_rag.kvcache import KVPool
from redknot_rag.rope import Rotary

from .backend import AttentionBackend
from .torch_backend import TorchBackend


def attention_mass(
    cfg: ModelConfig,
    q: torch.Tensor,
    k_slots: torch.Tensor,
    s: SeqSlice,
    layer: int,
    q_pos: torch.Tensor,
    rotary: Rotary,
) -> torch.Tensor:
    """Attention probabilities of the slice's queries over its kv tokens, summed over queries and the
    GQA group: `[Hkv, T]` float32 (each (query, q head) contributes a distribution summing to 1).

    q `[Tq, Hq, D]` pre-RoPE (the slice's rows), q_pos `[Tq]`; K is gathered from `k_slots` and rotated
    here (one layer's context K, fp32): call it on a few layers, not all, when speed matters.
    """
    hkv = s.kv_slots.shape[1]
    tq, hq, d = q.shape
    g = hq // hkv
    rot = rotary.for_layer(layer)
    k = rot.apply(k_slots[s.kv_slots[layer]].float(), s.kv_pos)  # [Hkv, T, D]
    qr = rot.apply(q.float().transpose(0, 1), q_pos).view(hkv, g, tq, d)  # [Hkv, g, Tq, D]
    scores = torch.einsum("hgqd,htd->hgqt", qr, k) * cfg.attn_scale
    mask = s.kv_pos[None, :] <= q_pos[:, None]  # [Tq, T]
    if cfg.is_sliding(layer):
        assert cfg.sliding_window is not None
        mask = mask & (s.kv_pos[None, :] > q_pos[:, None] - cfg.sliding_window)
    if s.kv_visible is not None:
        mask = (mask[None] & s.kv_visible[layer, :, None, :])[:, None]  # [Hkv, 1, Tq, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).sum(dim=(1, 2))  # [Hkv, T]


class ProbeBackend(AttentionBackend):
    """Runs `inner` (default: the torch reference) and records, for the first slice of a batch
    and for `layers` (None: all), the attention mass of its queries over its kv tokens:
    `attn[i]` `[Hkv, T]` float32 for layer `layers[i]` (see `attention_mass`), and the slice's outputs
    `outputs[i]` `[Tq, Hq, D]` float32."""

    name = "probe"

    def __init__(
        self,
        cfg: ModelConfig,
        pool: KVPool,
        rotary: Rotary,
        inner: AttentionBackend | None = None,
        layers: list[int] | None = None,
    ) -> None:
        super().__init__(cfg, pool, rotary)
        self.inner = inner if inner is not None else TorchBackend(cfg, pool, rotary)
        self.layers = list(range(cfg.num_layers)) if layers is None else sorted(layers)
        self._probed = set(self.layers)
        self.attn: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._slice: SeqSlice | None = None
        self._q_pos: torch.Tensor | None = None

    def plan(self, batch: ForwardBatch) -> None:
        self.inner.plan(batch)
        self.attn, self.outputs = [], []
        self._slice = batch.seqs[0] if batch.seqs else None  # a 1-token question is a probe too
        if self._slice is not None:
            s = self._slice
            self._q_pos = batch.positions[s.q_start : s.q_start + s.q_len].to(self.pool.device)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.inner.write_kv(layer, k, v)

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        out = self.inner.run(layer, q)
        s = self._slice
        if s is None or layer not in self._probed:
            return out
        assert self._q_pos is not None
        rows = slice(s.q_start, s.q_start + s.q_len)
        self.attn.append(attention_mass(self.cfg, q[rows], self.pool.k_slots, s, layer, self._q_pos, self.rotary))
        self.outputs.append(out[rows].float().clone())  # [Tq, Hq, D]
        return out
