"""Attention probes: a torch backend that also records what the new tokens attend to, per head."""

from __future__ import annotations

import torch

from redknot_rag.attention import TorchBackend
from redknot_rag.batch import ForwardBatch


class ProbeBackend(TorchBackend):
    """TorchBackend that records, for the first prefill slice of a batch, the attention probabilities
    of its query tokens over the sequence's kv tokens, summed over queries and over the GQA group:
    `attn[layer]` `[Hkv, T]` float32 (each query row sums to 1 per q head)."""

    name = "probe"

    def plan(self, batch: ForwardBatch) -> None:
        super().plan(batch)
        self.attn: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        out = super().run(layer, q)
        if not self.prefills:
            return out
        s = self.prefills[0]
        cfg = self.cfg
        hkv, g, d = cfg.num_kv_heads, cfg.num_kv_groups, cfg.head_dim
        t = s.kv.num_tokens
        dev = self.pool.device
        slots = s.kv.slots[layer, :, :t].to(dev)  # [Hkv, T]
        kpos = s.kv.positions[:t].to(dev)
        rotary = self.rotary.for_layer(layer)
        k = rotary.apply(self.pool.k_slots[slots].float(), kpos)  # [Hkv, T, D]
        rows = slice(s.q_start, s.q_start + s.q_len)
        qpos = self.q_pos[rows]
        qr = rotary.apply(q[rows].float().transpose(0, 1), qpos).view(hkv, g, s.q_len, d)  # [Hkv, g, Tq, D]
        scores = torch.einsum("hgqd,htd->hgqt", qr, k) * cfg.attn_scale
        mask = kpos[None, :] <= qpos[:, None]  # [Tq, T]
        if cfg.is_sliding(layer):
            assert cfg.sliding_window is not None
            mask = mask & (kpos[None, :] > qpos[:, None] - cfg.sliding_window)
        if s.kv.visible is not None:
            mask = mask[None] & s.kv.visible[layer, :, None, :t].to(dev)  # [Hkv, Tq, T]
            mask = mask[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        self.attn.append(scores.softmax(-1).sum(dim=(1, 2)))  # [Hkv, T]
        self.outputs.append(out[rows].float().clone())  # [Tq, Hq, D]
        return out
