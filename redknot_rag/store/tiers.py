"""Block-granular tier interfaces and the host-memory tier.

The unit every tier stores is one (chunk, layer, kv_head) block: K and V `[n, D]` each, K pre-RoPE,
holding the chunk's tokens `[token_start, token_start + n)` (n < T only for compressed local heads).
The host tier holds decoded tensors (`KVBlock`), or, with `StoreConfig.decode_on="device"`, a quantized
chunk's payloads as the cold tiers hold them (`EncodedBlock`: the GPU pool's load decodes them on the
device); cold tiers (disk, Redis) hold encoded, checksummed payloads (`codec.py`) addressed by the
same (chunk_key, layer, head), and accept whole chunks atomically (`ColdTier`). A pool tier on a GPU
sits on top through `ChunkKVStore.get_blocks`.
"""

from __future__ import annotations

import collections
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from redknot_rag.store.codec import BlockMeta, ChunkMeta, ChunkShape, HeadClass, Payload, decode_block

__all__ = [
    "BlockKey",
    "BlockTier",
    "ChunkShape",
    "ColdTier",
    "EncodedBlock",
    "HostBlock",
    "KVBlock",
    "MemoryTier",
    "TierUnavailableError",
]


class TierUnavailableError(ConnectionError):
    """A shared tier (Redis) cannot be reached. The store turns it into a miss and a log line."""


class BlockKey(NamedTuple):
    """One block's address. A tuple (hashed in C): the host tier looks up L·Hkv of them per chunk read."""

    chunk_key: str
    layer: int
    head: int


@dataclass(frozen=True)
class KVBlock:
    """K and V of one (layer, kv_head) of one chunk: `[n, D]` each, same dtype and device.

    Holds the chunk's tokens `[token_start, token_start + n)`.
    """

    k: torch.Tensor
    v: torch.Tensor
    token_start: int = 0
    head_class: HeadClass = HeadClass.UNCLASSIFIED

    @property
    def num_tokens(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KVBlock:
        """This block with `fn` applied to its tensors (the host tier placing it)."""
        return KVBlock(fn(self.k), fn(self.v), self.token_start, self.head_class)


@dataclass(frozen=True)
class EncodedBlock:
    """One (layer, kv_head) block kept as its cold tiers hold it: the crc-verified INT8/INT4 `payload`,
    uint8 `[payload_nbytes]` (codec.py), decoded where it is read: on the device by a GPU pool load
    (`store.device_decode`), on the host by `decode()` (the fallback and the reference).

    Decodes to K, V `[n, head_dim]` of `dtype` (the storage dtype), rounded through `src_dtype` (the
    chunk's dtype) as `codec.decode_block` does."""

    payload: torch.Tensor
    meta: BlockMeta
    head_dim: int
    src_dtype: torch.dtype
    dtype: torch.dtype

    @property
    def token_start(self) -> int:
        return self.meta.token_start

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    @property
    def head_class(self) -> HeadClass:
        return self.meta.head_class

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.payload,)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> EncodedBlock:
        return EncodedBlock(fn(self.payload), self.meta, self.head_dim, self.src_dtype, self.dtype)

    def decode(self) -> KVBlock:
        """K, V `[n, D]` of `dtype` on the host (the payload's device must be the CPU)."""
        k, v = decode_block(memoryview(self.payload.numpy()), self.meta, self.head_dim, self.src_dtype)  # type: ignore[arg-type]
        return KVBlock(k.to(self.dtype), v.to(self.dtype), self.token_start, self.head_class)


HostBlock = KVBlock | EncodedBlock  # what the host tier holds


@runtime_checkable
class BlockTier(Protocol):
    """Storage addressed by (chunk, layer, head) block."""

    def get(self, key: BlockKey) -> KVBlock | None: ...
    def put(self, key: BlockKey, block: KVBlock) -> None: ...
    def contains(self, key: BlockKey) -> bool: ...
    def delete(self, key: BlockKey) -> bool: ...


