"""The hot tier: chunk segments resident in the runner's page pool, LRU, bounded in pages.

Keyed by `chunk_key`, like every other tier. The cache holds one reference per resident segment;
sequences that attach a segment hold their own, so eviction (dropping the cache's reference) never
frees pages a request still reads.

On a GPU, a chunk loaded from the store's blocks (`get_blocks`) is copied host -> pool on the cache's
side stream (from pinned host blocks the copies are asynchronous); each load records an event, and
`ready()` makes the consumer's stream wait for them. Invariant: a segment loaded through
`get_blocks` is read only after `ready()` (a GPU-side wait; the host never blocks). On the CPU the
load is a plain synchronous write and `ready()` does nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from redknot_rag.kvcache import KVSegment
from redknot_rag.runner import KVRunner
from redknot_rag.store.tiers import ChunkBlocks, KVBlock

if TYPE_CHECKING:
    from redknot_rag.store.chunk_store import ChunkKVStore

# () -> (K, V `[L, Hkv, T, D]`, visible `[L, Hkv, T]` bool or None) or None on a miss
KVLoad = Callable[[], "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None"]
Blocks = Mapping[tuple[int, int], KVBlock]  # (layer, kv_head) -> block, as ChunkKVStore.get_blocks returns
# () -> a chunk's blocks (every (layer, kv_head)) or None on a miss
BlocksLoad = Callable[[], "Blocks | None"]
# (chunk_key, load, num_tokens, fallback or None): one chunk of `SegmentCache.get_blocks_many`
BlocksItem = tuple[str, BlocksLoad, int, "KVLoad | None"]


def blocks_geometry(blocks: Blocks, num_tokens: int) -> tuple[int, int, int, torch.Tensor | None]:
    """(num_layers, num_kv_heads, head_dim, visible `[L, Hkv, T]` bool or None when every head holds
    every token) of a chunk's per-head blocks (computed once per host group: `ChunkBlocks.cache`)."""
    cache = blocks.cache if isinstance(blocks, ChunkBlocks) else None
    key = f"geometry:{num_tokens}"
    if cache is not None and key in cache:
        got: tuple[int, int, int, torch.Tensor | None] = cache[key]  # type: ignore[assignment]
        return got[0], got[1], got[2], None if got[3] is None else got[3].clone()
    out = _geometry(blocks, num_tokens)
    if cache is not None:
        cache[key] = out
        return out[0], out[1], out[2], None if out[3] is None else out[3].clone()
    return out


def _geometry(blocks: Blocks, num_tokens: int) -> tuple[int, int, int, torch.Tensor | None]:
    nl = 1 + max(lh[0] for lh in blocks)
    nh = 1 + max(lh[1] for lh in blocks)
    d = next(iter(blocks.values())).k.shape[-1]
    if len(blocks) == nl * nh and all(b.token_start == 0 and b.num_tokens == num_tokens for b in blocks.values()):
        return nl, nh, d, None
    layout = tuple(sorted((lh[0], lh[1], b.token_start, b.num_tokens) for lh, b in blocks.items()))
    return nl, nh, d, _visibility(layout, nl, nh, num_tokens).clone()  # a segment's own copy


@functools.lru_cache(maxsize=64)
def _visibility(layout: tuple[tuple[int, int, int, int], ...], nl: int, nh: int, num_tokens: int) -> torch.Tensor:
    """`[L, Hkv, T]` bool: the tokens each (layer, head, token_start, n) block of `layout` holds."""
    visible = torch.zeros(nl, nh, num_tokens, dtype=torch.bool)
    for layer, head, start, count in layout:
        visible[layer, head, start : start + count] = True
    return visible


