r"""TTFT with the chunks' KV in each storage tier (GPU pool, pinned host, local disk, Redis), and a Zipf
query stream over a corpus larger than the GPU tier; random-weight Llama-3-8B shape, bf16, against
transformers SDPA full prefill in the same run.

On the GPU machine (the working directory is a copy of the repo carrying .whl/, .ficache/, .redis/):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1; mkdir -p ~/.cache && \
      tar xzf .ficache/fi.tgz -C ~/.cache; ln -sfn ../kernels redknot_rag/kernels; \
      ln -sfn ../retrieval redknot_rag/retrieval; python3 -m pytest -q -p no:cacheprovider --tb=short \
      tests/test_segment_cache.py tests/test_store.py 2>&1 | tail -30; python3 bench/store/gpu_tiers.py --out $OUT

(one line; carry .whl (FlashInfer, crc32c, redis-py wheels), .ficache and .redis (bench/store/redis_bundle.sh)).

On a CPU, the same code with a 2-layer model and short chunks (about a minute):

    PYTHONPATH=$PWD python3 bench/store/gpu_tiers.py --device cpu --tiny --out /tmp/tiers

`--device-decode` adds, after each compressed setting, the same setting with `decode_on="device"` over
the same stored files (`<setting>+device-decode`): the host tier keeps the int8/int4 payloads as stored
(pinned), the load copies those bytes and decodes them on the GPU (store/device_decode.py), so every
tier row of the pair is host decode vs device decode in one run, beside the same transformers prefill
(default `--budget-s` then 480). On a CPU pool the device-decode setting decodes on the host (the
fallback): the tiny run only checks the plumbing. `--profile-issue` adds to each host-tier row the top
functions of one more (untimed) layer-major load's host side under cProfile (`issue_profile`).

Part 1, tiers. A query is `[anchor][chunk_1]...[chunk_64][question]` (64 x 512-token chunks, a 64-token
question: 32,864 tokens). The chunks' KV (prefilled behind the anchor, untimed) is stored under two
settings (`--settings`): `dense` (every head global: random weights have no head profile; raw blocks
in the storage dtype) and `compressed` (a SYNTHETIC head profile: a seeded random `--global-share` of
each layer's kv heads global, the others local keeping the chunk's last `--local-window` tokens; int8
cold codec). Per setting and tier, after one warm-up query, up to `--reps` queries (fewer where the
warm-up shows they would take longer than `--tier-s`), each timed as
  load      the chunks' blocks from the tier into the GPU pool: `ChunkKVStore.get_blocks` (host tier hit,
            or a disk/Redis read, checksummed, promoted into pinned host memory) then the host -> pool
            copy on the segment cache's side stream (`SegmentCache.get_blocks`, `ready()`); none for `gpu`
  relocate / select / forward   bench/rag_gpu's query under `--policy` (select: the question's probe
            pass; forward: ONE forward of the recomputed tokens and the question, to the first token)
and TTFT = load + relocate + select + forward (device synced between phases). Each non-GPU tier also runs
the same query OVERLAPPED (`overlap` in its row): after the reads, the host -> pool copies of all chunks
are queued layer-major, `--layers-per-event` layers at a time, each group with an event
(`SegmentCache.get_blocks_many`, `store/layer_load.py`), and relocate, select and the forward run
without any sync; the probe and each forward layer wait on the device only for their own layers'
copies (`KVRunner.await_layers`), so the copies of later layers run under earlier layers' compute.
Its TTFT is one interval from the start of the load to the first token. `question_only_s` is the
forward of the `naive` policy (the question alone over the reused context), so recompute ~ forward -
question_only. Tiers:
  gpu    segments already in the GPU segment cache (hot tier hit)
  host   blocks in the store's host tier (pinned on a CUDA host); the segment cache is emptied first
  disk   chunk files only (host tier emptied) with the page cache dropped before each query:
         posix_fadvise(DONTNEED) on every chunk file, plus `echo 1 > /proc/sys/vm/drop_caches` where
         permitted (the JSON says whether it was)
  redis  a store whose only cold tier is a local redis-server (`.redis/` bundle or the system's), host
         tier emptied first; skipped with the reason when Redis cannot start
Bytes moved: what the host tier holds of the query's blocks, copied to the GPU (decoded K/V in the
storage dtype, or the encoded payloads with device decode); GB/s =
bytes / load, beside `h2d_pinned_GBps` (one 1 GiB copy from pinned host memory: the ceiling of any
tier's load); for disk and Redis also `bytes_read` (the encoded payloads the tier holds) and
`read_GBps`. Cold tiers are read `--read-workers` chunks at a time (`ChunkKVStore.get_blocks_many`).
The tier parts start only while `--zipf-reserve-s` of `--budget-s` is left, so part 2 always runs.

Part 2, Zipf. `--zipf-chunks` distinct chunks (>= 2x the segment cache's `--zipf-cache-chunks`) in a store
of host budget `--zipf-host-chunks`, disk budget `--zipf-disk-chunks` and Redis (every chunk, write-
through; without Redis the disk budget is lifted). `--zipf-queries` queries of `--zipf-top-k` chunks drawn
by bench/store/zipf.py's Zipf popularity: per query TTFT (the overlapped query: from the start of the
load to the first token; `load_*` is the host time until every copy is queued), where each chunk came
from (GPU cache hit, or the store tier that served its blocks), and the bytes each tier holds, asserted
within its budget after every query.

Writes results_tiers_<card>.json (+ .png) under `--out` (default: this folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # zipf, redis_server, page_cache


def _load_rag_gpu() -> Any:
    """bench/rag_gpu/run.py as a module: its model build, query phases and transformers baseline."""
    spec = importlib.util.spec_from_file_location("rag_gpu_run", HERE.parent / "rag_gpu" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rag = _load_rag_gpu()  # puts bench/engine on sys.path: `common` below is bench/engine/common.py
from common import Timer, card, free_memory, sync  # noqa: E402
from page_cache import drop_page_cache  # noqa: E402
from redis_server import redis_command, start_redis  # noqa: E402
from zipf import pct, query_stream  # noqa: E402

from redknot_rag.reuse import ReuseInput  # noqa: E402
from redknot_rag.store import ChunkKVStore, Codec, KVFingerprint, StoreConfig  # noqa: E402
from redknot_rag.store.disk import DiskTier  # noqa: E402
from redknot_rag.store.load_plan import byte_runs  # noqa: E402
from redknot_rag.store.segment_cache import SegmentCache  # noqa: E402
from redknot_rag.store.store_config import HeadCompression  # noqa: E402

TIERS = ("gpu", "host", "disk", "redis")
SETTING_TEXT = {
    "dense": "every head global (random weights have no head profile), raw blocks in the serving dtype",
    "compressed": "SYNTHETIC head profile (random weights have none): a random {share:.0%} of each layer's kv heads "
    "global, the rest local, storing only the chunk's last {window} tokens; int8 cold codec (per-channel K, "
    "per-token V scales) on disk and in Redis, the host tier holding the decoded blocks",
    "compressed-int4": "the same SYNTHETIC head profile and windows as `compressed`, with the int4 cold codec "
    "(K per channel over 32-token groups, V per token over 32-channel groups, f16 scale and minimum)",
}
DEVICE_DECODE = "+device-decode"  # suffix of a compressed setting measured with StoreConfig.decode_on="device"
DEVICE_DECODE_TEXT = (
    "; DEVICE DECODE: the same stored files, the host tier holding the encoded payloads (pinned), copied to the "
    "GPU as they are and decoded there (store/device_decode.py)"
)
SHORT = {"dense": "bf16", "compressed": "i8", "compressed-int4": "i4"}  # plot labels


def compressed_config(
    num_layers: int, num_kv_heads: int, args: Any, host_bytes: int, codec: str = "int8"
) -> StoreConfig:
    """A compressed setting: a synthetic head profile (seeded) plus a quantized cold codec."""
    g = torch.Generator().manual_seed(2)
    n_global = max(1, round(args.global_share * num_kv_heads))
    classes = torch.zeros(num_layers, num_kv_heads, dtype=torch.int64)  # [L, Hkv]: 0 local, 1 global
    for layer in range(num_layers):
        classes[layer, torch.randperm(num_kv_heads, generator=g)[:n_global]] = 1
    hc = HeadCompression.from_mask(classes, args.local_window)
    return StoreConfig(host_bytes=host_bytes, heads=hc, cold_codec=codec)


def host_bytes_per_chunk(cfg: StoreConfig, L: int, H: int, T: int, D: int, elem: int) -> int:
    """Bytes of one chunk's decoded blocks (what the host tier holds and copies to the GPU)."""
    hc = cfg.heads
    tokens = sum(hc.token_range(layer, h, T)[1] for layer in range(L) for h in range(H)) if hc else L * H * T
    return 2 * tokens * D * elem


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ------------------------------------------------------------------------------------ page cache
def try_drop_caches() -> str:
    """`echo 1 > /proc/sys/vm/drop_caches` (needs root): "ok" or why not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return "ok"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def read_gbps(path: Path) -> float:
    """GB/s of one whole read of a file (what a page-cache check compares)."""
    t = time.perf_counter()
    with open(path, "rb") as f:
        n = len(f.read())
    return n / (time.perf_counter() - t) / 1e9


def page_cache_check(root: Path, use_drop_caches: bool) -> dict:
    """One chunk file read cold (after the drop) and warm: a cold read near the warm one means the drop
    did not take effect."""
    path = next(root.rglob("*.rkv"))
    drop_page_cache(root)
    if use_drop_caches:
        try_drop_caches()
    cold = read_gbps(path)
    return dict(file_bytes=path.stat().st_size, cold_read_GBps=cold, warm_read_GBps=read_gbps(path))


def h2d_ceiling(dev: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one large copy from pinned host memory to the device: the floor any tier's load meets."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    with Timer(dev) as t:
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
    del src, dst
    free_memory()
    return 3 * nbytes / t.s / 1e9


# ------------------------------------------------------------------------------------ loading
def load_segments(
    cache: SegmentCache,
    store: ChunkKVStore,
    keys: list[str],
    num_tokens: int,
    workers: int = 8,
    layered: bool = False,
    layers_per_event: int = 4,
) -> list[Any]:
    """Every chunk's pool-resident segment (cache hit, or the store's blocks copied into the pool),
    the serving path's load (`SegmentCache.get_from_store`): chunks the cache lacks are read from cold
    tiers by `workers` threads at once. Layer-major (`layered=True`): after the reads, the copies of
    all chunks are queued layer group by layer group and the runner's forwards wait for each layer's
    copies only when they reach it (`ready_layers`). Chunk-major (`layered=False`): each chunk is
    copied as soon as it is read and the current stream waits (on the device) for all copies
    (`ready`). A miss anywhere is an error: the bench stored every chunk."""
    chunks = [(key, num_tokens, None) for key in keys]
    if layered:
        segs = cache.get_from_store(store, chunks, workers, layers_per_event)
        cache.ready_layers()  # the runner's forwards wait per layer: the copies overlap select and forward
    else:
        segs = cache.get_from_store(store, chunks, workers, layers_per_event=None)
        cache.ready()
    if any(seg is None for seg in segs):
        raise RuntimeError("a chunk is missing from every tier")
    return segs


def verify_segment(engine: Any, store: ChunkKVStore, key: str, seg: Any) -> bool:
    """The pool holds the store's blocks of chunk `key` bit for bit (dense chunks: every token)."""
    r = engine.runner
    blocks = store.get_blocks(key)
    assert blocks is not None
    r.settle_layers()
    k, v = (x.cpu() for x in r.read_slots(seg.slots(r.page_size)))  # [L, Hkv, T, D]
    return all(
        torch.equal(k[layer, head, b.token_start : b.token_start + b.num_tokens], b.k.cpu().to(k.dtype))
        and torch.equal(v[layer, head, b.token_start : b.token_start + b.num_tokens], b.v.cpu().to(v.dtype))
        for (layer, head), b in blocks.items()
    )


