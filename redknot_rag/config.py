"""Frozen configuration objects: what the model is, and how the engine runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default" or "llama3" (Llama 3.1 long-context scaling)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. `num_kv_groups = num_q_heads // num_kv_heads` (GQA)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_kv_groups(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def num_kv_blocks(self) -> int:
        """(layer, kv_head) blocks: the unit of KV management."""
        return self.num_layers * self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig of a supported architecture."""
        arch = getattr(hf, "model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        rope_params = dict(getattr(hf, "rope_parameters", None) or {})
        legacy = getattr(hf, "rope_scaling", None)
        if legacy and not rope_params.get("rope_type"):
            rope_params.update(legacy)
        theta = float(rope_params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        kind = rope_params.get("rope_type", rope_params.get("type", "default")) or "default"
        if kind not in ("default", "llama3"):
            raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: default, llama3)")
        scaling = RopeScaling()
        if kind == "llama3":
            scaling = RopeScaling(
                kind="llama3",
                factor=float(rope_params["factor"]),
                low_freq_factor=float(rope_params["low_freq_factor"]),
                high_freq_factor=float(rope_params["high_freq_factor"]),
                original_max_position=int(rope_params["original_max_position_embeddings"]),
            )
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            arch=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_q_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=theta,
            max_position=int(getattr(hf, "max_position_embeddings", 4096)),
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)) or arch == "qwen2",
            qk_norm=arch == "qwen3",
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Page budget: on CPU `cpu_kv_gib`; on GPU `mem_fraction` of free memory."""

    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    page_size: int = 16
    attention_backend: str = "auto"
    cpu_kv_gib: float = 1.0
    mem_fraction: float = 0.85
    max_running_requests: int = 64
    max_prefill_tokens: int = 1024
    max_queued_requests: int = 4096
    seed: int = 0
