"""Chunk KV in the page pool: the anchor prefix, chunk prefill at ingestion, and the hot segment cache.

Every chunk is prefilled behind the anchor (the fixed prompt start every query shares), so its
stored KV saw the same left context as the start of a query prompt. K is pre-RoPE, so one stored
chunk serves any offset.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.kvcache import KVPool, KVSegment, PageAllocator, SeqKV
from redknot_rag.store import KVFingerprint, hash_token_ids, sha256_hex
from redknot_rag.store.fingerprint import dtype_name


def chunk_key(token_ids: list[int]) -> str:
    """Content address of a chunk's KV: its token ids (same tokens, same KV under one fingerprint)."""
    return hash_token_ids(token_ids)


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_hex(repr(vocab), repr(sorted(getattr(tokenizer, "all_special_tokens", []))))


def make_fingerprint(engine, anchor_ids: list[int]) -> KVFingerprint:
    """Binds stored KV to weights + tokenizer + anchor + dtype. Stored KV holds every head in full, so
    the head profile (which only decides what is read) is not part of it."""
    return KVFingerprint(
        weights_hash=engine.loaded.weights_fingerprint,
        tokenizer_hash=tokenizer_hash(engine.tokenizer),
        anchor_hash=hash_token_ids(anchor_ids),
        dtype=dtype_name(engine.dtype),
    )


def write_segment(pool: KVPool, allocator: PageAllocator, k: torch.Tensor, v: torch.Tensor) -> KVSegment:
    """Copy K/V `[L, Hkv, T, D]` into fresh pool pages; returns a shared segment (refcount 1, the caller's)."""
    nl, nh, t, _ = k.shape
    num_pages = -(-t // pool.page_size)
    pages = torch.from_numpy(allocator.allocate(nl * nh * num_pages)).view(nl, nh, num_pages)
    seg = KVSegment(pages, t, is_shared=True)
    slots = seg.slots(pool.page_size).to(pool.device)  # [L, Hkv, T]
    pool.k_slots[slots] = k.to(pool.device, pool.dtype)
    pool.v_slots[slots] = v.to(pool.device, pool.dtype)
    return seg


def read_tokens(pool: KVPool, kv: SeqKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of tokens [start, end) of a sequence: `[L, Hkv, T, D]` each (pre-RoPE K), on the pool device."""
    slots = kv.slots[:, :, start:end].to(pool.device)
    return pool.k_slots[slots].clone(), pool.v_slots[slots].clone()


@dataclass
class AnchorKV:
    ids: list[int]
    segment: KVSegment


class ChunkPrefiller:
    """Prefills chunks behind the anchor and returns their KV (runs on the engine thread)."""

    def __init__(self, engine, anchor_ids: list[int]) -> None:
        self.engine = engine
        self.anchor = AnchorKV(anchor_ids, self._prefill_anchor(anchor_ids))

    def _prefill_anchor(self, ids: list[int]) -> KVSegment:
        e = self.engine
        kv = e.new_seq_kv()
        e.append_forward(kv, ids, torch.arange(len(ids)))
        k, v = read_tokens(e.pool, kv, 0, len(ids))
        kv.release(e.allocator)
        return write_segment(e.pool, e.allocator, k, v)

    def attach_anchor(self, kv: SeqKV) -> None:
        a = self.anchor
        kv.attach(a.segment, torch.arange(len(a.ids)), self.engine.allocator)

    def prefill(self, chunks: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One batched forward over `[anchor][chunk_i]` for each chunk → K/V `[L, Hkv, T_i, D]` each."""
        e = self.engine
        a = len(self.anchor.ids)
        kvs: list[SeqKV] = []
        slices: list[SeqSlice] = []
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        try:
            for c in chunks:
                kv = e.new_seq_kv()
                kvs.append(kv)
                self.attach_anchor(kv)
                p = torch.arange(a, a + len(c))
                slices.append(SeqSlice(kv, len(ids), len(c), kv.append(p, e.allocator)))
                ids.extend(c)
                pos.append(p)
            e.model.forward(
                ForwardBatch(torch.tensor(ids), torch.cat(pos), slices, torch.zeros(0, dtype=torch.int64)), e.backend
            )
            return [read_tokens(e.pool, kv, a, a + len(c)) for kv, c in zip(kvs, chunks)]
        finally:
            for kv in kvs:
                kv.release(e.allocator)


class SegmentCache:
    """Hot tier: chunk segments resident in the pool, LRU, bounded in pages.

    The cache holds one reference per resident segment; sequences that attach it hold their own,
    so eviction (dropping the cache's reference) never frees pages a request still reads.
    """

    def __init__(self, pool: KVPool, allocator: PageAllocator, max_pages: int) -> None:
        self.pool = pool
        self.allocator = allocator
        self.max_pages = max_pages
        self._segments: collections.OrderedDict[str, KVSegment] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def num_pages(self) -> int:
        return sum(s.pages.numel() for s in self._segments.values())

    def get(self, key: str, load: Callable[[], tuple[torch.Tensor, torch.Tensor] | None]) -> KVSegment | None:
        seg = self._segments.get(key)
        if seg is not None:
            self._segments.move_to_end(key)
            self.hits += 1
            return seg
        self.misses += 1
        kvt = load()
        if kvt is None:
            return None
        need = kvt[0].shape[0] * kvt[0].shape[1] * -(-kvt[0].shape[2] // self.pool.page_size)
        self._make_room(need)
        seg = write_segment(self.pool, self.allocator, *kvt)
        self._segments[key] = seg
        return seg

    def _make_room(self, need: int) -> None:
        while self._segments and (self.num_pages + need > self.max_pages or not self.allocator.can_allocate(need)):
            _, old = self._segments.popitem(last=False)
            self.allocator.decref(old.pages.numpy())

    def drop(self, key: str) -> None:
        seg = self._segments.pop(key, None)
        if seg is not None:
            self.allocator.decref(seg.pages.numpy())

    def clear(self) -> None:
        for key in list(self._segments):
            self.drop(key)
