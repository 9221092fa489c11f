"""The hot tier: chunk segments resident in the runner's page pool, LRU, bounded in pages.

Keyed by `chunk_key`, like every other tier. The cache holds one reference per resident segment;
sequences that attach a segment hold their own, so eviction (dropping the cache's reference) never
frees pages a request still reads.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from redknot_rag.kvcache import KVSegment
from redknot_rag.runner import KVRunner

# () -> (K, V `[L, Hkv, T, D]`, visible `[L, Hkv, T]` bool or None) or None on a miss
KVLoad = Callable[[], "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None"]


class SegmentCache:
    """`get(key, load)` returns the pool-resident segment of a chunk, loading it (`KVLoad`) on a miss."""

    def __init__(self, runner: KVRunner, max_pages: int) -> None:
        self.runner = runner
        self.max_pages = max_pages
        self._segments: collections.OrderedDict[str, KVSegment] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def num_pages(self) -> int:
        return sum(s.pages.numel() for s in self._segments.values())

    def __contains__(self, key: str) -> bool:
        return key in self._segments

    def get(self, key: str, load: KVLoad) -> KVSegment | None:
        seg = self._segments.get(key)
        if seg is not None:
            self._segments.move_to_end(key)
            self.hits += 1
            return seg
        self.misses += 1
        kvt = load()
        if kvt is None:
            return None
        self._make_room(self.runner.segment_pages(kvt[0]))
        seg = self.runner.write_segment(*kvt)
        self._segments[key] = seg
        return seg

    def _make_room(self, need: int) -> None:
        alloc = self.runner.allocator
        while self._segments and (self.num_pages + need > self.max_pages or not alloc.can_allocate(need)):
            _, old = self._segments.popitem(last=False)
            self.runner.drop_segment(old)

    def drop(self, key: str) -> None:
        seg = self._segments.pop(key, None)
        if seg is not None:
            self.runner.drop_segment(seg)

    def clear(self) -> None:
        for key in list(self._segments):
            self.drop(key)
