r"""Cold reads sized to the device, on the CPU: the store's disk and Redis read paths before and after
issue 25's item 3, over the SAME chunk files and the same Redis in one run, beside the disk's own
cold read speed measured in that run.

    PYTHONPATH=$PWD python3 bench/store/read_depth.py --out bench/store/results_read_depth_cpu.json

Chunks: Llama-3-8B block layout (32 layers x 8 kv heads x 128 dims, bf16), `--tokens` (512) tokens
each (64 MiB a chunk), `--chunks` (16) of them, random values, dense (raw) blocks. A pass reads every
block of every chunk with `ChunkKVStore.get_blocks_many` (`--workers` chunk readers, as the serving
load does), the host tier emptied first. Cold: posix_fadvise(DONTNEED) on every chunk file before
the pass (`page_cache.drop_page_cache`; the machine's other cached pages are left alone). Paths:

  disk one-pread     disk_read_depth=1: each chunk's run in one pread (the path before item 3); with
                     `_direct`: that one read with O_DIRECT (the kernel queues its whole range at once)
  disk depth N       a chunk's run split into 1 MiB pieces, N threads of preads (`DiskTier.reader`)
  disk depth N direct  the same with O_DIRECT (aligned buffer, no page-cache copy)
  redis per-chunk    redis_pipeline=False: per chunk a GET of its meta and one MGET of its layers
  redis pipelined    one MGET of every chunk's meta, then per stream (`--redis-streams` connections side
                     by side) one MGET of its chunks' layers

Redis passes use a fresh store each time (no meta known: a chunk this replica has not read yet) and
also a store that knows the metas (`*_metas_known`). Device speed: one `--probe-bytes` file written,
fsynced and dropped from the page cache, read (a) sequentially in 8 MiB reads and (b) with O_DIRECT
in 1 MiB pieces by 16 threads. Every path runs once per repetition, interleaved, medians reported
(the machine is shared: numbers are noisy). Redis round trips: the server's own GET + MGET count.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from page_cache import drop_page_cache  # noqa: E402
from redis_server import start_redis  # noqa: E402

from redknot_rag.store import ChunkKVStore, KVFingerprint, StoreConfig, hash_token_ids  # noqa: E402
from redknot_rag.store.disk import DIRECT_ALIGN, DiskTier, aligned  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def drop_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def device_read_speed(path: Path) -> dict:
    """GB/s of the disk itself on a cold file: sequential 8 MiB buffered reads, and O_DIRECT 1 MiB pieces
    by 16 threads (queue depth 16)."""
    size = path.stat().st_size
    drop_file(path)
    buf = bytearray(8 << 20)
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    pos = 0
    while (n := os.preadv(fd, [buf], pos)) > 0:
        pos += n
    seq = time.perf_counter() - t
    os.close(fd)
    drop_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    piece = 1 << 20
    dst = aligned(None, size, DIRECT_ALIGN)

    def one(off: int) -> None:
        os.preadv(fd, [dst[off : off + piece]], off)

    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(0, size, piece)))
    deep = time.perf_counter() - t
    os.close(fd)
    return dict(bytes=size, sequential_8MiB_GBps=size / seq / 1e9, direct_depth16_GBps=size / deep / 1e9)


def redis_calls(url: str) -> int:
    """GET + MGET commands the server has answered so far (its own count: round trips of the read path)."""
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("get", "mget"))


def timed_pass(store: ChunkKVStore, keys: list[str], workers: int) -> float:
    store.evict()
    t = time.perf_counter()
    got = [b for _, b in store.get_blocks_many(keys, workers)]
    s = time.perf_counter() - t
    if any(b is None for b in got):
        raise RuntimeError("a chunk missed")
    del got
    store.evict()  # several stores live side by side: none keeps a pass's GiB
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--probe-bytes", type=int, default=1 << 30)
    ap.add_argument("--redis-streams", type=int, default=4)
    args = ap.parse_args()
    L, H, D = 32, 8, 128
    work = Path(tempfile.mkdtemp(prefix="rkv-depth-", dir=os.environ.get("RKV_BENCH_DIR")))
    proc, url = start_redis(work)
    fp = KVFingerprint("m", "t", hash_token_ids([1]), "bfloat16")
    host = 4 << 30
    try:
        writer = ChunkKVStore(work / "disk", fp, config=StoreConfig(host_bytes=0))
        redis_writer = None
        if url is not None:
            from redknot_rag.store.redis_tier import RedisTier

            redis_writer = ChunkKVStore(work / "r", fp, 0, cold=RedisTier.from_url(url, fp, timeout_s=60.0))
        g = torch.Generator().manual_seed(0)
        keys = [f"c{i}" for i in range(args.chunks)]
        for key in keys:
            k, v = (torch.randn(L, H, args.tokens, D, generator=g).to(torch.bfloat16) for _ in range(2))
            writer.put(key, k, v, keep_in_memory=False)
            if redis_writer is not None:
                redis_writer.put(key, k, v, keep_in_memory=False)
        writer.close()
        probe = work / "probe.bin"
        with open(probe, "wb") as f:
            block = os.urandom(8 << 20)
            for _ in range(args.probe_bytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        nbytes = 2 * L * H * args.tokens * D * 2 * args.chunks

        def disk_store(depth: int, direct: bool) -> ChunkKVStore:
            cfg = StoreConfig(host_bytes=host, disk_read_depth=depth, disk_direct_io=direct)
            return ChunkKVStore(work / "disk", fp, config=cfg)

        stores = {
            "disk_one_pread": disk_store(1, False),
            "disk_one_pread_direct": disk_store(1, True),
            f"disk_depth{args.depth}": disk_store(args.depth, False),
            f"disk_depth{args.depth}_direct": disk_store(args.depth, True),
        }
        root = stores["disk_one_pread"].tiers[0]
        assert isinstance(root, DiskTier)
        passes: dict[str, Callable[[], float]] = {}
        for name, store in stores.items():

            def cold(store: ChunkKVStore = store, workers: int = args.workers) -> float:
                drop_page_cache(root.ns)
                return timed_pass(store, keys, workers)

            passes[f"{name}_cold"] = cold
            if not name.endswith("direct"):
                passes[f"{name}_warm"] = functools.partial(timed_pass, store, keys, args.workers)
            passes[f"{name}_cold_1reader"] = functools.partial(cold, store, 1)
        if url is not None:
            from redknot_rag.store.redis_tier import RedisTier

            def redis_store(pipeline: bool) -> ChunkKVStore:
                tier = RedisTier.from_url(url, fp, timeout_s=60.0)
                cfg = StoreConfig(host_bytes=host, redis_pipeline=pipeline, redis_streams=args.redis_streams)
                return ChunkKVStore(work / "rr", fp, cold=tier, config=cfg)

            known = {p: redis_store(p) for p in (False, True)}
            for p, label in ((False, "redis_per_chunk"), (True, "redis_pipelined")):

                def fresh(p: bool = p) -> float:
                    store = redis_store(p)
                    try:
                        return timed_pass(store, keys, args.workers)
                    finally:
                        store.close()

                passes[label] = fresh
                passes[f"{label}_metas_known"] = functools.partial(timed_pass, known[p], keys, args.workers)
        secs: dict[str, list[float]] = {name: [] for name in passes}
        round_trips: dict[str, int] = {}
        device: list[dict] = []
        for name, run in passes.items():  # warm-up: threads, connections, allocator
            if not name.endswith("_cold_1reader"):
                run()
        for rep in range(args.reps):
            device.append(device_read_speed(probe))
            for name, run in passes.items():
                before = redis_calls(url) if url is not None and name.startswith("redis") else None
                secs[name].append(run())
                if before is not None and url is not None:
                    round_trips[name] = redis_calls(url) - before
                print(rep, name, f"{nbytes / secs[name][-1] / 1e9:.3f} GB/s", flush=True)
        row: dict = dict(
            machine=f"CPU: {cpu_name()}, {os.cpu_count()} cores, shared with other jobs (numbers are noisy); "
            f"disk: the VM's virtio block device (ext4); no GPU",
            chunks=args.chunks,
            tokens=args.tokens,
            chunk_bytes=nbytes // args.chunks,
            bytes_read=nbytes,
            workers=args.workers,
            depth=args.depth,
            reps=args.reps,
            direct_io_used=bool(stores[f"disk_depth{args.depth}_direct"].tiers[0].direct_io),  # type: ignore[attr-defined]
            device_cold_read=dict(
                sequential_8MiB_GBps=statistics.median(d["sequential_8MiB_GBps"] for d in device),
                direct_depth16_GBps=statistics.median(d["direct_depth16_GBps"] for d in device),
                probe_bytes=device[0]["bytes"],
                all=device,
            ),
            paths={
                name: dict(
                    median_s=statistics.median(s),
                    GBps=nbytes / statistics.median(s) / 1e9,
                    all_s=s,
                    **({"redis_round_trips": round_trips[name]} if name in round_trips else {}),
                )
                for name, s in secs.items()
            },
        )
        for store in (*stores.values(), *(known.values() if url is not None else ())):
            store.close()
        if redis_writer is not None:
            redis_writer.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v["GBps"] for k, v in row["paths"].items()}, indent=1))
    print(json.dumps({k: v for k, v in row["device_cold_read"].items() if k != "all"}))


if __name__ == "__main__":
    main()
