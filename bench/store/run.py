"""Chunk KV store: bytes per stored token by setting vs dense model-dtype storage, int8 and int4 error
on real KV, and read throughput per tier (CPU, small).

    PYTHONPATH=. python3 bench/store/run.py [--chunks 8] [--chunk-tokens 256] [--redis-url URL]

KV comes from the default model (SmolLM2-135M: 30 layers x 3 KV heads x 64) prefilled behind the
RAG anchor over the sample corpus, as `redknot ingest` stores it. Head classes and the window are
the shipped head profile's. Bytes are what the store really writes: chunk files on disk (headers
and alignment included) and Redis values (crc + payload, keys and meta excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from redknot_rag.store import ChunkKVStore, HeadCompression, StoreConfig
from redknot_rag.store.codec import BlockMeta, Codec, HeadClass, decode_block, encode_block, quantize
from redknot_rag.store.disk import DiskTier
from redknot_rag.store.redis_tier import RedisTier

sys.path.insert(0, str(Path(__file__).parent))
from redis_server import start_redis  # noqa: E402

OUT = Path(__file__).parent


def real_chunks(num_chunks: int, chunk_tokens: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object, object]:
    """K, V `[L, H, T, D]` fp32 of `num_chunks` corpus chunks prefilled behind the RAG anchor."""
    from redknot_rag.chat import encode
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.heads import load_profile_for
    from redknot_rag.rag.chunk_prefill import ChunkPrefiller
    from redknot_rag.rag.layout import PromptLayout, make_fingerprint

    engine = Engine(EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.5))
    runner = engine.runner
    tok = engine.tokenizer
    layout = PromptLayout.for_tokenizer(tok)
    text = "\n\n".join(
        json.loads(line)["text"]
        for line in (Path(__file__).parents[2] / "redknot_rag/data/sample_corpus.jsonl").read_text().splitlines()
    )
    ids = encode(tok, text)
    chunks = [ids[i * chunk_tokens : (i + 1) * chunk_tokens] for i in range(num_chunks)]
    chunks = [c for c in chunks if len(c) == chunk_tokens]
    prefiller = ChunkPrefiller(runner, layout.anchor_ids)
    kvs = [tuple(t.cpu() for t in prefiller.prefill([c])[0]) for c in chunks]
    prefiller.close()
    fingerprint = make_fingerprint(layout, runner.weights_fingerprint, runner.dtype)
    return kvs, fingerprint, load_profile_for(runner.name, runner.weights_fingerprint)


def settings(profile) -> list[tuple[str, StoreConfig]]:
    heads = HeadCompression.from_profile(profile)
    out = []
    for dtype in ("float32", "bfloat16", "float16"):
        for codec in ("raw", "int8", "int4"):
            for name, hc in (("all tokens", None), ("local heads: tail window", heads)):
                out.append((f"{dtype} / {codec} / {name}", StoreConfig(dtype=dtype, cold_codec=codec, heads=hc)))
    return out


def int8_error(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative RMS error of the int8 codec (per-channel K, per-token V) on real KV, and vs bf16 rounding."""
    err = {"k": 0.0, "v": 0.0, "k_bf16": 0.0, "v_bf16": 0.0, "k_norm": 0.0, "v_norm": 0.0}
    for k, v in kvs:
        for name, x, dim in (("k", k, 2), ("v", v, 3)):  # [L, H, T, D]: K scales per channel, V per token
            flat = x.flatten(0, 1)  # [L·H, T, D]
            q_err = 0.0
            for blk in flat:
                q, s = quantize(blk, dim=dim - 2)
                deq = q.float() * (s.view(1, -1) if dim == 2 else s.view(-1, 1))
                q_err += float(((deq - blk) ** 2).sum())
            err[name] += q_err
            err[f"{name}_bf16"] += float(((x.bfloat16().float() - x) ** 2).sum())
            err[f"{name}_norm"] += float((x**2).sum())
    return {
        "k_rel_rms_int8": (err["k"] / err["k_norm"]) ** 0.5,
        "v_rel_rms_int8": (err["v"] / err["v_norm"]) ** 0.5,
        "k_rel_rms_bf16": (err["k_bf16"] / err["k_norm"]) ** 0.5,
        "v_rel_rms_bf16": (err["v_bf16"] / err["v_norm"]) ** 0.5,
    }