@runtime_checkable
class ColdTier(Protocol):
    """A tier of encoded blocks below host memory (disk, Redis).

    `put_chunk` stores every block of a chunk or none (after a crash too) and returns the chunk
    keys it evicted for its budget; `durable=False` marks a cache fill that may skip fsyncs.
    `get_payloads` returns the chunk's meta and the crc-verified payloads of the requested blocks
    it holds (a tier whose own LRU dropped single blocks may return fewer; with `alloc`, memoryviews
    into one buffer from `alloc(nbytes)`, so a caller lands a chunk in pinned memory with no further
    copy), None when it lacks the chunk or it is bound to another fingerprint, and raises
    `CorruptChunkError` (after dropping the chunk) when a requested block fails its checksum, or
    `TierUnavailableError` when it cannot be reached.
    """

    name: str

    def put_chunk(self, meta: ChunkMeta, payloads: Sequence[Payload], durable: bool = True) -> list[str]: ...
    def meta(self, chunk_key: str) -> ChunkMeta | None: ...
    def get_payloads(
        self,
        chunk_key: str,
        blocks: Sequence[tuple[int, int]],
        alloc: Callable[[int], memoryview] | None = None,
    ) -> tuple[ChunkMeta, dict[tuple[int, int], Payload]] | None: ...
    def contains_chunk(self, chunk_key: str) -> bool: ...
    def delete_chunk(self, chunk_key: str) -> bool: ...
    def chunk_keys(self) -> Iterator[str]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def num_chunks(self) -> int: ...


class ChunkBlocks(dict):
    """A whole chunk's blocks `{(layer, head): HostBlock}` held by the host tier as one group (one
    buffer). The tier hands out the same object for every read of the group, read-only, so what a GPU
    load derives from it (`cache`: byte runs, layout) is computed once per group, not once per read."""

    def __init__(self, items: Iterable[tuple[tuple[int, int], HostBlock]]) -> None:
        super().__init__(items)
        self.cache: dict[str, object] = {}


