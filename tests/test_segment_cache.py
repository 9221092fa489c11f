"""The hot tier's load from stored per-head blocks (`SegmentCache.get_blocks`): on the CPU a plain
write; on a GPU, pinned host blocks copied into the pool on a side stream whose event the consumer's
stream waits on (`ready()`), bit for bit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from kernel_fixtures import random_weights, tiny_config

from redknot_rag.kvcache import KVSegment
from redknot_rag.store import ChunkKVStore, HeadCompression, KVFingerprint, StoreConfig, hash_token_ids
from redknot_rag.store.load_plan import LoadPlan, blocks_geometry, byte_runs, load_plan, run_plan
from redknot_rag.store.segment_cache import SegmentCache
from redknot_rag.store.tiers import BlockKey

T = 40  # chunk tokens: not a multiple of the page size (16), so a last page is partial


def _runner(device: str, dtype: torch.dtype):
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import LoadedModel

    cfg = tiny_config(head_dim=64, num_kv_heads=2, num_layers=3, vocab=128)
    torch.manual_seed(0)
    loaded = LoadedModel(cfg, random_weights(cfg, dtype, device), None, "tiny-random", "random:tiny")  # type: ignore[arg-type]
    name = str(dtype).removeprefix("torch.")
    conf = EngineConfig(device=device, dtype=name, attention_backend="torch", cpu_kv_gib=0.01, mem_fraction=0.02)
    return Engine(conf, loaded=loaded).runner


def _store(tmp: Path, runner, device_dtype: str) -> tuple[ChunkKVStore, torch.Tensor, torch.Tensor]:
    mc = runner.model_config
    fp = KVFingerprint("w", "t", hash_token_ids([1]), device_dtype)
    store = ChunkKVStore(tmp, fp, 64 << 20)
    g = torch.Generator().manual_seed(1)
    shape = (mc.num_layers, mc.num_kv_heads, T, mc.head_dim)
    k, v = (torch.randn(*shape, generator=g).to(runner.dtype) for _ in range(2))
    store.put("dense", k, v)
    classes = torch.ones(mc.num_layers, mc.num_kv_heads, dtype=torch.int64)
    classes[:, 0] = 0  # kv head 0 local: only its last 8 tokens are stored
    store.put("windowed", k, v, heads=HeadCompression.from_mask(classes, 8))
    return store, k, v


def _pool_kv(runner, seg) -> tuple[torch.Tensor, torch.Tensor]:
    slots = seg.slots(runner.page_size).to(runner.device)  # [L, Hkv, T]
    return runner.pool.k_slots[slots].cpu(), runner.pool.v_slots[slots].cpu()  # [L, Hkv, T, D]


def _check(runner, store: ChunkKVStore, cache: SegmentCache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Both chunks' pool bytes equal what was stored (bit for bit), only where a head holds tokens."""
    dense = cache.get_blocks("dense", lambda: store.get_blocks("dense"), T)
    win = cache.get_blocks("windowed", lambda: store.get_blocks("windowed"), T)
    assert dense is not None and win is not None and dense.visible is None
    cache.ready()
    pk, pv = _pool_kv(runner, dense)
    assert torch.equal(pk, k) and torch.equal(pv, v)
    assert win.visible is not None and win.visible[:, 1:].all()
    assert win.visible[:, 0, -8:].all() and not win.visible[:, 0, :-8].any()
    wk, wv = _pool_kv(runner, win)
    mask = win.visible[..., None].expand_as(wk)
    assert torch.equal(wk[mask], k[mask]) and torch.equal(wv[mask], v[mask])
    assert cache.get_blocks("dense", lambda: None, T) is dense and cache.hits == 1  # a hit loads nothing


