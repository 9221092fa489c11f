"""Attention backends behind one interface (`backend`), the torch reference (`torch_backend`), the GPU
backends with their planners beside them (`flashinfer_*`, `triton_*`, registered by importing `gpu`) and
the attention probe (`probe`). Kernels they launch live in `redknot_rag.kernels` and import nothing from here.
"""

from .backend import AttentionBackend, create_backend, register_backend, require_uniform_layers
from .torch_backend import TorchBackend

__all__ = ["AttentionBackend", "TorchBackend", "create_backend", "register_backend", "require_uniform_layers"]
