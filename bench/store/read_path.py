r"""The store's cold read path on the CPU: GB/s of `ChunkKVStore` reads of whole chunks from disk (page
cache dropped for the chunk files only, or warm) and from a local Redis, host tier emptied before each
pass. Runs against whichever `redknot_rag` is on PYTHONPATH, so the same script measures two versions:

    PYTHONPATH=$PWD python3 bench/store/read_path.py --label new --out bench/store/results_read_path_cpu.json
    PYTHONPATH=/path/to/old/checkout python3 bench/store/read_path.py --label old --out ...same json...

Chunks have the Llama-3-8B block layout (32 layers x 8 kv heads x 128 dims, bf16) with short chunks
(`--tokens`, default 128: 16 MiB each), random values. Cold means posix_fadvise(DONTNEED) on each chunk
file before the pass (the machine's other page cache is left alone). `get_blocks_many` (8 threads) is
used where the store has it, else one `get_blocks` after another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from page_cache import drop_page_cache  # noqa: E402
from redis_server import start_redis  # noqa: E402

from redknot_rag.store import ChunkKVStore, KVFingerprint, StoreConfig, hash_token_ids  # noqa: E402


def read_all(store: ChunkKVStore, keys: list[str], workers: int) -> float:
    """Seconds to read every block of every chunk (host tier emptied first)."""
    store.evict()
    t = time.perf_counter()
    if hasattr(store, "get_blocks_many") and workers > 1:
        got = [b for _, b in store.get_blocks_many(keys, workers)]
    else:
        got = [store.get_blocks(k) for k in keys]
    s = time.perf_counter() - t
    assert all(b is not None for b in got)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    L, H, D = 32, 8, 128
    work = Path(tempfile.mkdtemp(prefix="rkv-read-"))
    proc, url = start_redis(work)
    try:
        fp = KVFingerprint("m", "t", hash_token_ids([1]), "bfloat16")
        cfg = StoreConfig(host_bytes=4 << 30)
        disk = ChunkKVStore(work / "disk", fp, config=cfg)
        redis = None
        if url is not None:
            from redknot_rag.store.redis_tier import RedisTier

            redis = ChunkKVStore(work / "r", fp, cold=RedisTier.from_url(url, fp, timeout_s=30.0), config=cfg)
        g = torch.Generator().manual_seed(0)
        keys = [f"c{i}" for i in range(args.chunks)]
        for key in keys:
            k, v = (torch.randn(L, H, args.tokens, D, generator=g).to(torch.bfloat16) for _ in range(2))
            disk.put(key, k, v, keep_in_memory=False)
            if redis is not None:
                redis.put(key, k, v, keep_in_memory=False)
        nbytes = 2 * L * H * args.tokens * D * 2 * args.chunks
        root = disk.tiers[0].ns  # type: ignore[attr-defined]
        row: dict = dict(chunks=args.chunks, chunk_bytes=nbytes // args.chunks, bytes=nbytes, workers=args.workers)
        for name, store, cold in (("disk_cold", disk, True), ("disk_warm", disk, False), ("redis", redis, False)):
            if store is None:
                continue
            secs = []
            for _ in range(args.reps):
                if cold:
                    drop_page_cache(root)
                secs.append(read_all(store, keys, args.workers))
            row[name] = dict(median_s=statistics.median(secs), GBps=nbytes / statistics.median(secs) / 1e9)
            print(args.label, name, row[name], flush=True)
        disk.close()
        if redis is not None:
            redis.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["machine"] = f"CPU: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (numbers are noisy)"
    data[args.label] = row
    out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