def overlapped_ttft(
    engine: Any,
    cache: SegmentCache,
    store: ChunkKVStore,
    ctx: dict,
    args: Any,
    keys: list[str] | None = None,
    chunks: list[list[int]] | None = None,
) -> dict:
    """One query with the chunks' load layer-major under it: the reads, then the copies queued layer
    group by layer group (`load_segments(layered=True)`), relocate, select (the probe waits only for
    its layers) and the one forward (each layer waits for its own copies), with no device sync in
    between; TTFT = from the start of the load to the first token on the host."""
    from redknot_rag.reuse import relocate

    r = engine.runner
    sync(ctx["dev"])
    t0 = time.perf_counter()
    keys = keys or ctx["keys"]
    segs = load_segments(
        cache, store, keys, args.chunk_tokens, args.read_workers, layered=True,
        layers_per_event=args.layers_per_event,
    )  # fmt: skip
    issue_s = time.perf_counter() - t0
    inp = ReuseInput(ctx["anchor"], ctx["anchor_seg"], chunks or ctx["chunks"], segs, ctx["question"])
    kv = relocate(r, inp)
    try:
        base, _, arg = args.policy.partition(":")
        idx = torch.zeros(0, dtype=torch.int64)
        if base != "naive":
            idx = rag.select_tokens(engine, "redknot", inp, kv, float(arg or 0.1), 4, args.probe_layers)
        rag.one_forward(engine, kv, inp.context_ids, idx, inp.question_ids)  # ends with the token on the host
        ttft = time.perf_counter() - t0
    finally:
        r.release(kv)
    r.settle_layers()  # nothing left gated (a policy that read fewer layers)
    return dict(ttft_s=ttft, issue_s=issue_s, segs=segs)


