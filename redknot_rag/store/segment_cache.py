"""The hot tier: chunk segments resident in the runner's page pool, LRU, bounded in pages.

Keyed by `chunk_key`, like every other tier. The cache holds one reference per resident segment;
sequences that attach a segment hold their own, so eviction (dropping the cache's reference) never
frees pages a request still reads.

On a GPU, a chunk loaded from the store's blocks (`get_blocks`) is copied host -> pool on the cache's
side stream (from pinned host blocks the copies are asynchronous); each load records an event, and
`ready()` makes the consumer's stream wait for them. Many chunks (`get_blocks_many`, `get_from_store`:
the serving path) are copied layer-major with one event per layer group (`store/layer_load.py`);
`ready_layers()` hands those events to the runner, whose forwards wait for layer l's copies only when
they reach layer l. Invariants: a segment loaded here is read only after `ready()` or `ready_layers()`
(a GPU-side wait; the host never blocks); a segment dropped from the cache (eviction, `drop`) gives its
pages back only after the current stream waits for ITS copies (its load's event), so whatever reuses
the pages comes after them, and nothing else is waited for. On the CPU the load is a plain
synchronous write and none of this applies.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from redknot_rag.kvcache import KVSegment
from redknot_rag.runner import KVRunner
from redknot_rag.store.layer_load import issue_layered
from redknot_rag.store.load_plan import (
    Blocks,
    LoadPlan,
    assemble_blocks,
    blocks_geometry,
    load_plan,
    run_plan,
)

if TYPE_CHECKING:
    from redknot_rag.store.chunk_store import ChunkKVStore

# () -> (K, V `[L, Hkv, T, D]`, visible `[L, Hkv, T]` bool or None) or None on a miss
KVLoad = Callable[[], "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None"]
# () -> a chunk's blocks (every (layer, kv_head)) or None on a miss
BlocksLoad = Callable[[], "Blocks | None"]
# (chunk_key, load, num_tokens, fallback or None): one chunk of `SegmentCache.get_blocks_many`
BlocksItem = tuple[str, BlocksLoad, int, "KVLoad | None"]


class SegmentCache:
    """`get(key, load)` returns the pool-resident segment of a chunk, loading it (`KVLoad`) on a miss;
    `get_blocks(key, load, num_tokens)` does the same from the store's per-head blocks."""

    def __init__(self, runner: KVRunner, max_pages: int) -> None:
        self.runner = runner
        self.max_pages = max_pages
        self._segments: collections.OrderedDict[str, KVSegment] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        dev = torch.device(runner.device)
        # host -> pool copies on a side stream (one rank; under tensor parallelism every load is a
        # synchronous `write_segment`, which reaches every rank in one message)
        gpu = dev.type == "cuda" and runner.tp_size == 1
        self.stream = torch.cuda.Stream(device=dev) if gpu else None
        self._pending: list[torch.cuda.Event] = []  # copies issued on `stream` that no consumer waited for
        self._layer_events: list[list[torch.cuda.Event | None]] = []  # per layered batch: per layer
        self._loaded: dict[str, torch.cuda.Event] = {}  # segment -> the event after its copies
        self._num_pages = 0  # pages of `_segments`, kept as they change (asked once per chunk a load plans)

    @property
    def num_pages(self) -> int:
        return self._num_pages

    def _insert(self, key: str, seg: KVSegment) -> KVSegment:
        old = self._segments.pop(key, None)
        if old is not None:
            self._num_pages -= old.pages.numel()
        self._segments[key] = seg
        self._num_pages += seg.pages.numel()
        return seg

    def __contains__(self, key: str) -> bool:
        return key in self._segments

    def __len__(self) -> int:
        return len(self._segments)

    def get(self, key: str, load: KVLoad) -> KVSegment | None:
        seg = self._hit(key)
        return seg if seg is not None else self._write(key, load)

    def _write(self, key: str, load: KVLoad) -> KVSegment | None:
        """Load K, V and write them into fresh pages on the current stream (synchronous)."""
        kvt = load()
        if kvt is None:
            return None
        self._make_room(self.runner.segment_pages(kvt[0]))  # waits for the copies into pages it frees
        return self._insert(key, self.runner.write_segment(*kvt))

    def get_blocks(
        self, key: str, load: BlocksLoad, num_tokens: int, fallback: KVLoad | None = None
    ) -> KVSegment | None:
        """The pool-resident segment of a chunk of `num_tokens` tokens, loaded on a miss from its
        per-head blocks (K, V `[n, D]`, token range each), or from `fallback` (like `get`'s load) when
        `load` misses. On a GPU the blocks' copy is queued on the side stream: call `ready()` before
        reading the segment."""
        seg = self._hit(key)
        if seg is not None:
            return seg
        blocks = load()
        if blocks is None:
            return None if fallback is None else self._write(key, fallback)
        r = self.runner
        if self.stream is None:  # CPU (or tensor parallel): a plain synchronous write
            k, v, visible = assemble_blocks(blocks, num_tokens, r.dtype)
            self._make_room(r.segment_pages(k))
            return self._insert(key, r.write_segment(k, v, visible))
        nl, nh, d, visible = blocks_geometry(blocks, num_tokens)
        num_pages = -(-num_tokens // r.page_size)
        self._make_room(nl * nh * num_pages)
        seg = r.allocate_segment(num_tokens, visible)
        plan = load_plan(blocks, seg.pages, r.page_size, num_tokens, visible)
        # pinned so the index upload is asynchronous too: the host never waits on the side stream
        index_host = plan.index.pin_memory()
        main = torch.cuda.current_stream(r.device)
        self.stream.wait_stream(main)  # fresh pages may still be read by work queued before (a dropped segment)
        with torch.cuda.stream(self.stream):
            index = index_host.to(r.device, non_blocking=True)
            r.write_pages(lambda k_slots, v_slots: run_plan(plan, k_slots, v_slots, index))
            done = torch.cuda.Event()
            done.record(self.stream)
        self._pending.append(done)
        self._insert(key, seg)
        self._loaded[key] = done
        return seg

    def get_blocks_many(
        self, items: Sequence[BlocksItem], layers_per_event: int = 4, chunks_per_batch: int = 16
    ) -> list[KVSegment | None]:
        """`get_blocks` for many chunks `(key, load, num_tokens, fallback)`, in order, with the GPU copies
        issued layer-major (`store.layer_load`) per batch of `chunks_per_batch` chunks, so a batch's
        copies run while the host plans the next: call `ready_layers()` (the runner's forwards then
        wait per layer, so the copies overlap the forward) or `ready()` (wait for all) before reading.
        A batch whose pages would not fit the cache beside each other is issued in parts."""
        r = self.runner
        out: list[KVSegment | None] = []
        batch: list[LoadPlan] = []
        batch_keys: set[str] = set()
        batch_pages = 0

        def flush() -> None:
            nonlocal batch_pages
            if batch:
                last = self._issue(
                    lambda: r.write_pages(lambda k, v: issue_layered(batch, k, v, layers_per_event, self.stream))
                )
                if last is not None:
                    self._loaded.update(dict.fromkeys(batch_keys, last))
            batch.clear()
            batch_keys.clear()
            batch_pages = 0

        for key, load, num_tokens, fallback in items:
            if self.stream is None or key in batch_keys:
                out.append(self.get_blocks(key, load, num_tokens, fallback))
                continue
            seg = self._hit(key)
            if seg is not None:
                out.append(seg)
                continue
            blocks = load()
            if blocks is None:
                out.append(None if fallback is None else self._write(key, fallback))
                continue
            nl, nh, _, visible = blocks_geometry(blocks, num_tokens)
            num_pages = nl * nh * -(-num_tokens // r.page_size)
            if batch_pages + num_pages > self.max_pages or not self._room_without(batch_keys, num_pages):
                flush()  # the planned segments must not be evicted before their copies are queued
            self._make_room(num_pages)
            seg = self._insert(key, r.allocate_segment(num_tokens, visible))
            batch.append(load_plan(blocks, seg.pages, r.page_size, num_tokens, visible))
            batch_keys.add(key)
            batch_pages += num_pages
            out.append(seg)
            if len(batch) >= chunks_per_batch:
                flush()
        flush()
        return out

    def get_from_store(
        self,
        store: ChunkKVStore,
        chunks: Sequence[tuple[str, int, KVLoad | None]],
        workers: int = 8,
        layers_per_event: int | None = 4,
    ) -> list[KVSegment | None]:
        """`get_blocks_many` of chunks `(key, num_tokens, fallback)` from `store`: the chunks the cache
        lacks are read by up to `workers` threads at once (`ChunkKVStore.get_blocks_many`: cold reads
        overlap, host-memory hits stay in this thread), consumed in order while later ones are read.
        `layers_per_event=None`: chunk-major instead (`get_blocks` per chunk: each chunk's copy is
        queued as soon as it is read; wait with `ready()`)."""
        todo = [k for k in dict.fromkeys(key for key, _, _ in chunks) if k not in self]
        encoded = self.stream is not None  # a GPU pool decodes INT8/INT4 blocks the store keeps encoded
        reads = store.get_blocks_many(todo, workers, encoded=encoded)
        pending = set(todo)

        def load(key: str) -> Blocks | None:
            if key not in pending:  # resident when planned, evicted since by this batch's own loads
                return store.get_blocks(key, encoded=encoded)
            pending.discard(key)
            for k, blocks in reads:  # yields in `todo` order, the order the keys are loaded in
                if k == key:
                    return blocks
            return store.get_blocks(key, encoded=encoded)

        items = [(key, functools.partial(load, key), n, fallback) for key, n, fallback in chunks]
        try:
            if layers_per_event is None:
                return [self.get_blocks(*item) for item in items]
            return self.get_blocks_many(items, layers_per_event)
        finally:
            reads.close()

    def _room_without(self, keep: set[str], need: int) -> bool:
        """Whether evicting only segments outside `keep` can make room for `need` pages."""
        if not keep:
            return True
        kept = sum(self._segments[k].pages.numel() for k in keep if k in self._segments)
        # the pages of the segments outside `keep` (an upper bound: a dropped segment's pages free only
        # when no sequence holds them); O(|keep|), not O(resident segments), per planned chunk
        free = self.runner.free_pages + self._num_pages - kept
        return kept + need <= self.max_pages and need <= free

    def _issue(self, work: Callable[[], list[torch.cuda.Event | None]]) -> torch.cuda.Event | None:
        """Run `work` (queues copies on the side stream, returns per-layer events) after the main
        stream's earlier work; keep its events for `ready_layers` and the last one for `ready`
        (returned: it covers all of `work`'s copies)."""
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.runner.device))  # fresh pages may still be read
        events = work()
        self._layer_events.append(events)
        last = next((ev for ev in reversed(events) if ev is not None), None)
        if last is not None:
            self._pending.append(last)
        return last

    def ready_layers(self) -> None:
        """Hand the layer-major loads' per-layer events to the runner: its eager forwards then wait for
        layer l's copies only when they reach layer l (`KVRunner.await_layers`); chunk-major loads
        (`get_blocks`) are waited for now, in full. No host wait."""
        batches, self._layer_events = self._layer_events, []
        layered = {id(ev) for events in batches for ev in events if ev is not None}
        rest = [ev for ev in self._pending if id(ev) not in layered]
        if rest:
            main = torch.cuda.current_stream(self.runner.device)
            for ev in rest:
                main.wait_event(ev)
        # the layered events stay pending too: `ready()` (eviction, another reader) still waits for them
        self._pending = [ev for ev in self._pending if id(ev) in layered]
        for events in batches:
            self.runner.await_layers(events)

    def ready(self) -> None:
        """Make the current stream wait for every host -> pool copy issued so far (no host wait)."""
        if self._pending:
            main = torch.cuda.current_stream(self.runner.device)
            for ev in self._pending:
                main.wait_event(ev)
            self._pending.clear()
        self._layer_events.clear()
        self._loaded.clear()

    def _hit(self, key: str) -> KVSegment | None:
        seg = self._segments.get(key)
        if seg is not None:
            self._segments.move_to_end(key)
            self.hits += 1
            return seg
        self.misses += 1
        return None

    def _make_room(self, need: int) -> None:
        """Evict least recently used segments until `need` more pages fit; waits only for their copies."""
        r = self.runner
        while self._segments and (self.num_pages + need > self.max_pages or not r.can_allocate(need)):
            key, old = self._segments.popitem(last=False)
            self._num_pages -= old.pages.numel()
            self._release(key, old)

    def _release(self, key: str, seg: KVSegment) -> None:
        """Drop the cache's reference to a segment. Its pages may be handed out again, so the current
        stream first waits for the segment's own copies (later writers of any stream come after them;
        the side stream is ordered already); other loads stay in flight."""
        done = self._loaded.pop(key, None)
        if done is not None:
            torch.cuda.current_stream(self.runner.device).wait_event(done)
        self.runner.drop_segment(seg)

    def drop(self, key: str) -> None:
        seg = self._segments.pop(key, None)
        if seg is not None:
            self._num_pages -= seg.pages.numel()
            self._release(key, seg)

    def clear(self) -> None:
        for key in list(self._segments):
            self.drop(key)
