"""Shared fixtures: one loaded default model per test session (loading takes seconds); shared helpers
(`from conftest import ...`: pytest puts tests/ on sys.path, spawned ranks inherit it)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every POST route that takes a JSON body (the served spec declares each; each answers bad JSON with 400).
POST_ROUTES = (
    "/generate",
    "/abort_request",
    "/v1/completions",
    "/v1/chat/completions",
    "/query",
    "/retrieve",
    "/ingest",
)


def alternating_profile(runner: Any, window: int = 8) -> Any:
    """A `HeadProfile` for the runner's model with even KV heads local (`window`) and odd ones global, in
    every layer (under TP=2 on tiny-gqa they land on different ranks: the full model's heads, not the rank's)."""
    from redknot_rag.heads import HeadProfile

    mc = runner.full_config if hasattr(runner, "full_config") else runner.model_config
    grid = [[float(h) for h in range(mc.num_kv_heads)] for _ in range(mc.num_layers)]  # [L][Hkv]
    return HeadProfile(
        model=runner.name,
        weights_fingerprint=runner.weights_fingerprint,
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        window=window,
        locality_threshold=0.5,
        classes=[[h % 2 for h in range(mc.num_kv_heads)] for _ in range(mc.num_layers)],  # LOCAL = 0
        locality=grid,
        reuse_deviation=grid,
        retrieval=grid,
        calibration={},
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def loaded_default():
    """The embedded default model (SmolLM2-135M-Instruct), fp32 on CPU. Do not mutate its weights."""
    from redknot_rag.loader import load_model

    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def engine(loaded_default):
    """A CPU engine on the default model, driven synchronously (no loop thread)."""
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine

    return Engine(EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.5), loaded=loaded_default)


@pytest.fixture(scope="session")
def hf_default():
    """transformers' own model for the default checkpoint: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    from redknot_rag.loader import resolve_model_dir

    path, _, _ = resolve_model_dir(None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
