"""`tiny-gqa`: a shipped tiny Llama config with random weights, for tests that need heads that shard.

The default model (SmolLM2-135M) has 3 KV heads, which do not divide over 2 tensor-parallel ranks.
`tiny-gqa` is a 2-layer Llama with 4 q heads over 2 KV heads (head_dim 16, hidden 64, intermediate
128), the default model's tokenizer (so prompts, the RAG layout and the store work unchanged), and
weights drawn from a fixed seed: every machine builds the same bytes, cached as an HF directory
under `~/.cache/redknot/models/tiny-gqa-v2/`. Its text is noise; its logits are a fine oracle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_GQA = "tiny-gqa"
VERSION = "v2"
_SEED = 20261130
_SHAPE: dict[str, int | float] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def _weights(vocab: int) -> dict[str, torch.Tensor]:
    """HF-named float32 weights from `_SEED` (drawn in a fixed order, so the bytes are reproducible)."""
    g = torch.Generator().manual_seed(_SEED)
    h, inter, d = (int(_SHAPE[k]) for k in ("hidden_size", "intermediate_size", "head_dim"))
    hq, hkv = int(_SHAPE["num_attention_heads"]), int(_SHAPE["num_key_value_heads"])

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w = {
        "model.embed_tokens.weight": rnd(vocab, h, std=1.0),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": rnd(vocab, h, std=h**-0.5),
    }
    for i in range(int(_SHAPE["num_hidden_layers"])):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": rnd(hq * d, h, std=h**-0.5),
            p + "self_attn.k_proj.weight": rnd(hkv * d, h, std=h**-0.5),
            p + "self_attn.v_proj.weight": rnd(hkv * d, h, std=h**-0.5),
            p + "self_attn.o_proj.weight": rnd(h, hq * d, std=(hq * d) ** -0.5),
            p + "mlp.gate_proj.weight": rnd(inter, h, std=h**-0.5),
            p + "mlp.up_proj.weight": rnd(inter, h, std=h**-0.5),
            p + "mlp.down_proj.weight": rnd(h, inter, std=inter**-0.5),
        }
    return w


def build_tiny_gqa(out: Path, tokenizer_dir: Path) -> str:
    """The `tiny-gqa` HF directory at `out` (the loader passes its cache path and the default model's
    directory for the tokenizer), built once (atomic rename)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (out / "config.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save_file(_weights(vocab), str(tmp / "model.safetensors"))
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "tie_word_embeddings": False,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "torch_dtype": "float32",
            **_SHAPE,
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return str(out)