def profile_issue(cache: SegmentCache, store: ChunkKVStore, ctx: dict, args: Any, top: int = 25) -> dict:
    """The host side of one layer-major load (`load_segments(layered=True)`: reads, plans, queued copies)
    under cProfile, untimed otherwise: its wall time (with the profiler's overhead) and the `top`
    functions by own time and by cumulative time, as (function, calls, own s, cumulative s)."""
    import cProfile
    import pstats

    sync(ctx["dev"])
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    load_segments(cache, store, ctx["keys"], args.chunk_tokens, args.read_workers, layered=True,
                  layers_per_event=args.layers_per_event)  # fmt: skip
    pr.disable()
    wall = time.perf_counter() - t0
    cache.ready()
    ctx["engine"].runner.settle_layers()  # nothing left gated: no forward consumes these
    sync(ctx["dev"])
    st = pstats.Stats(pr)
    rows = [
        (f"{Path(f).name}:{line}:{fn}", int(calls), float(own), float(cum))
        for (f, line, fn), (_, calls, own, cum, _) in st.stats.items()  # type: ignore[attr-defined]
    ]
    return dict(
        wall_s=wall,
        by_own_s=sorted(rows, key=lambda r: -r[2])[:top],
        by_cumulative_s=sorted(rows, key=lambda r: -r[3])[:top],
    )


def tier_block_hits(store: ChunkKVStore) -> dict[str, int]:
    return {t.name: t.block_hits for t in store.stats().tiers}