def test_get_blocks_cpu_writes_stored_bytes(tmp_path: Path) -> None:
    runner = _runner("cpu", torch.float32)
    store, k, v = _store(tmp_path, runner, "float32")
    cache = SegmentCache(runner, max_pages=runner.num_pages)
    assert cache.stream is None
    free = runner.free_pages
    _check(runner, store, cache, k, v)
    assert cache.get_blocks("absent", lambda: store.get_blocks("absent"), T) is None
    cache.clear()
    assert runner.free_pages == free
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_get_blocks_gpu_pinned_side_stream(tmp_path: Path) -> None:
    runner = _runner("cuda", torch.bfloat16)
    store, k, v = _store(tmp_path, runner, "bfloat16")
    assert store.memory.pin
    for head in range(k.shape[1]):  # the host tier holds pinned blocks
        blk = store.memory.get(BlockKey("dense", 1, head))
        assert blk is not None and blk.k.is_pinned() and blk.v.is_pinned()
    cache = SegmentCache(runner, max_pages=runner.num_pages)
    main = torch.cuda.current_stream()
    assert cache.stream is not None and cache.stream != main
    # Warm the load path once, as a server's first query does: a kernel's first launch loads its
    # module (lazy loading may wait for running kernels) and a first cudaMalloc / cudaHostAlloc of a
    # size may synchronize; after this, device and pinned buffers come from torch's caches.
    assert cache.get_blocks("dense", lambda: store.get_blocks("dense"), T) is not None
    cache.ready()
    torch.cuda.synchronize()
    cache.clear()
    runner.pool.k.fill_(7.0)  # stale bytes a read that did not wait for the copy would see
    runner.pool.v.fill_(7.0)
    torch.cuda.synchronize()
    cycles = 2_000_000_000
    with torch.cuda.stream(cache.stream):
        torch.cuda._sleep(cycles)  # ~1 s of GPU cycles queued ahead of the copies
    t0 = time.perf_counter()
    seg = cache.get_blocks("dense", lambda: store.get_blocks("dense"), T)
    host_s = time.perf_counter() - t0
    assert seg is not None and len(cache._pending) == 1
    done = cache._pending[0]
    assert not done.query(), (
        f"the side-stream copy had already finished when get_blocks returned after {host_s:.3f} s on the host, "
        f"with {cycles:.0e} GPU cycles (~1 s) of sleep queued ahead of it on the side stream: something on "
        "the load path made the host wait for the GPU (a pageable host->device copy, a first cudaMalloc / "
        "cudaHostAlloc of a size, a lazily loaded kernel, a .item()/.cpu())"
    )
    cache.ready()  # the main stream waits on the copy's event, the host does not
    assert not cache._pending
    pk, pv = _pool_kv(runner, seg)  # read on the main stream: ordered after the copy by the event
    assert done.query()
    assert torch.equal(pk, k) and torch.equal(pv, v)
    cache.clear()
    _check(runner, store, cache, k, v)  # dense and head-windowed chunks, hit path
    cache.clear()
    store.close()


