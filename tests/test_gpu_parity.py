"""GPU: our forward's logits against transformers for Llama-3-8B and Qwen3-8B shapes (2 layers, random
bf16 weights, the same tensors in both), every available attention backend. The full-size numbers
come from bench/engine (`--gpu`)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SMALL = dict(num_hidden_layers=2, vocab_size=32000)
LLAMA = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
QWEN3 = dict(
    hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rope_theta=1000000.0, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip


def _backends() -> list[str]:
    out = ["triton", "torch"]
    try:
        import flashinfer  # noqa: F401

        out.insert(0, "flashinfer")
    except ImportError:
        pass
    return out


def _hf(arch: str, kw: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[arch]
    cfg = cls(**kw, **SMALL, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def _ours(hf, backend: str):
    from redknot_rag.config import EngineConfig, ModelConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import LoadedModel

    weights = dict(hf.state_dict().items())
    loaded = LoadedModel(ModelConfig.from_hf(hf.config), weights, None, "random", "random")
    return Engine(
        EngineConfig(
            device="cuda", dtype="bfloat16", attention_backend=backend, max_prefill_tokens=512, mem_fraction=0.1
        ),
        loaded=loaded,
    )


def _logits(engine, ids: list[int]) -> torch.Tensor:
    from redknot_rag.batch import ForwardBatch

    kv = engine.runner.new_seq_kv()
    pos = torch.arange(len(ids))
    try:
        slots = engine.runner.append(kv, pos)
        batch = ForwardBatch(torch.tensor(ids), pos, [kv.slice(0, len(ids), slots)], torch.arange(len(ids)))
        return engine.runner.forward(batch).float().cpu()
    finally:
        engine.runner.release(kv)
        assert engine.runner.free_pages == engine.runner.num_pages


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch,kw", [("llama", LLAMA), ("qwen3", QWEN3)], ids=["llama3-8b-shape", "qwen3-8b-shape"])
def test_logits_match_transformers_bf16(arch, kw):
    hf = _hf(arch, kw)
    ids = torch.randint(100, SMALL["vocab_size"], (300,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([ids], device="cuda")).logits[0].float().cpu()
    scale = ref.abs().max().item()
    for backend in _backends():
        got = _logits(_ours(hf, backend), ids)
        diff = (got - ref).abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(
            f"{arch} {backend}: max |diff| {diff:.3e} ({diff / scale:.2%} of max |logit| {scale:.2f}), "
            f"argmax agree {agree:.3f}"
        )
        # bf16 end to end: two rounding paths through 2 layers differ by a few bf16 ulps of the logits
        assert diff < 0.05 * max(scale, 1.0), (backend, diff, scale)
        assert agree > 0.9, (backend, agree)