def int4_error(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative RMS error of the int4 codec (K per channel over 32-token groups, V per token over
    32-channel groups), decoded to f32, on real KV."""
    err = {"k": 0.0, "v": 0.0, "k_norm": 0.0, "v_norm": 0.0}
    for k, v in kvs:
        L, H, T, D = k.shape
        meta = BlockMeta(0, T, Codec.INT4, HeadClass.UNCLASSIFIED)
        for layer in range(L):
            for head in range(H):
                kb, vb = k[layer, head], v[layer, head]  # [T, D]
                kd, vd = decode_block(encode_block(kb, vb, Codec.INT4), meta, D, torch.float32)
                err["k"] += float(((kd - kb) ** 2).sum())
                err["v"] += float(((vd - vb) ** 2).sum())
        err["k_norm"] += float((k**2).sum())
        err["v_norm"] += float((v**2).sum())
    return {"k_rel_rms_int4": (err["k"] / err["k_norm"]) ** 0.5, "v_rel_rms_int4": (err["v"] / err["v_norm"]) ** 0.5}


def throughput(store: ChunkKVStore, keys: list[str], tier: str) -> dict[str, float]:
    """Read every block of every chunk from one tier (host / disk with warm page cache / redis)."""
    store.evict()
    if tier == "host":
        for key in keys:
            store.get_blocks(key)
    reps = 3
    nbytes = 0
    t = time.perf_counter()
    for _ in range(reps):
        if tier != "host":
            store.evict()
        for key in keys:
            blocks = store.get_blocks(key)
            assert blocks is not None
            nbytes += sum(b.nbytes for b in blocks.values())
    dt = time.perf_counter() - t
    return {"seconds": dt / reps, "decoded_GB_per_s": nbytes / dt / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    kvs, fingerprint, profile = real_chunks(args.chunks, args.chunk_tokens)
    L, H, T, D = kvs[0][0].shape
    tokens = sum(k.shape[2] for k, _ in kvs)
    dense = {"float32": 2 * L * H * D * 4, "bfloat16": 2 * L * H * D * 2}
    tmp = Path(tempfile.mkdtemp(prefix="rkv-bench-"))
    proc, url = start_redis(tmp)
    rows = []
    try:
        for name, cfg in settings(profile):
            root = tmp / name.replace(" ", "_").replace("/", "-").replace(":", "")
            redis_tier = RedisTier.from_url(url, fingerprint, prefix=f"b{len(rows)}") if url else None
            store = ChunkKVStore(root, fingerprint, 1 << 30, config=cfg, redis=redis_tier)
            keys = [f"c{i}" for i in range(len(kvs))]
            for key, (k, v) in zip(keys, kvs, strict=True):
                store.put(key, k, v, keep_in_memory=False)
            assert isinstance(store.cold, DiskTier)
            disk = store.cold.nbytes
            row = {
                "setting": name,
                "dtype": cfg.dtype,
                "cold_codec": cfg.cold_codec,
                "local_heads_window": cfg.heads is not None,
                "disk_bytes_per_token": disk / tokens,
                "vs_dense_fp32": disk / tokens / dense["float32"],
                "vs_dense_bf16": disk / tokens / dense["bfloat16"],
            }
            if redis_tier is not None:
                row["redis_bytes_per_token"] = redis_tier.stored_nbytes() / tokens
            host = store.get_blocks(keys[0])  # the host tier holds the storage dtype, decoded
            assert host is not None
            row["host_bytes_per_token"] = sum(b.nbytes for b in host.values()) / kvs[0][0].shape[2]
            if cfg.codec == Codec.RAW or cfg.dtype == "bfloat16":
                row["read"] = {t: throughput(store, keys, t) for t in ("host", "disk")}
                if redis_tier is not None:
                    for key in keys:  # empty disk, no promotion back: every read comes from Redis
                        store.cold.delete_chunk(key)
                    store.config = dataclasses.replace(cfg, promote_to_disk=False)
                    row["read"]["redis"] = throughput(store, keys, "redis")
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "read"}))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "machine": f"CPU: shared 2-core box ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (default), fp32 on CPU",
        "shape": {"layers": L, "kv_heads": H, "head_dim": D},
        "chunks": len(kvs),
        "chunk_tokens": T,
        "tokens": tokens,
        "head_profile": {
            "local_heads": sum(r.count(0) for r in profile.classes),
            "heads": L * H,
            "window": profile.window,
        },
        "dense_bytes_per_token": dense,
        "int8_error_real_kv": int8_error(kvs),
        "int4_error_real_kv": int4_error(kvs),
        "settings": rows,
        "wall_s": time.perf_counter() - t0,
    }
    (OUT / "results_cpu.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({**out["int8_error_real_kv"], **out["int4_error_real_kv"]}, indent=1))


if __name__ == "__main__":
    main()
