"""The torch reference backend: CPU and GPU, any shape; every other backend is tested against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from redknot_rag.batch import ForwardBatch

from .backend import AttentionBackend, register_backend


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
