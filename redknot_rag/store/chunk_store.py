"""ChunkKVStore: stored chunk KV, head-decomposed, over a memory tier and a durable cold tier.

Invariants:
- Every block the store returns was written under this store's fingerprint and passed its
  checksum; a mismatch or a corrupt block is a miss (the bad file is quarantined), never a reuse.
- The memory tier caches the cold tier: memory ⊆ cold. A chunk is stored iff the cold tier holds
  it; evicting from memory never loses a chunk, evicting or deleting from cold drops it from memory.
- Placement decisions are per (chunk, layer, head) block, so head-aware policies can keep only
  some heads hot.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from redknot_rag.store.blockfile import CorruptChunkError
from redknot_rag.store.disk import DiskTier
from redknot_rag.store.fingerprint import KVFingerprint, dtype_name
from redknot_rag.store.tiers import BlockKey, ChunkShape, ColdTier, KVBlock, MemoryTier

log = logging.getLogger(__name__)

_SHAPE_CACHE = 1 << 16


@dataclass(frozen=True)
class ChunkKV:
    """Requested blocks of one chunk: `k`, `v` `[L', H', T, D]` for `layers` × `heads`, pre-RoPE K."""

    k: torch.Tensor
    v: torch.Tensor
    num_tokens: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]


@dataclass(frozen=True)
class StoreStats:
    memory_bytes: int
    memory_blocks: int
    cold_bytes: int
    cold_chunks: int
    hits: int  # get() calls answered
    misses: int  # get() calls that returned None (absent, other fingerprint, corrupt)
    memory_block_hits: int
    cold_block_reads: int
    corrupt: int
    memory_evictions: int  # blocks
    cold_evictions: int  # chunks


class ChunkKVStore:
    """Chunk KV store: `put` K, V `[L, H, T, D]`; `get` any subset of (layer, head) blocks.

    `device` is where the memory tier keeps blocks and where `get` returns them ("cpu" is pinned
    when CUDA is present). `cold` replaces the default `DiskTier(root, ...)` (e.g. a RedisTier).
    """

    def __init__(
        self,
        root: Path | str,
        fingerprint: KVFingerprint,
        memory_budget_bytes: int,
        disk_budget_bytes: int | None = None,
        device: torch.device | str = "cpu",
        cold: ColdTier | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.dtype = fingerprint.torch_dtype
        self.device = torch.device(device)
        self.memory = MemoryTier(memory_budget_bytes, self.device)
        self.cold: ColdTier = cold if cold is not None else DiskTier(Path(root), fingerprint, disk_budget_bytes)
        self._lock = threading.Lock()
        self._shapes: OrderedDict[str, ChunkShape] = OrderedDict()  # recently used chunks, bounded
        self._counts = dict(hits=0, misses=0, memory_block_hits=0, cold_block_reads=0, corrupt=0)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- write ------------------------------------------------------------------------------

    def put(self, chunk_key: str, k: torch.Tensor, v: torch.Tensor, *, keep_in_memory: bool = True) -> None:
        """Commit a chunk: K, V `[L, H, T, D]` in the fingerprint's dtype (K pre-RoPE).

        Durable when this returns. `keep_in_memory=False` (bulk ingest) leaves the memory tier as is.
        """
        if k.shape != v.shape or k.dim() != 4 or k.numel() == 0:
            raise ValueError(f"K, V must be equal non-empty [L, H, T, D], got {tuple(k.shape)}, {tuple(v.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"store fingerprint is {self.fingerprint.dtype}, got K {k.dtype}, V {v.dtype}")
        L, H, T, D = k.shape
        self._drop_memory(chunk_key)  # the old blocks (if any) are superseded
        for evicted in self.cold.put_chunk(chunk_key, k.detach().cpu(), v.detach().cpu()):
            self._drop_memory(evicted)
        if keep_in_memory:
            self._remember(chunk_key, ChunkShape(L, H, T, D, dtype_name(k.dtype)))
            for layer in range(L):
                for head in range(H):
                    self.memory.put(BlockKey(chunk_key, layer, head), KVBlock(k[layer, head], v[layer, head]))

    def delete(self, chunk_key: str) -> bool:
        """Remove a chunk from every tier; True if the cold tier held it."""
        self._drop_memory(chunk_key)
        return self.cold.delete_chunk(chunk_key)

    def evict(
        self,
        chunk_key: str | None = None,
        layer: int | None = None,
        heads: Sequence[int] | None = None,
        target_bytes: int | None = None,
    ) -> int:
        """Drop blocks from the memory tier only (they stay in the cold tier); returns bytes freed.

        With `chunk_key`: that chunk's blocks (optionally one layer / some heads). With
        `target_bytes`: LRU blocks until the memory tier holds at most that many bytes.
        Neither: everything.
        """
        if chunk_key is None and target_bytes is None:
            target_bytes = 0
        keys = None
        if chunk_key is not None:
            keys = [
                b
                for b in self.memory.chunk_blocks(chunk_key)
                if (layer is None or b.layer == layer) and (heads is None or b.head in heads)
            ]
        return self.memory.evict(keys, target_bytes)

    def _remember(self, chunk_key: str, shape: ChunkShape) -> None:
        with self._lock:
            self._shapes[chunk_key] = shape
            self._shapes.move_to_end(chunk_key)
            while len(self._shapes) > _SHAPE_CACHE:
                self._shapes.popitem(last=False)

    def _drop_memory(self, chunk_key: str) -> None:
        self.memory.delete_chunk(chunk_key)
        with self._lock:
            self._shapes.pop(chunk_key, None)

    # -- read -------------------------------------------------------------------------------

    def contains(self, chunk_key: str) -> bool:
        """Whether a chunk is committed under this fingerprint (cheap: no checksum pass)."""
        return self.cold.contains_chunk(chunk_key)

    def keys(self) -> Iterator[str]:
        return self.cold.chunk_keys()

    def shape(self, chunk_key: str) -> ChunkShape | None:
        with self._lock:
            shape = self._shapes.get(chunk_key)
        if shape is not None:
            return shape
        try:
            return self.cold.shape(chunk_key)
        except CorruptChunkError as e:
            self._corrupt(chunk_key, e)
            return None

    def get(self, chunk_key: str, layer: int | None = None, heads: Sequence[int] | None = None) -> ChunkKV | None:
        """Blocks of `layer` (all if None) × `heads` (all if None) as `[L', H', T, D]` on `device`.

        Memory-tier blocks are served from memory; the rest are read from the cold tier (only
        their bytes) and promoted. None on miss: absent, other fingerprint, or corrupt.
        """
        shape = self.shape(chunk_key)
        if shape is None:
            self._count("misses")
            return None
        layers = tuple(range(shape.num_layers)) if layer is None else (layer,)
        hs = tuple(range(shape.num_kv_heads)) if heads is None else tuple(heads)
        for li in layers:
            if not 0 <= li < shape.num_layers:
                raise IndexError(f"layer {li} outside [0, {shape.num_layers})")
        for h in hs:
            if not 0 <= h < shape.num_kv_heads:
                raise IndexError(f"kv head {h} outside [0, {shape.num_kv_heads})")
        want = [(li, h) for li in layers for h in hs]
        blocks: dict[tuple[int, int], KVBlock] = {}
        for b in want:
            got = self.memory.get(BlockKey(chunk_key, *b))
            if got is not None:
                blocks[b] = got
        self._count("memory_block_hits", len(blocks))
        missing = [b for b in want if b not in blocks]
        if missing:
            try:
                read = self.cold.get_blocks(chunk_key, missing)
            except CorruptChunkError as e:
                self._corrupt(chunk_key, e)
                self._count("misses")
                return None
            if read is None:
                self._drop_memory(chunk_key)
                self._count("misses")
                return None
            self._count("cold_block_reads", len(read))
            self._remember(chunk_key, shape)
            for b, blk in read.items():
                self.memory.put(BlockKey(chunk_key, *b), blk)
                blocks[b] = blk
        T, D = shape.num_tokens, shape.head_dim
        k = torch.stack([blocks[b].k.to(self.device) for b in want]).view(len(layers), len(hs), T, D)
        v = torch.stack([blocks[b].v.to(self.device) for b in want]).view(len(layers), len(hs), T, D)
        self._count("hits")
        return ChunkKV(k, v, T, layers, hs)

    def get_block(self, chunk_key: str, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K, V `[T, D]` of one (layer, kv_head) block; reads only that block on a memory miss."""
        got = self.get(chunk_key, layer, [head])
        return None if got is None else (got.k[0, 0], got.v[0, 0])

    def _corrupt(self, chunk_key: str, err: Exception) -> None:
        log.error("KV chunk %r is corrupt and was dropped: %s", chunk_key, err)
        self._drop_memory(chunk_key)
        self._count("corrupt")

    def stats(self) -> StoreStats:
        with self._lock:
            c = dict(self._counts)
        return StoreStats(
            memory_bytes=self.memory.nbytes,
            memory_blocks=len(self.memory),
            cold_bytes=self.cold.nbytes,
            cold_chunks=self.cold.num_chunks,
            memory_evictions=self.memory.num_evictions,
            cold_evictions=getattr(self.cold, "num_evictions", 0),
            **c,
        )
