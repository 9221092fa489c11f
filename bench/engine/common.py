"""Helpers shared by the engine and RAG GPU benchmarks: random-weight model shapes, a stand-in
tokenizer, timing, and our engine over given weights."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

# Llama-3-8B and Qwen3-8B shapes (HF config kwargs); `tiny` variants run the same code on a CPU.
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32,
)  # fmt: skip


def shape(base: dict, tiny: bool) -> dict:
    return base | TINY if tiny else dict(base)


def card() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else ("H100" if "H100" in name else name.replace(" ", "_"))


def sync(dev: torch.device | str) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib_allocated() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class StubTokenizer:
    """Random-weight models have no tokenizer; the engine only decodes ids for streamed text."""

    eos_token_id = None
    all_special_tokens: list[str] = []

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {}


def hf_random_model(arch: str, kw: dict, dtype: torch.dtype, device: str) -> Any:
    """A transformers model (`arch` "llama" | "qwen3") with random init, built directly on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[arch]
    cfg = cls(**kw, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def engine_from_weights(hf_config: Any, weights: dict[str, torch.Tensor], name: str, **engine_kw: Any) -> Any:
    """Our Engine over the given HF-named weights (shared storage, no copy beyond the fused QKV and
    gate/up matrices the model builds). The loaded dict is emptied afterwards so its unfused
    originals are freed once the caller drops them."""
    from redknot_rag.config import EngineConfig, ModelConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import LoadedModel

    mc = ModelConfig.from_hf(hf_config) if not hasattr(hf_config, "num_kv_groups") else hf_config
    loaded = LoadedModel(mc, weights, StubTokenizer(), name, f"random:{name}")
    engine = Engine(EngineConfig(**engine_kw), loaded=loaded)
    loaded.weights = {}
    return engine


def prefill_logits(engine: Any, ids: list[int], backend: Any = None) -> torch.Tensor:
    """Our forward over one fresh sequence: logits `[T, vocab]` float32 (on the engine's device)."""
    from redknot_rag.batch import ForwardBatch

    kv = engine.runner.new_seq_kv()
    pos = torch.arange(len(ids))
    try:
        slots = engine.runner.append(kv, pos)
        batch = ForwardBatch(torch.tensor(ids), pos, [kv.slice(0, len(ids), slots)], torch.arange(len(ids)))
        return engine.runner.model.forward(batch, backend or engine.runner.backend)
    finally:
        engine.runner.release(kv)


def parity(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    diff = (ours - ref).abs()
    ref_max = ref.abs().max().item()
    return dict(
        max_abs_diff=diff.max().item(),
        mean_abs_diff=diff.mean().item(),
        max_abs_logit=ref_max,
        rel_to_max_logit=diff.max().item() / max(ref_max, 1e-12),
        argmax_agreement=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    )


def available_backends(device: torch.device) -> list[str]:
    """Attention backends that run here: flashinfer and triton need CUDA (and FlashInfer installed)."""
    out = []
    if device.type == "cuda":
        try:
            from redknot_rag.attention.flashinfer_backend import import_flashinfer

            import_flashinfer()
            out.append("flashinfer")
        except ImportError:
            pass
        out.append("triton")
    out.append("torch")
    return out


class Timer:
    """`with Timer(dev) as t:` → `t.s` seconds of wall time, device synchronized at both ends."""

    def __init__(self, dev: torch.device | str) -> None:
        self.dev = dev
        self.s = 0.0

    def __enter__(self) -> Timer:
        sync(self.dev)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.dev)
        self.s = time.perf_counter() - self.t0


SYNTH_GLOBAL_FRACTION = 0.25  # synthetic head profile: share of kv heads per layer that stay global


def synthetic_local(num_layers: int, num_kv_heads: int, seed: int = 0) -> torch.Tensor:
    """A SYNTHETIC head profile `[L, Hkv]` bool (True = local): per layer round(25% of Hkv) (at least one)
    heads global, chosen at random (seeded) so the local heads differ from layer to layer. Random weights
    have no measured profile; this is the layout DuoAttention reports for GQA models, not a measurement
    (bench/rag_gpu and bench/pool use it)."""
    g = torch.Generator().manual_seed(seed)
    n_glob = max(1, round(SYNTH_GLOBAL_FRACTION * num_kv_heads))
    local = torch.ones(num_layers, num_kv_heads, dtype=torch.bool)
    for layer in range(num_layers):
        local[layer, torch.randperm(num_kv_heads, generator=g)[:n_glob]] = False
    return local