def assemble_blocks(
    blocks: Blocks, num_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-head blocks → K, V `[L, Hkv, T, D]` on the host (zeros where a head holds no token) and the
    visibility `[L, Hkv, T]` of what each head holds (None: all)."""
    nl, nh, d, visible = blocks_geometry(blocks, num_tokens)
    k = torch.zeros(nl, nh, num_tokens, d, dtype=dtype)
    v = torch.zeros_like(k)
    for (layer, head), b in blocks.items():
        span = slice(b.token_start, b.token_start + b.num_tokens)
        k[layer, head, span] = b.k.to(dtype)
        v[layer, head, span] = b.v.to(dtype)
    return k, v, visible


def byte_runs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The bytes of `tensors`, in order, as few uint8 `[n]` views: consecutive tensors of one storage
    that lie back to back (a chunk's blocks read into one host buffer) merge into one view, so
    copying the runs moves the same bytes in a few large copies. Views share the tensors'
    storage (pinned stays pinned; the copy engine's events are recorded on it)."""
    runs: list[torch.Tensor] = []
    first: torch.Tensor | None = None  # the run's first tensor
    lo = hi = start = end = 0  # the first tensor's storage [lo, hi) and the run's byte range
    for t in tensors:
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.data_ptr()
        size = t.nbytes
        # back to back AND inside the run's storage: one allocation (checked by address range, which
        # is cheaper than asking every tensor for its storage)
        if first is not None and ptr == end and end + size <= hi:
            end += size
            continue
        if first is not None:
            runs.append(_bytes_view(first, start, end))
        st = t.untyped_storage()
        first, lo, start, end = t, st.data_ptr(), ptr, ptr + size
        hi = lo + st.nbytes()
    if first is not None:
        runs.append(_bytes_view(first, start, end))
    return runs


def _bytes_view(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """uint8 view of addresses [start, end) inside `t`'s storage."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(st, start - st.data_ptr(), (end - start,), (1,))


def page_slots(pages: torch.Tensor, page_size: int, num_tokens: int) -> torch.Tensor:
    """Pool slot of every token of a segment of `pages` `[L, Hkv, P]`: `[L, Hkv, num_tokens]`, on
    `pages`' device (as `KVSegment.slots`)."""
    nl, nh, npages = pages.shape
    offsets = torch.arange(page_size, dtype=pages.dtype, device=pages.device)
    slots = pages[:, :, :, None] * page_size + offsets  # [L, Hkv, P, page_size]
    return slots.view(nl, nh, npages * page_size)[:, :, :num_tokens]


@dataclass(frozen=True)
class SparseTemplate:
    """What places a sparse plan's rows, minus the pages: per stored token (N, blocks in plan order) its
    block `blk` (flat layer·Hkv + head), page within the block and offset in the page, its K row (its V
    row: + `n_of_token`); per zero slot (tokens no head stores, in (layer, head, token) order) the same
    block / page / offset. Chunks stored alike (same heads, windows and host order) share one, so a
    chunk's plan only adds its pages; its copy to a device is made once (`on`)."""

    blk: torch.Tensor
    page: torch.Tensor
    offset: torch.Tensor
    k_rows: torch.Tensor
    n_of_token: torch.Tensor
    zero_blk: torch.Tensor
    zero_page: torch.Tensor
    zero_offset: torch.Tensor
    row_bounds: tuple[int, ...]  # [L + 1] first row of each layer (then the end)
    token_bounds: tuple[int, ...]  # [L + 1] first stored token of each layer
    zero_bounds: tuple[int, ...]  # [L + 1] first zero slot of each layer
    _copies: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def on(self, device: torch.device) -> SparseTemplate:
        """This template with its tensors on `device` (made once per device, then reused)."""
        if device.type == "cpu":
            return self
        key = str(device)
        if key not in self._copies:
            moved = {f: getattr(self, f).to(device) for f in _TEMPLATE_TENSORS}
            self._copies[key] = dataclasses.replace(self, **moved, _copies={})
        return self._copies[key]

    def slots(
        self, pages: torch.Tensor, page_size: int, tokens: slice, zeros: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots of stored tokens `tokens` and zero slots `zeros` of chunks with pages `[C, L·Hkv, P]`
        (on this template's device): `[C, n]`, `[C, z]`."""
        tok = pages[:, self.blk[tokens], self.page[tokens]] * page_size + self.offset[tokens]
        zero = pages[:, self.zero_blk[zeros], self.zero_page[zeros]] * page_size + self.zero_offset[zeros]
        return tok, zero


_TEMPLATE_TENSORS = ("blk", "page", "offset", "k_rows", "n_of_token", "zero_blk", "zero_page", "zero_offset")


@dataclass(frozen=True)
class LoadPlan:
    """How a chunk's blocks reach the pool: copy `runs` back to back into one device buffer and read
    it as rows `[2·N, D]` of `dtype` (per block: its n K rows, then its n V rows; N = stored tokens;
    blocks in (layer, head) order when dense, else layer by layer in host memory order). `index` is
    the segment's pages `[L·Hkv·P]` (int64: one small upload); the slots are computed on the device:

    dense (every block whole): rows `[L·Hkv, 2, T, D]` go to the pages' slots.
    else: `template` places each stored token's K and V row and lists the slots of tokens no head
        stores, which are zeroed (nothing stale stays readable).

    Layer-major invariant (what `store.layer_load` splits on): rows, stored tokens and zero slots are
    ordered by layer, so layer l owns rows `[row_bounds[l], row_bounds[l+1])` (bytes: rows · D ·
    elem), stored tokens `[token_bounds[l], token_bounds[l+1])` and zero slots `[zero_bounds[l],
    zero_bounds[l+1])`.
    """

    runs: list[torch.Tensor]
    dtype: torch.dtype
    head_dim: int
    num_stored: int  # N
    index: torch.Tensor
    dense: bool
    shape: tuple[int, int, int, int]  # (L, Hkv, P, T)
    page_size: int
    row_bounds: tuple[int, ...]  # [L + 1]
    token_bounds: tuple[int, ...]  # [L + 1] (dense: Hkv·T·l)
    zero_bounds: tuple[int, ...]  # [L + 1] (dense: all 0)
    template: SparseTemplate | None = None  # sparse plans

    @property
    def num_layers(self) -> int:
        return self.shape[0]


def load_plan(
    blocks: Blocks, pages: torch.Tensor, page_size: int, num_tokens: int, visible: torch.Tensor | None
) -> LoadPlan:
    """The plan for a chunk's blocks into the segment of `pages` `[L, Hkv, P]` (host), `visible` its
    visibility (None: every block whole). O(blocks) Python steps, no per-token ones."""
    nl, nh, npages = pages.shape
    shape = (nl, nh, npages, num_tokens)
    first = next(iter(blocks.values()))
    dtype, d = first.k.dtype, first.k.shape[-1]
    index = pages.reshape(-1).long()
    if visible is None:  # every (layer, head) block whole: rows in (layer, head) order
        runs = _runs(blocks, "runs:layer-head", lambda: sorted(blocks))
        per_layer = nh * num_tokens
        return LoadPlan(
            runs, dtype, d, nl * per_layer, index, True, shape, page_size,
            row_bounds=tuple(2 * per_layer * li for li in range(nl + 1)),
            token_bounds=tuple(per_layer * li for li in range(nl + 1)),
            zero_bounds=(0,) * (nl + 1),
        )  # fmt: skip
    # rows layer by layer, in host memory order within a layer (a decoded chunk lies in (layer, head)
    # order), so the runs merge where the host buffer allows and every layer is a contiguous row range
    cache: dict[str, object] = blocks.cache if isinstance(blocks, ChunkBlocks) else {}
    if "layout:layer-address" not in cache:
        order = sorted(blocks, key=lambda lh: (lh[0], blocks[lh].k.data_ptr()))
        cache["layout:layer-address"] = tuple(
            (lh[0], lh[1], blocks[lh].token_start, blocks[lh].num_tokens) for lh in order
        )
    layout: tuple[tuple[int, int, int, int], ...] = cache["layout:layer-address"]  # type: ignore[assignment]
    runs = _runs(blocks, "runs:layer-address", lambda: [(li, h) for li, h, _, _ in layout])
    tpl = sparse_template(layout, nl, nh, num_tokens, page_size)
    return LoadPlan(
        runs, dtype, d, int(tpl.blk.numel()), index, False, shape, page_size,
        row_bounds=tpl.row_bounds, token_bounds=tpl.token_bounds, zero_bounds=tpl.zero_bounds, template=tpl,
    )  # fmt: skip


def _runs(blocks: Blocks, key: str, order: Callable[[], list[tuple[int, int]]]) -> list[torch.Tensor]:
    """`byte_runs` of the blocks' K and V in `order()`, computed once per host group (`ChunkBlocks`)."""
    cache = blocks.cache if isinstance(blocks, ChunkBlocks) else None
    if cache is not None and key in cache:
        return cache[key]  # type: ignore[return-value]
    lh = order()
    runs = byte_runs([t for b in lh for t in (blocks[b].k, blocks[b].v)])
    if cache is not None:
        cache[key] = runs
    return runs


@functools.lru_cache(maxsize=64)
def sparse_template(
    layout: tuple[tuple[int, int, int, int], ...], nl: int, nh: int, num_tokens: int, page_size: int
) -> SparseTemplate:
    """The template of blocks `layout` ((layer, head, token_start, n) in plan order, layers ascending)."""
    meta = torch.tensor(layout, dtype=torch.int64)  # [B, 4]
    n = meta[:, 3]
    bi = torch.repeat_interleave(torch.arange(len(layout)), n)  # [N]: the block of each stored token
    first_row = torch.cumsum(n, 0) - n  # [B]: stored tokens before the block
    within = torch.arange(bi.numel()) - first_row[bi]  # [N]: token index within its block
    pos = meta[bi, 2] + within  # [N] token of the chunk
    visible = _visibility(tuple(sorted(layout)), nl, nh, num_tokens)
    zl, zh, zt = (~visible).nonzero(as_tuple=True)  # [Z] each, (layer, head, token) order
    layer_tokens = torch.zeros(nl, dtype=torch.int64).index_add_(0, meta[:, 0], n)  # [L] stored per layer
    tok_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(layer_tokens, 0)])  # [L + 1]
    zeros = (~visible).reshape(nl, -1).sum(1)  # [L]
    zero_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(zeros, 0)])  # [L + 1]
    return SparseTemplate(
        blk=meta[bi, 0] * nh + meta[bi, 1],
        page=pos // page_size,
        offset=pos % page_size,
        k_rows=2 * first_row[bi] + within,  # the block's K rows come first, then its n V rows
        n_of_token=n[bi],
        zero_blk=zl * nh + zh,
        zero_page=zt // page_size,
        zero_offset=zt % page_size,
        row_bounds=tuple((2 * tok_bounds).tolist()),
        token_bounds=tuple(tok_bounds.tolist()),
        zero_bounds=tuple(zero_bounds.tolist()),
    )


