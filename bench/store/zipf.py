"""A corpus far larger than the host and disk budgets, read by a Zipf-skewed query stream (CPU, small).

    PYTHONPATH=. python3 bench/store/zipf.py [--chunks 200] [--queries 300] [--top-k 6]

Chunk KV of the default model's shape (30 layers x 3 KV heads x 64, 256 tokens, bf16, local heads
kept as their 64-token tail window per the shipped profile), random values (bytes and speed do not
depend on them). Every chunk is in a local `redis-server` (write-through); host memory and disk hold
what their LRU budgets allow. Each query prefetches its top-k chunks layer by layer and waits for
every layer, as attention would: the load latency per query, the block hit rate per tier and the
largest bytes each tier held are recorded. Store-level only: no model forward, no TTFT.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from redknot_rag.heads import HeadProfile, shipped_profile_path
from redknot_rag.store import ChunkKVStore, HeadCompression, KVFingerprint, StoreConfig, StoreStats
from redknot_rag.store.redis_tier import RedisTier

sys.path.insert(0, str(Path(__file__).parent))
from redis_server import start_redis  # noqa: E402

OUT = Path(__file__).parent


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (r + 1) ** s for r in range(n)]


def query_stream(keys: list[str], num_queries: int, top_k: int, s: float, rng: random.Random) -> Iterator[list[str]]:
    """`num_queries` queries of `top_k` distinct chunks each, drawn with Zipf(s) popularity over a random
    ranking of `keys` (rank r has weight 1 / (r + 1)^s). The GPU tier bench (gpu_tiers.py) uses it too."""
    popularity = keys[:]
    rng.shuffle(popularity)  # rank r -> chunk
    weights = zipf_weights(len(keys), s)
    for _ in range(num_queries):
        picked: list[str] = []
        while len(picked) < top_k:
            c = rng.choices(popularity, weights)[0]
            if c not in picked:
                picked.append(c)
        yield picked


def tier_figure(stats: StoreStats, tier: str, figure: str) -> int:
    """One figure (`nbytes`, `block_hits`, ...) of one tier of a stats snapshot; 0 for a tier it lacks."""
    t = stats.tier(tier)
    return 0 if t is None else int(getattr(t, figure))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--host-bytes", type=int, default=64 << 20)
    ap.add_argument("--disk-bytes", type=int, default=256 << 20)
    args = ap.parse_args()

    profile = HeadProfile.load(shipped_profile_path("SmolLM2-135M-Instruct.Q4_1"))
    L, H, T, D = profile.num_layers, profile.num_kv_heads, 256, 64
    heads = HeadCompression.from_profile(profile)
    fp = KVFingerprint("bench-zipf", "t", "a", "float32")
    tmp = Path(tempfile.mkdtemp(prefix="rkv-zipf-"))
    proc, url = start_redis(tmp)
    if url is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    rng = random.Random(0)
    try:
        cfg = StoreConfig(
            dtype="bfloat16", heads=heads, host_bytes=args.host_bytes, disk_bytes=args.disk_bytes, redis_url=url
        )
        store = ChunkKVStore(tmp / "kv", fp, config=cfg)
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        keys = [f"chunk{i}" for i in range(args.chunks)]
        for key in keys:
            store.put(key, torch.randn(L, H, T, D, generator=g), torch.randn(L, H, T, D, generator=g))
        ingest_s = time.perf_counter() - t
        assert isinstance(store.tiers[1], RedisTier)
        corpus_bytes = store.tiers[1].stored_nbytes()
        stream = query_stream(keys, args.queries, args.top_k, args.zipf_s, rng)
        store.evict()
        before = store.stats()
        lat, first = [], []
        peak = {"host": 0, "disk": 0}
        for picked in stream:
            t = time.perf_counter()
            pf = store.prefetch(picked)
            for layer in range(L):
                got = pf.wait_layer(layer)
                assert all(v is not None for v in got.values())
                if layer == 0:
                    first.append((time.perf_counter() - t) * 1e3)
            lat.append((time.perf_counter() - t) * 1e3)
            st = store.stats()
            peak["host"] = max(peak["host"], tier_figure(st, "host", "nbytes"))
            peak["disk"] = max(peak["disk"], tier_figure(st, "disk", "nbytes"))
        after = store.stats()
        lookups = after.block_lookups - before.block_lookups
        hits = {
            t: (tier_figure(after, t, "block_hits") - tier_figure(before, t, "block_hits")) / lookups
            for t in ("host", "disk", "redis")
        }
        store.close()
        out = {
            "machine": f"CPU: shared 2-core box ({platform.machine()}), torch {torch.__version__}, local redis-server",
            "shape": {"layers": L, "kv_heads": H, "head_dim": D, "chunk_tokens": T, "dtype": "bfloat16"},
            "local_heads": heads.num_local,
            "window": heads.window,
            "chunks": args.chunks,
            "corpus_bytes_in_redis": corpus_bytes,
            "budgets": {"host": args.host_bytes, "disk": args.disk_bytes},
            "budget_share_of_corpus": {
                "host": args.host_bytes / corpus_bytes,
                "disk": args.disk_bytes / corpus_bytes,
            },
            "peak_bytes": peak,
            "within_budgets": peak["host"] <= args.host_bytes and peak["disk"] <= args.disk_bytes,
            "queries": args.queries,
            "top_k": args.top_k,
            "zipf_s": args.zipf_s,
            "block_hit_rate": hits,
            "block_misses": after.block_misses - before.block_misses,
            "promotions": after.promotions - before.promotions,
            "demotions": after.demotions - before.demotions,
            "load_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "mean": sum(lat) / len(lat)},
            "first_layer_ms": {"p50": pct(first, 0.5), "p99": pct(first, 0.99)},
            "ingest_s": ingest_s,
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    (OUT / "results_zipf_cpu.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
