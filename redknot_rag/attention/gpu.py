"""Registers the GPU attention backends ("triton", "flashinfer") with `redknot_rag.attention`."""

from __future__ import annotations

from . import flashinfer_backend, triton_backend  # noqa: F401  (import registers)