# ------------------------------------------------------------------------------------ part 1: tiers
def run_tiers(ctx: dict, args: Any, data: dict, setting: dict) -> None:
    """Part 1 for one storage setting (`setting`: name, tiers, disk store, Redis store or None, bytes):
    TTFT with the chunks' KV in each of `setting["tiers"]`; results under data["settings"][name]."""
    engine, dev, policy = ctx["engine"], ctx["dev"], args.policy
    keys, chunks, T = ctx["keys"], ctx["chunks"], args.chunk_tokens
    st_disk: ChunkKVStore = setting["disk"]
    st_redis: ChunkKVStore | None = setting["redis"]
    cache = SegmentCache(engine.runner, max_pages=engine.runner.num_pages)
    out: dict[str, Any] = {}
    data["settings"][setting["name"]]["tiers"] = out
    drop_ok = data["drop_caches"]
    disk_root = st_disk.tiers[0].ns if isinstance(st_disk.tiers[0], DiskTier) else None
    stored = setting["stored_bytes_per_chunk"] * len(keys)  # what disk / Redis hold for the query's chunks
    moved = setting["host_bytes_per_chunk"] * len(keys)  # what the host tier holds and copies to the GPU

    def prepare(tier: str) -> ChunkKVStore:
        """Untimed: put the chunks' KV in `tier` and nowhere warmer; returns the store to read."""
        if tier == "gpu":
            load_segments(cache, st_disk, keys, T, args.read_workers)
            return st_disk
        cache.clear()
        if tier == "host":
            load = [k for k in keys if len(st_disk.memory.chunk_blocks(k)) < ctx["blocks_per_chunk"]]
            for k in load:
                assert st_disk.get_blocks(k, encoded=True) is not None
            return st_disk
        store = st_disk if tier == "disk" else st_redis
        assert store is not None
        store.evict()
        if tier == "disk":
            assert disk_root is not None
            drop_page_cache(disk_root)
            if drop_ok == "ok":
                try_drop_caches()
        return store

    def measure(tier: str) -> dict:
        """One warm-up query and up to `--reps` timed ones (fewer where the warm-up shows they would
        take more than `--tier-s` seconds) with the chunks' KV in `tier`."""
        runs: list[dict] = []
        laps: list[dict] = []  # the layer-major (overlapped) runs
        verified = overlap_verified = None
        served: dict[str, int] = {}
        reps = args.reps
        rep = 0
        while rep <= reps:  # rep 0: warm-up, not recorded
            store = prepare(tier)
            hits0 = tier_block_hits(store)
            sync(dev)
            t0 = time.perf_counter()
            segs = load_segments(cache, store, keys, T, args.read_workers)
            sync(dev)
            load_s = time.perf_counter() - t0
            hits1 = tier_block_hits(store)
            if rep == 0:
                verified = verify_segment(engine, store, keys[0], segs[0]) and verify_segment(
                    engine, store, keys[-1], segs[-1]
                )
            inp = ReuseInput(ctx["anchor"], ctx["anchor_seg"], chunks, segs, ctx["question"])
            tq = time.perf_counter()
            q = rag.query(engine, policy, inp, args)
            one = time.perf_counter() - t0 + (time.perf_counter() - tq)  # ~ a rep with its prepare
            lap = None
            if tier != "gpu":  # the same query with the load layer-major under select and forward
                store = prepare(tier)
                lap = overlapped_ttft(engine, cache, store, ctx, args)
                if rep == 0:
                    overlap_verified = verify_segment(engine, store, keys[0], lap.pop("segs")[0])
                lap.pop("segs", None)
                one += lap["ttft_s"]
            if rep == 0:
                reps = max(1, min(args.reps, int(args.tier_s / max(one, 1e-3))))
            else:
                runs.append(dict(tier_load_s=load_s, relocate_s=q["load_s"], select_s=q["select_s"],
                                 forward_s=q["forward_s"], after_load_s=q["ttft_s"]))  # fmt: skip
                if lap is not None:
                    laps.append(lap)
                for name, n in hits1.items():
                    served[name] = served.get(name, 0) + n - hits0.get(name, 0)
            rep += 1
        nbytes = 0 if tier == "gpu" else moved
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        ttft = [r["tier_load_s"] + r["after_load_s"] for r in runs]
        load = med["tier_load_s"]
        row = dict(
            ttft_median_s=statistics.median(ttft),
            ttft_all_s=ttft,
            load_median_s=load,
            relocate_median_s=med["relocate_s"],
            select_median_s=med["select_s"],
            forward_median_s=med["forward_s"],
            reps=len(runs),
            bytes_moved=nbytes,  # host -> GPU: what the host tier holds (decoded blocks, or encoded payloads)
            load_GBps=nbytes / load / 1e9 if nbytes else None,
            pool_equals_store_bits=verified,
            blocks_served_per_store_tier={k: n for k, n in served.items() if n},
        )
        if laps:
            lt = [x["ttft_s"] for x in laps]
            row["overlap"] = dict(
                ttft_median_s=statistics.median(lt),
                ttft_all_s=lt,
                host_issue_median_s=statistics.median(x["issue_s"] for x in laps),
                reps=len(laps),
                layers_per_event=args.layers_per_event,
                pool_equals_store_bits=overlap_verified,
            )
        if tier in ("disk", "redis"):
            row["bytes_read"] = stored  # what the tier held and handed over (encoded payloads)
            row["read_GBps"] = stored / load / 1e9
            row["dense_equivalent_GBps"] = ctx["chunk_bytes"] * len(keys) / load / 1e9
        if tier == "host":
            blk = st_disk.memory.get(next(iter(b for b in st_disk.memory.chunk_blocks(keys[0]))))
            row["host_blocks_pinned"] = bool(blk is not None and blk.tensors[0].is_pinned())
            blocks = st_disk.get_blocks(keys[0], encoded=True)  # what the load copies
            assert blocks is not None
            order = sorted(blocks, key=lambda lh: blocks[lh].tensors[0].data_ptr())  # host memory order, as the load
            row["host_copies_per_chunk"] = len(byte_runs([t for lh in order for t in blocks[lh].tensors]))
            if args.profile_issue:
                prepare(tier)
                row["issue_profile"] = profile_issue(cache, st_disk, ctx, args)
        if tier == "gpu":  # the question alone over the same reused context: the forward's non-recompute share
            naive = [rag.query(engine, "naive", inp, args)["forward_s"] for _ in range(min(args.reps, 2))]
            row["question_only_s"] = statistics.median(naive)
            row["recompute_est_s"] = row["forward_median_s"] - row["question_only_s"]
        return row

    for tier in setting["tiers"]:
        if tier == "redis" and st_redis is None:
            out[tier] = dict(skipped=ctx["redis_why"])
            log("redis tier skipped:", ctx["redis_why"])
            continue
        if time.time() - ctx["start"] > setting["deadline_s"]:
            out[tier] = dict(skipped="time budget (kept for the Zipf part)")
            log(setting["name"], tier, "skipped: time budget")
            continue
        try:
            row = measure(tier)
        except Exception as e:  # one tier failing (e.g. Redis refusing a reply) must not lose the others
            traceback.print_exc()
            row = dict(error=f"{type(e).__name__}: {e}")
            cache.clear()
        out[tier] = row
        log(
            setting["name"],
            tier,
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "ttft_all_s"},
        )
    cache.clear()
    hf = data["hf_full_s"]
    gpu = data["settings"]["dense"]["tiers"].get("gpu", {})
    for row in out.values():
        for r in (row, row.get("overlap") or {}):
            if "ttft_median_s" in r:
                r["speedup_vs_hf_full"] = hf / r["ttft_median_s"]
                if "ttft_median_s" in gpu:
                    r["vs_gpu_resident_dense"] = r["ttft_median_s"] / gpu["ttft_median_s"]


def run_setting(
    ctx: dict, args: Any, data: dict, name: str, d_store: ChunkKVStore, r_store: ChunkKVStore | None, deadline_s: float
) -> None:
    """Part 1 for the setting `data["settings"][name]` (filled in), stored in `d_store` (disk) and `r_store`."""
    info = data["settings"][name]
    setting = dict(name=name, tiers=[t for t in TIERS if t in args.tiers and (name == "dense" or t != "gpu")],
                   disk=d_store, redis=r_store, deadline_s=deadline_s,
                   **{k: info[k] for k in ("stored_bytes_per_chunk", "host_bytes_per_chunk")})  # fmt: skip
    run_tiers(ctx, args, data, setting)


