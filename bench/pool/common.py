"""Shared by the pool benchmarks: the 8B shape's SYNTHETIC head profile and the machine's name."""

from __future__ import annotations

import os
import platform

import torch

GLOBAL_FRACTION = 0.25  # synthetic profile: share of kv heads per layer that stay global
SYNTH_SINK, SYNTH_WINDOW = 64, 1024  # synthetic profile: local heads keep 64 sink + the last 1024 tokens


def synthetic_local(num_layers: int, num_kv_heads: int, seed: int = 0) -> torch.Tensor:
    """A SYNTHETIC head profile `[L, Hkv]` bool (True = local): per layer round(25% of Hkv) (at least one)
    heads global, chosen at random (seeded), as bench/rag_gpu/run.py draws it. Random weights have no
    measured profile; this is the layout DuoAttention reports for GQA models, not a measurement."""
    g = torch.Generator().manual_seed(seed)
    n_glob = max(1, round(GLOBAL_FRACTION * num_kv_heads))
    local = torch.ones(num_layers, num_kv_heads, dtype=torch.bool)
    for layer in range(num_layers):
        local[layer, torch.randperm(num_kv_heads, generator=g)[:n_glob]] = False
    return local


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
