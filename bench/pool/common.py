"""Shared by the pool benchmarks: the 8B shape's SYNTHETIC head profile and the machine's name."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import torch

SYNTH_SINK, SYNTH_WINDOW = 64, 1024  # synthetic profile: local heads keep 64 sink + the last 1024 tokens

# bench/engine/common.py (a module of the same file name, so loaded by path): the random-weight builders and
# the one SYNTHETIC head profile (25% of each layer's kv heads global) that bench/rag_gpu draws too
_path = Path(__file__).resolve().parents[1] / "engine" / "common.py"
_spec = importlib.util.spec_from_file_location("engine_common", _path)
assert _spec is not None and _spec.loader is not None
engine_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_common)
synthetic_local = engine_common.synthetic_local


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