# ------------------------------------------------------------------------------------ part 2: Zipf
def run_zipf(ctx: dict, args: Any, data: dict, work: Path) -> None:
    engine, dev = ctx["engine"], ctx["dev"]
    T = args.chunk_tokens
    n = args.zipf_chunks
    pages_per_chunk = ctx["pages_per_chunk"]
    cache_pages = args.zipf_cache_chunks * pages_per_chunk
    if n < 2 * args.zipf_cache_chunks:
        raise SystemExit(f"--zipf-chunks {n} must be >= 2x --zipf-cache-chunks {args.zipf_cache_chunks}")
    if args.zipf_top_k > args.zipf_cache_chunks:
        raise SystemExit("--zipf-top-k must fit the segment cache (a query's chunks stay resident while it runs)")
    cb, fb = ctx["chunk_bytes"], ctx["chunk_file_bytes"]
    host_budget, disk_budget = args.zipf_host_chunks * cb, args.zipf_disk_chunks * fb
    url = ctx["redis_url"]
    cfg = StoreConfig(host_bytes=host_budget, disk_bytes=disk_budget if url else None)
    redis = None
    if url is not None:
        from redknot_rag.store.redis_tier import RedisTier

        redis = RedisTier.from_url(url, ctx["fp"], timeout_s=30.0)  # a dense 8B chunk is a 67 MB MGET reply
    store = ChunkKVStore(work / "zipf", ctx["fp"], config=cfg, redis=redis)
    g = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    zchunks = [torch.randint(100, vocab - 1, (T,), generator=g).tolist() for _ in range(n)]
    zkeys = [f"z{i}" for i in range(n)]
    with Timer(dev) as t:
        for i, (key, (k, v)) in enumerate(zip(zkeys, ctx["prefill"](zchunks), strict=True)):
            store.put(key, k.cpu(), v.cpu(), keep_in_memory=False)
            del k, v
            if i % 16 == 15:
                log(f"zipf corpus: {i + 1}/{n} chunks stored")
    ingest_s = t.s
    by_key = dict(zip(zkeys, zchunks, strict=True))
    cache = SegmentCache(engine.runner, max_pages=cache_pages)
    rng = random.Random(0)
    rows = []
    peak = dict(gpu_pages=0, host_bytes=0, disk_bytes=0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    L_H = ctx["blocks_per_chunk"]
    for qi, picked in enumerate(query_stream(zkeys, args.zipf_queries, args.zipf_top_k, args.zipf_s, rng)):
        if time.time() - ctx["start"] > args.budget_s:
            data.setdefault("notes", []).append(f"zipf: stopped after {qi} queries (time budget)")
            break
        if isinstance(store.tiers[0], DiskTier):
            drop_page_cache(store.tiers[0].ns)
        hits0, gpu0 = tier_block_hits(store), cache.hits
        lap = overlapped_ttft(engine, cache, store, ctx, args, picked, [by_key[k] for k in picked])
        load_s = lap["issue_s"]  # host time until every copy is queued (the copies run under the forward)
        store.wait_fills()  # Redis -> disk copies run off the read path; settle them before the budget check
        hits1 = tier_block_hits(store)
        served = {name: (hits1[name] - hits0.get(name, 0)) / L_H for name in hits1}
        served["gpu"] = cache.hits - gpu0
        held = dict(gpu_pages=cache.num_pages, host_bytes=store.memory.nbytes, disk_bytes=store.tiers[0].nbytes)
        for key, val in held.items():
            peak[key] = max(peak[key], val)
        assert held["gpu_pages"] <= cache_pages, held
        assert held["host_bytes"] <= host_budget, held
        assert cfg.disk_bytes is None or held["disk_bytes"] <= cfg.disk_bytes, held
        rows.append(dict(ttft_s=lap["ttft_s"], load_s=load_s, chunks_from=served))
    store.close()
    first = [by_key[k] for k in zkeys[: args.zipf_top_k]]  # transformers at a Zipf query's context length
    hf_prompt = ctx["anchor"] + [t for c in first for t in c] + ctx["question"]
    hf_full_s = statistics.median(rag.hf_full(ctx["hf"], hf_prompt) for _ in range(3))
    skip = min(args.zipf_warmup, len(rows) // 2)
    steady = rows[skip:]

    cfg_tiers = ["host", *(t.name for t in store.tiers)]

    def summary(rs: list[dict]) -> dict:
        tt = [r["ttft_s"] for r in rs]
        ld = [r["load_s"] for r in rs]
        total = sum(sum(r["chunks_from"].values()) for r in rs)
        share = {name: sum(r["chunks_from"].get(name, 0) for r in rs) / max(total, 1) for name in ("gpu", *cfg_tiers)}
        return dict(
            queries=len(rs),
            ttft_p50_s=pct(tt, 0.5),
            ttft_p99_s=pct(tt, 0.99),
            ttft_mean_s=sum(tt) / len(tt),
            load_p50_s=pct(ld, 0.5),
            load_p99_s=pct(ld, 0.99),
            chunk_hit_share=share,
        )

    data["zipf"] = dict(
        corpus_chunks=n,
        corpus_bytes=n * cb,
        top_k=args.zipf_top_k,
        zipf_s=args.zipf_s,
        tiers=["gpu", *cfg_tiers],
        budgets=dict(
            gpu_pages=cache_pages,
            gpu_bytes=cache_pages * ctx["page_bytes"],
            gpu_chunks=args.zipf_cache_chunks,
            host_bytes=host_budget,
            disk_bytes=cfg.disk_bytes,
            redis="every chunk (write-through), server maxmemory unset" if url else None,
        ),
        corpus_over_gpu_tier=n / args.zipf_cache_chunks,
        peak=peak,
        within_budgets=True,  # asserted after every query
        torch_max_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        ingest_s=ingest_s,
        hf_full_s=hf_full_s,
        all=summary(rows),
        steady=dict(skipped_first=skip, **summary(steady)),
        ttft_all_s=[r["ttft_s"] for r in rows],
    )
    log("zipf", {k: v for k, v in data["zipf"].items() if k != "ttft_all_s"})
    cache.clear()


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer model, short chunks (CPU debugging)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/store)")
    ap.add_argument("--work-dir", default=None, help="where the disk tier lives (default: a temp folder)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--policy", default="redknot:0.05", help="reuse policy (the fidelity budget)")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per query (64; tiny 16)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="512; tiny 32")
    ap.add_argument("--question-tokens", type=int, default=None, help="64; tiny 8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiers", type=lambda s: s.split(","), default=list(TIERS))
    ap.add_argument("--probe-layers", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="skip what would start after this (380; 480 with "
                    "--device-decode)")  # fmt: skip
    ap.add_argument("--tier-s", type=float, default=12.0, help="fewer reps where a tier's would take longer")
    ap.add_argument("--read-workers", type=int, default=8, help="chunks read from a cold tier at once")
    ap.add_argument("--layers-per-event", type=int, default=4, help="layer-major load: layers per copy group")
    ap.add_argument("--settings", type=lambda s: s.split(","), default=["dense", "compressed", "compressed-int4"])
    ap.add_argument("--local-window", type=int, default=None, help="compressed: local heads' window (64; tiny 8)")
    ap.add_argument("--global-share", type=float, default=0.25, help="compressed: share of heads global")
    ap.add_argument("--profile-issue", action="store_true", help="host tier: one more layer-major load under "
                    "cProfile; its top functions go into the row (issue_profile)")  # fmt: skip
    ap.add_argument("--device-decode", action="store_true", help="also each compressed setting with its payloads "
                    "decoded on the device (StoreConfig.decode_on='device'), over the same stored files")  # fmt: skip
    ap.add_argument("--no-zipf", action="store_true")
    ap.add_argument("--zipf-reserve-s", type=float, default=None, help="time kept for the Zipf part (85; tiny 30)")
    ap.add_argument("--zipf-chunks", type=int, default=None, help="corpus (80; tiny 32)")
    ap.add_argument("--zipf-queries", type=int, default=60)
    ap.add_argument("--zipf-top-k", type=int, default=8)
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--zipf-cache-chunks", type=int, default=None, help="GPU segment cache (32; tiny 12)")
    ap.add_argument("--zipf-host-chunks", type=int, default=None, help="host budget in chunks (48; tiny 16)")
    ap.add_argument("--zipf-disk-chunks", type=int, default=None, help="disk budget in chunks (64; tiny 24)")
    ap.add_argument("--zipf-warmup", type=int, default=10, help="queries left out of the steady summary")
    ap.add_argument("--plot", default=None, help="only redraw the PNG of this JSON")
    args = ap.parse_args()
    if args.plot:
        plot(Path(args.plot))
        return
    tiny = args.tiny
    dev = torch.device(args.device)
    if dev.type == "cpu" and not tiny:
        raise SystemExit("on the CPU pass --tiny (the 8B shape needs a GPU)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")

    def default(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if tiny else full)

    args.chunks = default(args.chunks, 64, 16)
    args.chunk_tokens = default(args.chunk_tokens, 512, 32)
    args.question_tokens = default(args.question_tokens, 64, 8)
    args.probe_layers = default(args.probe_layers, [0, 1, 2, 3], [0, 1])
    args.zipf_chunks = default(args.zipf_chunks, 80, 32)
    args.local_window = default(args.local_window, 64, 8)
    args.zipf_reserve_s = default(args.zipf_reserve_s, 85.0, 30.0)
    if args.budget_s is None:
        args.budget_s = 480.0 if args.device_decode else 380.0
    if unknown_settings := set(args.settings) - set(SETTING_TEXT):
        raise SystemExit(f"unknown settings {sorted(unknown_settings)}; choose from {sorted(SETTING_TEXT)}")
    if "dense" not in args.settings:
        raise SystemExit("--settings must include dense (the GPU-resident baseline and the Zipf part use it)")
    args.zipf_cache_chunks = default(args.zipf_cache_chunks, 32, 12)  # the corpus is 2.5x the GPU tier
    args.zipf_host_chunks = default(args.zipf_host_chunks, 48, 16)
    args.zipf_disk_chunks = default(args.zipf_disk_chunks, 64, 24)
    if unknown := set(args.tiers) - set(TIERS):
        raise SystemExit(f"unknown tiers {sorted(unknown)}; choose from {TIERS}")
    start = time.time()
    out_dir = Path(args.out or os.environ.get("OUT") or HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = card() if dev.type == "cuda" else "cpu"
    path = out_dir / f"results_tiers_{name}{'_tiny' if tiny else ''}.json"
    work = Path(args.work_dir) if args.work_dir else default_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    redis_why: list[str] = []
    proc, url = start_redis(work, redis_why)
    log("redis:", url or redis_why)
    backend = args.backend or rag.available_backends(dev)[0]
    data: dict[str, Any] = dict(
        card=name,
        device=torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({platform.machine()}, tiny shape)",
        torch=torch.__version__,
        backend=backend,
        tiny=tiny,
        policy=args.policy,
        chunks=args.chunks,
        chunk_tokens=args.chunk_tokens,
        question_tokens=args.question_tokens,
        reps=args.reps,
        heads="dense: every head global; compressed*: a SYNTHETIC head profile (random weights have none)",
        redis=url is not None,
        redis_server=" ".join(redis_command() or []) or None,
        redis_note=None if url else "; ".join(redis_why),
        notes=[],
    )

    def save() -> None:
        path.write_text(json.dumps(data, indent=1))

    try:
        hf, engine = rag.build(tiny, backend, dev)
        mc = engine.model_config
        anchor_len = 32
        need = anchor_len + args.chunks * args.chunk_tokens + args.question_tokens + 64
        engine.config = dataclasses.replace(
            engine.config, max_prefill_tokens=max(engine.config.max_prefill_tokens, need)
        )
        g = torch.Generator().manual_seed(0)

        def rand(n: int) -> list[int]:
            return torch.randint(100, mc.vocab_size - 1, (n,), generator=g).tolist()

        anchor = rand(anchor_len)
        chunks = [rand(args.chunk_tokens) for _ in range(args.chunks)]
        question = rand(args.question_tokens)
        from redknot_rag.rag.chunk_prefill import ChunkPrefiller
        from redknot_rag.store.fingerprint import hash_token_ids

        pf = ChunkPrefiller(engine.runner, anchor)

        def prefill(cs: list[list[int]]) -> Any:
            """(K, V) `[L, Hkv, T, D]` of each chunk behind the anchor, 8 chunks per forward."""
            for i in range(0, len(cs), 8):
                yield from pf.prefill(cs[i : i + 8])

        dtype = str(engine.runner.dtype).removeprefix("torch.")
        fp = KVFingerprint("random-llama3-8b", "stub-tokenizer", hash_token_ids(anchor), dtype)
        elem = torch.empty(0, dtype=engine.runner.dtype).element_size()
        L, H, D = mc.num_layers, mc.num_kv_heads, mc.head_dim
        chunk_bytes = 2 * L * H * args.chunk_tokens * D * elem
        corpus = chunk_bytes * args.chunks
        host_cfg = StoreConfig(host_bytes=int(corpus * 1.05) + (1 << 20))
        settings = {
            "dense": host_cfg,
            "compressed": compressed_config(L, H, args, host_cfg.host_bytes),
            "compressed-int4": compressed_config(L, H, args, host_cfg.host_bytes, "int4"),
        }
        stores: dict[str, dict[str, ChunkKVStore | None]] = {}
        for name in args.settings:
            cfg = settings[name]
            redis_store = None
            if url is not None:
                from redknot_rag.store.redis_tier import RedisTier

                cold = RedisTier.from_url(url, fp, timeout_s=30.0, prefix=f"rkv-{name}")
                redis_store = ChunkKVStore(work / f"redis-host-{name}", fp, cold=cold, config=cfg)
            stores[name] = dict(disk=ChunkKVStore(work / f"disk-{name}", fp, config=cfg), redis=redis_store)
        st_disk = stores["dense"]["disk"]
        st_redis = stores["dense"]["redis"]
        assert st_disk is not None
        keys = [f"c{i}" for i in range(args.chunks)]
        put_s = {name: 0.0 for name in stores}
        with Timer(dev) as t:
            for key, (k, v) in zip(keys, prefill(chunks), strict=True):
                kc, vc = k.cpu(), v.cpu()
                for name, pair in stores.items():
                    t0 = time.perf_counter()
                    for which, st in pair.items():
                        if st is not None:  # the dense disk store keeps them in host memory: the host tier
                            st.put(key, kc, vc, keep_in_memory=name == "dense" and which == "disk")
                    put_s[name] += time.perf_counter() - t0
                del k, v, kc, vc
        data["ingest_s"] = t.s
        data["put_s"] = put_s
        assert isinstance(st_disk.tiers[0], DiskTier)
        file_bytes = st_disk.tiers[0].nbytes // args.chunks
        log(f"stored {args.chunks} chunks ({corpus / 1e9:.2f} GB of K/V) in {t.s:.1f} s", put_s)
        ps = engine.runner.page_size
        ctx: dict[str, Any] = dict(
            engine=engine, hf=hf, dev=dev, keys=keys, chunks=chunks, anchor=anchor, anchor_seg=pf.anchor,
            question=question, store_disk=st_disk, store_redis=st_redis, redis_url=url,
            redis_why="; ".join(redis_why), start=start, fp=fp, prefill=prefill, chunk_bytes=chunk_bytes,
            chunk_file_bytes=file_bytes, blocks_per_chunk=L * H, pages_per_chunk=L * H * -(-args.chunk_tokens // ps),
            page_bytes=2 * ps * D * elem,
        )  # fmt: skip
        data.update(
            context_tokens=anchor_len + args.chunks * args.chunk_tokens,
            chunk_kv_bytes=chunk_bytes,
            chunk_file_bytes=file_bytes,
            bytes_per_token=chunk_bytes / args.chunk_tokens,
            work_dir_fs=_fs_of(work),
        )
        prompt = anchor + [t for c in chunks for t in c] + question
        with Timer(dev) as t:  # kernels (FlashInfer JIT from the cache), transformers, both policies
            warm_cache = SegmentCache(engine.runner, engine.runner.num_pages)
            warm_segs = load_segments(warm_cache, st_disk, keys[:8], args.chunk_tokens)
            warm = ReuseInput(anchor, pf.anchor, chunks[:8], warm_segs, question)
            for p in (args.policy, "naive"):
                rag.query(engine, p, warm, args)
            rag.hf_full(hf, anchor + [t for c in chunks[:8] for t in c] + question)
        warm_cache.clear()
        del warm_segs, warm, warm_cache
        data["warmup_s"] = t.s
        data["pool_gib"] = engine.runner.pool_bytes / 2**30
        if dev.type == "cuda":
            data["h2d_pinned_GBps"] = h2d_ceiling(dev)
            log("pinned host -> device copy ceiling", data["h2d_pinned_GBps"], "GB/s")
        hf_runs = [rag.hf_full(hf, prompt) for _ in range(1 + args.reps)][1:]
        data["hf_full_s"] = statistics.median(hf_runs)
        data["hf_full_all_s"] = hf_runs
        log("transformers full prefill", data["hf_full_s"])
        save()
        drop_ok = try_drop_caches() if "disk" in args.tiers else "not tried"
        data["drop_caches"] = drop_ok
        log("drop_caches:", drop_ok)
        if "disk" in args.tiers:
            data["page_cache_check"] = page_cache_check(st_disk.tiers[0].ns, drop_ok == "ok")
            log("page cache check", data["page_cache_check"])
        # the Zipf part always runs: the settings' tiers start only while its reserve is left
        reserve = 0.0 if args.no_zipf else args.zipf_reserve_s
        deadlines = {name: args.budget_s - reserve for name in settings}
        deadlines["dense"] -= 25.0  # the compressed settings' cold tiers are the cheaper ones
        data["settings"] = {}
        for name, pair in stores.items():
            d_store, r_store = pair["disk"], pair["redis"]
            assert d_store is not None and isinstance(d_store.tiers[0], DiskTier)
            cst = d_store.stats().class_stored_bytes
            cfg = settings[name]
            heads = None if cfg.heads is None else dict(window=cfg.heads.window, local_heads=cfg.heads.num_local,
                                                        kv_heads=L * H)  # fmt: skip
            info = dict(
                description=SETTING_TEXT[name].format(window=args.local_window, share=args.global_share),
                config=dict(cold_codec=cfg.cold_codec, decode_on=cfg.decode_on, heads=heads),
                stored_bytes_per_chunk=sum(cst.values()) / args.chunks,
                stored_bytes_by_class=cst,
                file_bytes_per_chunk=d_store.tiers[0].nbytes / args.chunks,
                host_bytes_per_chunk=host_bytes_per_chunk(cfg, L, H, args.chunk_tokens, D, elem),
                vs_dense_stored=sum(cst.values()) / (chunk_bytes * args.chunks),
                put_s=put_s[name],
            )  # fmt: skip
            data["settings"][name] = info
            run_setting(ctx, args, data, name, d_store, r_store, deadlines[name])
            save()
            if r_store is not None:
                r_store.close()
            d_store.evict()
            d_store.close()
            free_memory()
            if args.device_decode and cfg.codec != Codec.RAW:  # the same files, decoded on the device
                dd = name + DEVICE_DECODE
                dcfg = dataclasses.replace(cfg, decode_on="device")
                d_dev = ChunkKVStore(work / f"disk-{name}", fp, config=dcfg)
                r_dev = None
                if r_store is not None and url is not None:
                    from redknot_rag.store.redis_tier import RedisTier

                    cold = RedisTier.from_url(url, fp, timeout_s=30.0, prefix=f"rkv-{name}")
                    r_dev = ChunkKVStore(work / f"redis-host-{name}", fp, cold=cold, config=dcfg)
                data["settings"][dd] = dict(
                    info, description=info["description"] + DEVICE_DECODE_TEXT, config=dict(info["config"],
                    decode_on="device"), host_bytes_per_chunk=info["stored_bytes_per_chunk"],
                )  # fmt: skip
                run_setting(ctx, args, data, dd, d_dev, r_dev, deadlines[name] + 60.0)
                save()
                if r_dev is not None:
                    r_dev.close()
                d_dev.evict()
                d_dev.close()
                free_memory()
            if r_store is not None:
                for key in keys:
                    r_store.delete(key)  # free Redis for the next part
            shutil.rmtree(work / f"disk-{name}", ignore_errors=True)
        if not args.no_zipf:
            if time.time() - start > args.budget_s - 30:
                data["notes"].append("zipf: skipped (time budget)")
            else:
                try:
                    run_zipf(ctx, args, data, work)
                except Exception as e:  # keep part 1's results; the reason goes into the JSON
                    traceback.print_exc()
                    data["zipf"] = dict(error=f"{type(e).__name__}: {e}")
    finally:
        data["total_s"] = time.time() - start
        save()
        if proc is not None:
            proc.terminate()
            proc.wait()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    log("wrote", path)
    try:
        plot(path)
    except Exception as e:  # the JSON is what matters; a plotting failure is reported, not fatal
        log("plot failed:", type(e).__name__, e)


def default_work_dir() -> Path:
    """A fresh folder for the disk tier on a real disk: the temp folder unless it is in memory (tmpfs),
    else under the current directory."""
    for base in (Path(tempfile.gettempdir()), Path.cwd()):
        if _fs_of(base).split()[0] not in ("tmpfs", "ramfs"):
            return Path(tempfile.mkdtemp(prefix="rkv-tiers-", dir=base))
    return Path(tempfile.mkdtemp(prefix="rkv-tiers-"))


def _fs_of(path: Path) -> str:
    """The filesystem type and device the disk tier sits on (from /proc/mounts; best effort)."""
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best[2]):
                best = (dev, fs, mnt)
    except OSError:
        pass
    return f"{best[1]} on {best[0]} (mounted at {best[2]})"


def _short(setting: str) -> str:
    """A plot label: bf16, i8, i4, i8dd (device decode), ..."""
    base = setting.removesuffix(DEVICE_DECODE)
    return SHORT.get(base, base[:3]) + ("dd" if base != setting else "")


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(path).read_text())
    if "settings" in d:  # one bar per (setting, tier)
        rows = {f"{_short(n)}:{t}": r for n, st in d["settings"].items() for t, r in st.get("tiers", {}).items()}
    else:  # results from before the storage settings
        rows = d.get("tiers", {})
    tiers = {k: v for k, v in rows.items() if "ttft_median_s" in v}
    fig, axes = plt.subplots(1, 2, figsize=(13 + 0.25 * max(0, len(tiers) - 12), 4.8), width_ratios=[2, 1])
    ax = axes[0]
    parts = [("load_median_s", "load (tier -> GPU pool)"), ("relocate_median_s", "relocate"),
             ("select_median_s", "select (probe)"), ("forward_median_s", "forward (recompute + question)")]  # fmt: skip
    names = list(tiers)
    bottom = [0.0] * len(names)
    for key, label in parts:
        vals = [tiers[n][key] * 1e3 for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    for i, n in enumerate(names):
        gbps = tiers[n].get("load_GBps")
        ax.text(i, bottom[i], f"{tiers[n]['ttft_median_s'] * 1e3:.0f} ms" + (f"\n{gbps:.1f} GB/s" if gbps else ""),
                ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.axhline(d["hf_full_s"] * 1e3, color="gray", ls="--", lw=1, label="transformers full prefill")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"{d['policy']}, {d['chunks']} x {d['chunk_tokens']}-token chunks, KV in each tier ({d['card']})")
    ax.legend(fontsize=7)
    ax = axes[1]
    z = d.get("zipf")
    if z:
        tt = sorted(x * 1e3 for x in z["ttft_all_s"])
        ax.plot(tt, [(i + 1) / len(tt) for i in range(len(tt))], label="TTFT CDF (all queries)")
        if "hf_full_s" in z:
            ax.axvline(z["hf_full_s"] * 1e3, color="gray", ls="--", lw=1, label="transformers full prefill")
        share = z["steady"]["chunk_hit_share"]
        text = "chunks served by (steady):\n" + "\n".join(f"{k}: {v:.0%}" for k, v in share.items())
        ax.text(0.98, 0.05, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of queries")
        ax.set_title(
            f"Zipf s={z['zipf_s']}: {z['corpus_chunks']} chunks, GPU tier {z['budgets']['gpu_chunks']}, "
            f"top-{z['top_k']}"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path).replace(".json", ".png"), dpi=110)


if __name__ == "__main__":
    main()
