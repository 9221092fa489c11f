"""Frozen configuration objects: what the model is, and how the engine runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_HIDDEN_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


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
    """Shape of a Llama-family or Gemma-3 decoder. `num_kv_groups = num_q_heads // num_kv_heads` (GQA).

    Gemma 3 differs from Llama in the fields after `eos_token_ids` (Llama's defaults leave them
    off): RMSNorm scales by `(norm_weight_offset + w)`, embeddings are multiplied by
    `embed_scale`, the MLP gate is gelu-tanh, each sublayer's output is normalized again
    (`is_sandwich_norm`), q is scaled by `query_pre_attn_scalar ** -0.5`, and `layer_types`
    marks sliding-window layers, which see only keys with position > q position - sliding_window
    and rotate with `rope_local_theta`.
    """

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
    norm_weight_offset: float = 0.0
    embed_scale: float = 1.0
    hidden_act: str = "silu"  # "silu" or "gelu_tanh"
    is_sandwich_norm: bool = False
    query_pre_attn_scalar: float | None = None  # None: head_dim
    layer_types: tuple[str, ...] = ()  # per layer "full" or "sliding"; () = all full
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers; None: rope_theta
    final_logit_softcapping: float | None = None

    @property
    def num_kv_groups(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        """Softmax scale of q·k."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding" in self.layer_types

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

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
        local_theta = None
        if "full_attention" in rope_params:  # per layer type (Gemma 3)
            local_theta = float(rope_params.get("sliding_attention", {}).get("rope_theta", 10000.0))
            rope_params = dict(rope_params["full_attention"])
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
        is_gemma = arch == "gemma3_text"
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
        if act not in _HIDDEN_ACTS:
            raise ValueError(f"unsupported activation {act!r} (supported: {', '.join(_HIDDEN_ACTS)})")
        if getattr(hf, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit softcapping is not supported by our attention backends")
        if getattr(hf, "use_bidirectional_attention", False):
            raise ValueError("bidirectional attention is not supported")
        kinds = {"full_attention": "full", "sliding_attention": "sliding"}
        hf_types = tuple(getattr(hf, "layer_types", None) or ())
        if any(t not in kinds for t in hf_types):
            raise ValueError(f"unsupported layer types {sorted(set(hf_types) - kinds.keys())}")
        layer_types = tuple(kinds[t] for t in hf_types)
        window = getattr(hf, "sliding_window", None) if "sliding" in layer_types else None
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
            qk_norm=arch in ("qwen3", "gemma3_text"),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
            norm_weight_offset=1.0 if is_gemma else 0.0,
            embed_scale=float(hf.hidden_size) ** 0.5 if is_gemma else 1.0,
            hidden_act=_HIDDEN_ACTS[act],
            is_sandwich_norm=is_gemma,
            query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None),
            layer_types=layer_types,
            sliding_window=int(window) if window is not None else None,
            rope_local_theta=local_theta if "sliding" in layer_types else None,
            final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
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
    # decode-only steps replay CUDA graphs (CUDA, flashinfer/triton backends); their static page tables
    # cover `cuda_graph_context` tokens per running sequence; a larger decode batch runs eagerly
    cuda_graphs: bool = True
    cuda_graph_context: int = 8192
    # one-sequence prefill steps of <= 128 new tokens at the tail of a page-aligned sequence (a question
    # after naive reuse, a short prompt) replay CUDA graphs too (flashinfer backend, under `cuda_graphs`)
    cuda_graph_prefill: bool = True
    # per-head windows in the KV pool (redknot_rag/window.py): auto | profile | architecture | off
    pool_local_heads: str = "auto"