class MemoryTier:
    """Host tier: blocks under a byte budget on `device` (pinned when on CPU with CUDA present).

    Eviction is segmented LRU: a new block enters the probation segment; a block read again moves
    to the protected segment (at most `protected_share` of the budget; its overflow goes back to
    probation's recent end); eviction takes probation's least recent block first. So chunks read by
    more than one query (popular under a skewed load) survive a query whose blocks alone exceed
    the budget, which would flush a plain LRU.

    Invariants: `nbytes` = sum of held blocks' bytes <= `budget_bytes`. A block `put` alone owns its
    storage (copied in, or handed over as `owned`), so evicting it frees exactly its bytes. Blocks
    `put_group` inserts are views into one shared buffer (a chunk read from a cold tier in one
    piece, so the GPU pool loads it in a few large copies): they are held and evicted together,
    so evicting any of them frees the whole buffer (its bytes beyond the blocks' are alignment
    padding: < 64 B per block).
    """

    def __init__(self, budget_bytes: int, device: torch.device | str = "cpu", protected_share: float = 0.8) -> None:
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device)
        self.pin = self.device.type == "cpu" and torch.cuda.is_available()
        self.protected_bytes_cap = int(protected_share * self.budget_bytes)
        self.nbytes = 0
        self.num_evictions = 0
        self._probation: OrderedDict[BlockKey, HostBlock] = OrderedDict()  # least recent first
        self._protected: OrderedDict[BlockKey, HostBlock] = OrderedDict()  # least recent first
        self._protected_bytes = 0
        self._by_chunk: dict[str, set[BlockKey]] = {}
        self._group_of: dict[BlockKey, int] = {}  # put_group members -> group id
        self._groups: dict[int, list[BlockKey]] = {}
        self._whole: dict[str, tuple[int, ChunkBlocks]] = {}  # chunk -> its group holding ALL its blocks
        self._next_group = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def _place(self, t: torch.Tensor, owned: bool) -> torch.Tensor:
        """A tensor on this tier's device that owns its storage; `owned` tensors are kept as they are
        where no pinning or device move is needed (a freshly decoded block: no second copy)."""
        if owned and t.device == self.device and not self.pin and t.is_contiguous():
            return t
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=self.pin)
        # async only host->device from pinned memory: stream order covers every later GPU read
        return out.copy_(t, non_blocking=self.device.type == "cuda" and t.is_pinned())

    def get(self, key: BlockKey) -> HostBlock | None:
        """The block (a hit: it moves to, or within, the protected segment), or None."""
        with self._lock:
            return self._get(key)

    def get_many(self, keys: Sequence[BlockKey]) -> list[HostBlock | None]:
        """`get` of each key, under one lock acquisition."""
        with self._lock:
            return [self._get(key) for key in keys]

    def _get(self, key: BlockKey) -> HostBlock | None:
        """Caller holds the lock."""
        block = self._protected.get(key)
        if block is not None:
            self._protected.move_to_end(key)
            return block
        block = self._probation.pop(key, None)
        if block is None:
            return None
        self._protected[key] = block
        self._protected_bytes += block.nbytes
        while self._protected_bytes > self.protected_bytes_cap and len(self._protected) > 1:
            old, b = self._protected.popitem(last=False)
            self._protected_bytes -= b.nbytes
            self._probation[old] = b  # back to probation's recent end
        return block

    def put(self, key: BlockKey, block: HostBlock, owned: bool = False) -> HostBlock | None:
        """Insert (or replace) a block into probation, evicting to fit; returns the held block.

        A block above the budget is not kept (None). `owned`: the block's tensors are private to
        the caller and own exactly their bytes (not views into a larger tensor), so the tier may
        keep them without a copy.
        """
        if block.nbytes > self.budget_bytes:
            self.delete(key)
            return None
        placed = block.map(lambda t: self._place(t, owned))
        size = placed.nbytes
        with self._lock:
            self._drop(key)
            while self.nbytes + size > self.budget_bytes:
                self._evict_next()
            self._probation[key] = placed
            self._by_chunk.setdefault(key.chunk_key, set()).add(key)
            self.nbytes += size
        return placed

    def put_group(self, items: Sequence[tuple[BlockKey, HostBlock]]) -> list[HostBlock] | None:
        """Insert blocks that share one buffer (views of it, on this tier's device, pinned where this
        tier pins) without copying; they are evicted together. Returns the held blocks, or None
        (nothing kept) when they do not qualify or exceed the budget; the caller then `put`s them
        one by one or serves them without caching."""
        fits = all(t.device == self.device and (not self.pin or t.is_pinned()) for _, b in items for t in b.tensors)
        size = sum(b.nbytes for _, b in items)
        if not items or not fits or size > self.budget_bytes or len({k for k, _ in items}) != len(items):
            return None
        with self._lock:
            for key, _ in items:
                self._drop(key)
            while self.nbytes + size > self.budget_bytes:
                self._evict_next()
            gid = self._next_group
            self._next_group += 1
            self._groups[gid] = [k for k, _ in items]
            chunks = {k.chunk_key for k, _ in items}
            if len(chunks) == 1:  # `chunk_group` serves it whole when it holds every block of the chunk
                self._whole[chunks.pop()] = (gid, ChunkBlocks(((k.layer, k.head), b) for k, b in items))
            for key, block in items:
                self._probation[key] = block
                self._group_of[key] = gid
                self._by_chunk.setdefault(key.chunk_key, set()).add(key)
            self.nbytes += size
        return [b for _, b in items]

    def chunk_group(self, chunk_key: str, num_blocks: int) -> ChunkBlocks | None:
        """Every block of a chunk of `num_blocks` blocks when one group holds them all (a chunk read
        from a cold tier or stored in one piece): each counts as a `get` (LRU), at one lock
        acquisition and no per-block allocation. None otherwise (then read block by block)."""
        with self._lock:
            got = self._whole.get(chunk_key)
            if got is None:
                return None
            gid, blocks = got
            members = self._groups.get(gid)
            if members is None or len(members) != num_blocks or len(blocks) != num_blocks:
                return None
            protected = self._protected
            if all(map(protected.__contains__, members)):  # a chunk read before: `_get` = move_to_end
                collections.deque(map(protected.move_to_end, members), maxlen=0)  # a C loop, no Python per block
            else:
                for key in members:
                    self._get(key)
            return blocks

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._probation or key in self._protected

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            return self._drop(key) > 0

    def num_chunk_blocks(self, chunk_key: str) -> int:
        """How many blocks of one chunk are held here."""
        with self._lock:
            return len(self._by_chunk.get(chunk_key, ()))

    def chunk_blocks(self, chunk_key: str) -> list[BlockKey]:
        """Keys of the blocks of one chunk held here."""
        with self._lock:
            return list(self._by_chunk.get(chunk_key, ()))

    def delete_chunk(self, chunk_key: str) -> int:
        """Drop every block of a chunk; returns bytes freed."""
        with self._lock:
            return sum(self._drop(k) for k in list(self._by_chunk.get(chunk_key, ())))

    def evict(self, keys: Iterable[BlockKey] | None = None, target_bytes: int | None = None) -> int:
        """Drop `keys`, or blocks in eviction order until `nbytes <= target_bytes`; returns bytes freed.

        Named `keys` are dropped one by one: a group they belong to is split first (its other
        members are copied out into blocks of their own), so evicting some heads frees exactly
        their bytes. Eviction by `target_bytes` drops whole groups.
        """
        with self._lock:
            held = {**self._probation, **self._protected}
            victims = {k for k in keys if k in held} if keys is not None else set()
            for gid in {self._group_of[k] for k in victims if k in self._group_of}:
                if not set(self._groups[gid]) <= victims:
                    self._ungroup(gid)
            held = {**self._probation, **self._protected}
            if target_bytes is not None:
                left = self.nbytes - sum(held[k].nbytes for k in victims)
                for k, b in held.items():  # eviction order: probation, then protected, least recent first
                    if left <= target_bytes:
                        break
                    if k not in victims:
                        victims.add(k)
                        left -= b.nbytes
            before = len(self)
            freed = sum(self._drop(k) for k in victims)
            self.num_evictions += before - len(self)
            return freed

    def _ungroup(self, gid: int) -> None:
        """Give every member of a group its own storage (a copy), so each can be evicted alone.
        Caller holds the lock."""
        members = self._groups.pop(gid)
        self._forget_whole(gid, members)
        for key in members:
            del self._group_of[key]
            seg = self._protected if key in self._protected else self._probation
            b = seg[key]
            seg[key] = b.map(lambda t: self._place(t, False))

    def _evict_next(self) -> None:
        """Evict the next block in eviction order (with its group). Caller holds the lock."""
        before = len(self)
        self._drop(next(iter(self._probation or self._protected)))
        self.num_evictions += before - len(self)

    def _drop(self, key: BlockKey) -> int:
        """Drop a block and, if it belongs to a group, the whole group; returns bytes freed. Caller holds the lock."""
        gid = self._group_of.pop(key, None)
        if gid is None:
            return self._drop_one(key)
        members = self._groups.pop(gid)
        self._forget_whole(gid, members)
        for k in members:
            self._group_of.pop(k, None)
        return sum(self._drop_one(k) for k in members)

    def _forget_whole(self, gid: int, members: list[BlockKey]) -> None:
        """A group is gone (dropped or split): it no longer serves its chunk whole. Caller holds the lock."""
        if members:
            chunk = members[0].chunk_key
            got = self._whole.get(chunk)
            if got is not None and got[0] == gid:
                del self._whole[chunk]

    def _drop_one(self, key: BlockKey) -> int:
        """Caller holds the lock."""
        block = self._probation.pop(key, None)
        if block is None:
            block = self._protected.pop(key, None)
            if block is None:
                return 0
            self._protected_bytes -= block.nbytes
        keys = self._by_chunk[key.chunk_key]
        keys.discard(key)
        if not keys:
            del self._by_chunk[key.chunk_key]
        self.nbytes -= block.nbytes
        return block.nbytes
