"""Our own forward for the Llama family (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2, Qwen3) and Gemma 3.

Weights come from `loader.load_model` (HF parameter names). Attention goes through a backend
over head-granular pages; K is written pre-RoPE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from redknot_rag.attention import AttentionBackend
from redknot_rag.batch import ForwardBatch
from redknot_rag.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """HF semantics. Llama (offset 0): normalize in float32, scale by `weight` after casting
    back. Gemma (offset 1): scale by `1 + weight` in float32, then cast."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(dtype)
    return weight * xf.to(dtype)


_ACTS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    mlp_norm: torch.Tensor  # before the MLP (Llama's post_attention_layernorm)
    gate_up: torch.Tensor  # [2 * inter, hidden]
    down: torch.Tensor
    attn_out_norm: torch.Tensor | None = None  # sandwich norms (Gemma): on each sublayer's output
    mlp_out_norm: torch.Tensor | None = None


class CausalLM:
    """Forward over a ForwardBatch: `forward(batch, backend) → logits [M, vocab]` for `batch.logit_rows`.

    Under tensor parallelism (`redknot_rag.tp`) `cfg` is this rank's shard (its q/KV heads and
    intermediate columns) and `reduce` sums the row-parallel o/down outputs `[N, hidden]` over ranks;
    with one rank `reduce` is None and no collective runs.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reduce = reduce
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
            if cfg.is_sandwich_norm:  # Gemma: post_attention_layernorm normalizes the attention output
                mlp_norm, attn_out = w[p + "pre_feedforward_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
                mlp_out: torch.Tensor | None = w[p + "post_feedforward_layernorm.weight"]
            else:
                mlp_norm, attn_out, mlp_out = w[p + "post_attention_layernorm.weight"], None, None
            self.layers.append(
                LayerWeights(
                    input_norm=w[p + "input_layernorm.weight"],
                    qkv=torch.cat([w.pop(a + "q_proj.weight"), w.pop(a + "k_proj.weight"), w.pop(a + "v_proj.weight")]),
                    qkv_bias=bias,
                    q_norm=w.get(a + "q_norm.weight") if cfg.qk_norm else None,
                    k_norm=w.get(a + "k_norm.weight") if cfg.qk_norm else None,
                    o=w[a + "o_proj.weight"],
                    mlp_norm=mlp_norm,
                    gate_up=torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")]),
                    down=w[p + "mlp.down_proj.weight"],
                    attn_out_norm=attn_out,
                    mlp_out_norm=mlp_out,
                )
            )
        self.dtype = self.embed.dtype
        self.device = self.embed.device

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        attn: AttentionBackend,
        num_layers: int | None = None,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits `[M, vocab]` float32 of `batch.logit_rows`; with `num_layers`, run only the first
        `num_layers` layers (their KV is written) and return an empty tensor. `before_layer(i)` runs
        before layer i touches the KV pool (the runner's wait for pool writes still in flight)."""
        cfg = self.cfg
        n = batch.num_tokens
        hq, hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        eps, off = cfg.rms_norm_eps, cfg.norm_weight_offset
        act = _ACTS[cfg.hidden_act]
        attn.plan(batch)
        x = self.embed[batch.input_ids.to(self.device)]  # [N, hidden]
        if cfg.embed_scale != 1.0:  # Gemma: the scale is rounded to the weights' dtype, as in HF
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        for li, lw in enumerate(self.layers[:num_layers]):
            h = rms_norm(x, lw.input_norm, eps, off)
            qkv = F.linear(h, lw.qkv, lw.qkv_bias)  # [N, (Hq + 2Hkv) * D]
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q = q.view(n, hq, d)
            k = k.view(n, hkv, d)
            v = v.view(n, hkv, d)
            if lw.q_norm is not None and lw.k_norm is not None:
                q = rms_norm(q, lw.q_norm, eps, off)
                k = rms_norm(k, lw.k_norm, eps, off)
            if before_layer is not None:
                before_layer(li)
            attn.write_kv(li, k, v)
            o = F.linear(attn.run(li, q).reshape(n, hq * d), lw.o)  # [N, Hq, D] -> [N, hidden]
            if self.reduce is not None:  # row-parallel o: partial sums over this rank's heads
                o = self.reduce(o)
            x = x + (rms_norm(o, lw.attn_out_norm, eps, off) if lw.attn_out_norm is not None else o)
            h = rms_norm(x, lw.mlp_norm, eps, off)
            gate, up = F.linear(h, lw.gate_up).chunk(2, dim=-1)
            m = F.linear(act(gate) * up, lw.down)  # [N, hidden]
            if self.reduce is not None:  # row-parallel down: partial sums over this rank's columns
                m = self.reduce(m)
            x = x + (rms_norm(m, lw.mlp_out_norm, eps, off) if lw.mlp_out_norm is not None else m)
        if num_layers is not None and num_layers < cfg.num_layers:
            return torch.zeros(0, cfg.vocab_size)
        rows = batch.logit_rows.to(self.device)
        x = rms_norm(x[rows], self.norm, eps, off)
        logits = F.linear(x, self.lm_head).float()  # [M, vocab]
        if cfg.final_logit_softcapping is not None:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