def test_load_plan_few_copies_exact_cpu(tmp_path: Path) -> None:
    """The GPU load's plan, run on the CPU: a chunk read back from disk lands in one host buffer, so
    its blocks are ONE copy; the pool then holds the stored bytes bit for bit, and the tokens a local
    head does not store are zeroed (no stale bytes)."""
    runner = _runner("cpu", torch.float32)
    store, k, v = _store(tmp_path, runner, "float32")
    store.evict()  # host tier empty: the next reads come from the chunk files
    cache = SegmentCache(runner, max_pages=runner.num_pages)
    r = runner
    for key in ("dense", "windowed"):
        blocks = store.get_blocks(key)
        assert blocks is not None
        assert len(byte_runs([t for lh in sorted(blocks) for t in (blocks[lh].k, blocks[lh].v)])) == 1
        _, _, _, visible = blocks_geometry(blocks, T)
        nl, nh = k.shape[:2]
        num_pages = -(-T // r.page_size)
        pages = torch.from_numpy(r.allocator.allocate(nl * nh * num_pages)).view(nl, nh, num_pages)
        seg = KVSegment(pages, T, is_shared=True, visible=visible)
        r.pool.k.fill_(7.0)
        r.pool.v.fill_(7.0)
        plan = load_plan(blocks, pages, r.page_size, T, visible)
        assert plan.dense == (visible is None)
        run_plan(plan, r.pool.k_slots, r.pool.v_slots, plan.index)
        pk, pv = _pool_kv(r, seg)
        if visible is None:
            assert torch.equal(pk, k) and torch.equal(pv, v)
        else:
            mask = visible[..., None].expand_as(pk)
            assert torch.equal(pk[mask], k[mask]) and torch.equal(pv[mask], v[mask])
            assert (pk[~mask] == 0).all() and (pv[~mask] == 0).all()
        r.drop_segment(seg)
    # an int8 windowed chunk: decoded grouped by token count; rows follow host memory, still one copy
    mc = r.model_config
    classes = torch.ones(mc.num_layers, mc.num_kv_heads, dtype=torch.int64)
    classes[:, 0] = 0
    cfg = StoreConfig(cold_codec="int8", heads=HeadCompression.from_mask(classes, 8), host_bytes=64 << 20)
    q8 = ChunkKVStore(tmp_path / "int8", KVFingerprint("w", "t", hash_token_ids([1]), "float32"), config=cfg)
    q8.put("q", k, v)
    q8.evict()
    blocks = q8.get_blocks("q")
    assert blocks is not None
    _, _, _, visible = blocks_geometry(blocks, T)
    nl, nh = k.shape[:2]
    pages = torch.from_numpy(r.allocator.allocate(nl * nh * -(-T // r.page_size))).view(nl, nh, -1)
    seg = KVSegment(pages, T, is_shared=True, visible=visible)
    plan = load_plan(blocks, pages, r.page_size, T, visible)
    # rows go layer by layer (what a layer-major load splits on): per layer, the global heads' blocks and
    # the local head's block are each one run of the decoded buffer (grouped by token count)
    assert len(plan.runs) <= 2 * nl and not plan.dense
    run_plan(plan, r.pool.k_slots, r.pool.v_slots, plan.index)
    pk, pv = _pool_kv(r, seg)
    for (layer, head), b in blocks.items():
        span = slice(b.token_start, b.token_start + b.num_tokens)
        assert torch.equal(pk[layer, head, span], b.k) and torch.equal(pv[layer, head, span], b.v)
    r.drop_segment(seg)
    q8.close()
    # blocks that are not back to back are copied one run each, same bytes
    a, b = torch.arange(6.0), torch.arange(6.0, 10.0)
    runs = byte_runs([a[:3], a[3:], b])
    assert len(runs) == 2 and torch.equal(torch.cat(runs), torch.cat([a, b]).view(torch.uint8))
    cache.clear()
    store.close()


@pytest.mark.parametrize("layers_per_event", [1, 2, 3])
def test_layered_load_equals_chunk_loads_cpu(tmp_path: Path, layers_per_event: int) -> None:
    """`issue_layered` over dense, head-windowed and int8 head-windowed chunks (one batch, layer group by
    layer group) leaves the pool exactly as `run_plan` chunk by chunk: same slots, same bits, the
    tokens a local head does not store zeroed."""
    from redknot_rag.store.layer_load import issue_layered, layer_groups

    r = _runner("cpu", torch.float32)
    store, k, v = _store(tmp_path, r, "float32")
    mc = r.model_config
    classes = torch.ones(mc.num_layers, mc.num_kv_heads, dtype=torch.int64)
    classes[:, 0] = 0
    cfg = StoreConfig(cold_codec="int8", heads=HeadCompression.from_mask(classes, 8), host_bytes=0)
    q8 = ChunkKVStore(tmp_path / "int8", KVFingerprint("w", "t", hash_token_ids([1]), "float32"), config=cfg)
    q8.put("q", k, v)
    store.put("dense2", k.flip(2).contiguous(), v.flip(2).contiguous())
    chunks = [(store, "dense"), (store, "windowed"), (q8, "q"), (store, "dense2")]

    def plans() -> list[tuple[LoadPlan, KVSegment]]:
        out = []
        for st, key in chunks:
            blocks = st.get_blocks(key)
            assert blocks is not None
            _, _, _, visible = blocks_geometry(blocks, T)
            pages = torch.from_numpy(r.allocator.allocate(mc.num_layers * mc.num_kv_heads * -(-T // r.page_size)))
            pages = pages.view(mc.num_layers, mc.num_kv_heads, -1)
            plan = load_plan(blocks, pages, r.page_size, T, visible)
            out.append((plan, KVSegment(pages, T, is_shared=True, visible=visible)))
        return out

    chunk_major = plans()
    r.pool.k.fill_(7.0)
    r.pool.v.fill_(7.0)
    for p, _ in chunk_major:
        run_plan(p, r.pool.k_slots, r.pool.v_slots, p.index)
    want = [_pool_kv(r, seg) for _, seg in chunk_major]
    layered = plans()  # fresh pages: the same layout in other slots
    assert not {int(x) for _, s in layered for x in s.pages.flatten()} & {
        int(x) for _, s in chunk_major for x in s.pages.flatten()
    }
    r.pool.k.fill_(7.0)
    r.pool.v.fill_(7.0)
    events = issue_layered([p for p, _ in layered], r.pool.k_slots, r.pool.v_slots, layers_per_event)
    assert events == [None] * mc.num_layers  # CPU: written synchronously
    for (wk, wv), (_, seg) in zip(want, layered, strict=True):
        pk, pv = _pool_kv(r, seg)
        assert torch.equal(pk, wk) and torch.equal(pv, wv)  # zeros where a local head stores nothing, too
    assert not any(torch.equal(a, b) for (a, _), (b, _) in zip(want, want[1:]))  # the chunks differ
    assert layer_groups(3, layers_per_event)[-1][1] == 3
    with pytest.raises(ValueError, match="layers_per_event"):
        layer_groups(3, 0)
    q8.close()
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layered_load_gates_forward_gpu(tmp_path: Path) -> None:
    """`get_blocks_many` queues the copies layer-major and returns without waiting for them; after
    `ready_layers()` the runner's forward waits per layer, so with ~1 s of GPU sleep queued ahead of
    the copies (and stale bytes in the pool) its logits still equal those of a fully waited load."""
    runner = _runner("cuda", torch.bfloat16)
    store, k, v = _store(tmp_path, runner, "bfloat16")
    cache = SegmentCache(runner, max_pages=runner.num_pages)
    assert cache.stream is not None
    ids = [5, 9, 17, 33]

    def items() -> list:
        return [(key, lambda key=key: store.get_blocks(key), T, None) for key in ("dense", "windowed")]

    def logits(segs: list) -> torch.Tensor:
        kv = runner.new_seq_kv()
        pos = 0
        for seg in segs:
            runner.attach(kv, seg, torch.arange(pos, pos + T), seg.visible)
            pos += T
        try:
            return runner.append_forward(kv, ids, torch.arange(pos, pos + len(ids)), logits=True).logits.cpu()
        finally:
            runner.release(kv)

    segs = cache.get_blocks_many(items(), layers_per_event=1)  # warm-up: first launches, allocator caches
    cache.ready()
    want = logits(segs)
    cache.clear()
    runner.pool.k.fill_(7.0)  # stale bytes a read that did not wait for the copies would see
    runner.pool.v.fill_(7.0)
    torch.cuda.synchronize()
    with torch.cuda.stream(cache.stream):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued ahead of the copies
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call on the load path raises here
    try:
        segs = cache.get_blocks_many(items(), layers_per_event=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(s is not None for s in segs) and cache._layer_events
    events = cache._layer_events[0]
    assert len(events) == runner.model_config.num_layers and not events[-1].query()  # the host did not wait
    cache.ready_layers()
    assert runner._layer_gates is not None and not cache._layer_events
    got = logits(segs)  # the forward waited per layer on the device
    assert runner._layer_gates is None  # every gate consumed by the full forward
    assert torch.equal(got, want)
    cache.clear()
    store.close()
