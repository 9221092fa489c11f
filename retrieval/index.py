"""Vector index over L2-normalized embeddings, scored by inner product (= cosine).

Below `hnsw_threshold` vectors the index is exact (`IndexFlatIP`); at or above it, HNSW
(`IndexHNSWFlat`, inner product). Both sit inside `IndexIDMap2`, so ids are caller-chosen
int64 (the document DB's chunk row ids) and vectors can be read back for a rebuild. The
kind switches by rebuilding when an add crosses the threshold or a removal drops below it.
HNSW cannot delete, so `remove` rebuilds it without the removed ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

DEFAULT_HNSW_THRESHOLD = 20_000


class VectorIndex:
    """Args:
    dim: vector width.
    hnsw_threshold: vector count from which HNSW replaces the exact index.
    hnsw_m, ef_construction, ef_search: HNSW parameters (`ef_search` is raised to k).
    """

    def __init__(
        self,
        dim: int = 384,
        hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
    ) -> None:
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._index = self._new_index(is_hnsw=False)

    # -- properties --------------------------------------------------------------------

    @property
    def num_vectors(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.num_vectors

    @property
    def is_hnsw(self) -> bool:
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexHNSW)

    def ids(self) -> np.ndarray:
        """All stored ids. Returns [num_vectors] int64."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def __contains__(self, vec_id: int) -> bool:
        return bool(np.isin(np.int64(vec_id), self.ids()))

    # -- mutation ----------------------------------------------------------------------

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add (or replace) vectors. ids: [n] int64; vecs: [n, dim] float32, L2-normalized."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)  # [n]
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(ids), self.dim)  # [n, dim]
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add()")
        if len(ids) == 0:
            return
        existing = np.isin(ids, self.ids())
        if existing.any():
            self.remove(ids[existing])
        if not self.is_hnsw and self.num_vectors + len(ids) >= self.hnsw_threshold:
            all_ids, all_vecs = self._all()
            self._rebuild(np.concatenate([all_ids, ids]), np.concatenate([all_vecs, vecs]))
        else:
            self._index.add_with_ids(vecs, ids)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ids (unknown ids are ignored). Returns the number removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # [n]
        if len(ids) == 0 or self.num_vectors == 0:
            return 0
        if not self.is_hnsw:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        all_ids, all_vecs = self._all()
        keep = ~np.isin(all_ids, ids)
        num_removed = int((~keep).sum())
        if num_removed:
            self._rebuild(all_ids[keep], all_vecs[keep])
        return num_removed

    # -- search ------------------------------------------------------------------------

    def search(self, vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top-k by inner product. vec: [dim] or [1, dim] float32. Returns [(id, score)], best first."""
        return self.search_batch(np.asarray(vec, dtype=np.float32).reshape(1, self.dim), k)[0]

    def search_batch(self, vecs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Top-k for each row of vecs: [q, dim] float32. Returns q lists of (id, score)."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1, self.dim)  # [q, dim]
        if self.num_vectors == 0 or k <= 0:
            return [[] for _ in range(len(vecs))]
        k = min(k, self.num_vectors)
        if self.is_hnsw:
            hnsw: Any = faiss.downcast_index(self._index.index)
            hnsw.hnsw.efSearch = max(self.ef_search, k)
        scores, ids = self._index.search(vecs, k)  # [q, k] each
        return [
            [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write atomically: serialize to a temp file in the same folder, fsync, os.replace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = faiss.serialize_index(self._index)  # [num_bytes] uint8
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(blob.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | Path, **kwargs: int) -> VectorIndex:
        """Read an index written by `save`; kwargs are the constructor's tuning arguments."""
        blob = np.fromfile(str(path), dtype=np.uint8)  # [num_bytes]
        index = faiss.deserialize_index(blob)
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path}: not a VectorIndex file (got {type(index).__name__})")
        self = cls(dim=int(index.d), **kwargs)
        self._index = index
        return self

    # -- internals ---------------------------------------------------------------------

    def _new_index(self, is_hnsw: bool) -> faiss.IndexIDMap2:
        inner: Any
        if is_hnsw:
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
            inner.hnsw.efSearch = self.ef_search
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)  # the python wrapper keeps `inner` alive

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector). Returns ([n] int64, [n, dim] float32)."""
        n = self.num_vectors
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._index.index.reconstruct_n(0, n)  # [n, dim]; storage order == id_map order
        return self.ids(), np.ascontiguousarray(vecs, dtype=np.float32)

    def _rebuild(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        index = self._new_index(is_hnsw=len(ids) >= self.hnsw_threshold)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids.astype(np.int64))
        self._index = index


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
