"""Our own forward for the Llama family (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2, Qwen3).

Weights come from `loader.load_model` (HF parameter names). Attention goes through a backend
over head-granular pages; K is written pre-RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from redknot_rag.attention import AttentionBackend
from redknot_rag.batch import ForwardBatch
from redknot_rag.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF semantics: normalize in float32, scale after casting back."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * inter, hidden]
    down: torch.Tensor


class CausalLM:
    """Forward over a ForwardBatch: `forward(batch, backend) → logits [M, vocab]` for `batch.logit_rows`."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        w = weights
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bias = None
            if cfg.attention_bias:
                bias = torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
            self.layers.append(
                LayerWeights(
                    input_norm=w[p + "input_layernorm.weight"],
                    qkv=torch.cat([w.pop(a + "q_proj.weight"), w.pop(a + "k_proj.weight"), w.pop(a + "v_proj.weight")]),
                    qkv_bias=bias,
                    q_norm=w.get(a + "q_norm.weight") if cfg.qk_norm else None,
                    k_norm=w.get(a + "k_norm.weight") if cfg.qk_norm else None,
                    o=w[a + "o_proj.weight"],
                    post_norm=w[p + "post_attention_layernorm.weight"],
                    gate_up=torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")]),
                    down=w[p + "mlp.down_proj.weight"],
                )
            )
        self.dtype = self.embed.dtype
        self.device = self.embed.device

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: AttentionBackend, num_layers: int | None = None) -> torch.Tensor:
        """Logits `[M, vocab]` float32 of `batch.logit_rows`; with `num_layers`, run only the first
        `num_layers` layers (their KV is written) and return an empty tensor."""
        cfg = self.cfg
        n = batch.num_tokens
        hq, hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        attn.plan(batch)
        x = self.embed[batch.input_ids.to(self.device)]  # [N, hidden]
        for li, lw in enumerate(self.layers[:num_layers]):
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, lw.qkv, lw.qkv_bias)  # [N, (Hq + 2Hkv) * D]
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q = q.view(n, hq, d)
            k = k.view(n, hkv, d)
            v = v.view(n, hkv, d)
            if lw.q_norm is not None and lw.k_norm is not None:
                q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
                k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
            attn.write_kv(li, k, v)
            o = attn.run(li, q)  # [N, Hq, D]
            x = x + F.linear(o.reshape(n, hq * d), lw.o)
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gate, up = F.linear(h, lw.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, lw.down)
        if num_layers is not None and num_layers < cfg.num_layers:
            return torch.zeros(0, cfg.vocab_size)
        rows = batch.logit_rows.to(self.device)
        x = rms_norm(x[rows], self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()  # [M, vocab]