def run_plan(plan: LoadPlan, k_slots: torch.Tensor, v_slots: torch.Tensor, index: torch.Tensor) -> None:
    """Execute `plan` into the pool (`k_slots`, `v_slots` `[num_slots, D]`), on the current stream;
    `index` is `plan.index` already on the pool's device. Copies are asynchronous from pinned runs."""
    dev = k_slots.device
    packed = torch.empty(sum(r.numel() for r in plan.runs), dtype=torch.uint8, device=dev)
    pos = 0
    for run in plan.runs:
        packed[pos : pos + run.numel()].copy_(run, non_blocking=True)
        pos += run.numel()
    rows = packed.view(plan.dtype).view(-1, plan.head_dim).to(k_slots.dtype)  # [2N, D]
    N, d = plan.num_stored, plan.head_dim
    nl, nh, npages, T = plan.shape
    if plan.dense:
        slots = page_slots(index.view(nl, nh, npages), plan.page_size, T).reshape(-1)  # [L·Hkv·T]
        kv = rows.view(nl * nh, 2, T, d)  # per block: K rows then V rows
        k_slots[slots] = kv[:, 0].reshape(N, d)
        v_slots[slots] = kv[:, 1].reshape(N, d)
        return
    assert plan.template is not None
    tpl = plan.template.on(dev)
    tok, zero = tpl.slots(index.view(1, nl * nh, npages), plan.page_size, slice(None), slice(None))
    k_slots[tok[0]] = rows[tpl.k_rows]
    v_slots[tok[0]] = rows[tpl.k_rows + tpl.n_of_token]
    if zero.numel():
        k_slots.index_fill_(0, zero[0], 0)  # a scalar fill (`[idx] = 0` copies a host 0: a sync)
        v_slots.index_fill_(0, zero[0], 0)


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
        self.stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None  # host -> pool copies
        self._pending: list[torch.cuda.Event] = []  # copies issued on `stream` that no consumer waited for
        self._layer_events: list[list[torch.cuda.Event | None]] = []  # per layered batch: per layer

    @property
    def num_pages(self) -> int:
        return sum(s.pages.numel() for s in self._segments.values())

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
        self._make_room(self.runner.segment_pages(kvt[0]))
        self.ready()  # pages freed by a segment whose side-stream copy is still queued
        seg = self.runner.write_segment(*kvt)
        self._segments[key] = seg
        return seg

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
        if self.stream is None:  # CPU: a plain synchronous write
            k, v, visible = assemble_blocks(blocks, num_tokens, r.dtype)
            self._make_room(r.segment_pages(k))
            seg = self._segments[key] = r.write_segment(k, v, visible)
            return seg
        nl, nh, d, visible = blocks_geometry(blocks, num_tokens)
        num_pages = -(-num_tokens // r.page_size)
        self._make_room(nl * nh * num_pages)
        pages = torch.from_numpy(r.allocator.allocate(nl * nh * num_pages)).view(nl, nh, num_pages)
        seg = KVSegment(pages, num_tokens, is_shared=True, visible=visible)
        plan = load_plan(blocks, pages, r.page_size, num_tokens, visible)
        # pinned so the index upload is asynchronous too: the host never waits on the side stream
        index_host = plan.index.pin_memory()
        main = torch.cuda.current_stream(r.device)
        self.stream.wait_stream(main)  # fresh pages may still be read by work queued before (a dropped segment)
        with torch.cuda.stream(self.stream):
            index = index_host.to(r.device, non_blocking=True)
            run_plan(plan, r.pool.k_slots, r.pool.v_slots, index)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._pending.append(done)
        self._segments[key] = seg
        return seg

    def get_blocks_many(
        self, items: Sequence[BlocksItem], layers_per_event: int = 4, chunks_per_batch: int = 16
    ) -> list[KVSegment | None]:
        """`get_blocks` for many chunks `(key, load, num_tokens, fallback)`, in order, with the GPU copies
        issued layer-major (`store.layer_load`) per batch of `chunks_per_batch` chunks, so a batch's
        copies run while the host plans the next: call `ready_layers()` (the runner's forwards then
        wait per layer, so the copies overlap the forward) or `ready()` (wait for all) before reading.
        A batch whose pages would not fit the cache beside each other is issued in parts."""
        from redknot_rag.store.layer_load import issue_layered

        r = self.runner
        out: list[KVSegment | None] = []
        batch: list[LoadPlan] = []
        batch_keys: set[str] = set()
        batch_pages = 0

        def flush() -> None:
            nonlocal batch_pages
            if batch:
                self._issue(lambda: issue_layered(batch, r.pool.k_slots, r.pool.v_slots, layers_per_event, self.stream))
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
            pages = torch.from_numpy(r.allocator.allocate(num_pages)).view(nl, nh, -1)
            seg = self._segments[key] = KVSegment(pages, num_tokens, is_shared=True, visible=visible)
            batch.append(load_plan(blocks, pages, r.page_size, num_tokens, visible))
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
        reads = store.get_blocks_many(todo, workers)
        pending = set(todo)

        def load(key: str) -> Blocks | None:
            if key not in pending:  # resident when planned, evicted since by this batch's own loads
                return store.get_blocks(key)
            pending.discard(key)
            for k, blocks in reads:  # yields in `todo` order, the order the keys are loaded in
                if k == key:
                    return blocks
            return store.get_blocks(key)

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
        free = self.runner.allocator.num_free + sum(
            s.pages.numel() for k, s in self._segments.items() if k not in keep
        )  # an upper bound: a dropped segment's pages free only when no sequence holds them
        return kept + need <= self.max_pages and need <= free

    def _issue(self, work: Callable[[], list[torch.cuda.Event | None]]) -> None:
        """Run `work` (queues copies on the side stream, returns per-layer events) after the main
        stream's earlier work; keep its events for `ready_layers` and the last one for `ready`."""
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.runner.device))  # fresh pages may still be read
        events = work()
        self._layer_events.append(events)
        last = next((ev for ev in reversed(events) if ev is not None), None)
        if last is not None:
            self._pending.append(last)

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

    def _hit(self, key: str) -> KVSegment | None:
        seg = self._segments.get(key)
        if seg is not None:
            self._segments.move_to_end(key)
            self.hits += 1
            return seg
        self.misses += 1
        return None

    def _make_room(self, need: int) -> None:
        alloc = self.runner.allocator
        self.ready()  # evicted pages go back to the allocator: later writers of any stream come after the copies
        while self._segments and (self.num_pages + need > self.max_pages or not alloc.can_allocate(need)):
            _, old = self._segments.popitem(last=False)
            self.runner.drop_segment(old)

    def drop(self, key: str) -> None:
        seg = self._segments.pop(key, None)
        if seg is not None:
            self.ready()  # see _make_room
            self.runner.drop_segment(seg)

    def clear(self) -> None:
        for key in list(self._segments):
            self.drop(key)
