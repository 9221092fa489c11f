"""Bytes per sequence in the KV pool, compressed (pool windows, redknot_rag/window.py) vs dense, from the
real pool: a `KVPool` (on the meta device: the page arithmetic is real, no page memory is touched), its
`PageAllocator` and a `SeqKV` that appends a prompt in prefill chunks, slides after each chunk as the engine
does, then decodes. Bytes = page references the sequence holds x `pool.bytes_per_page`, per head class.

Shapes: SmolLM2-135M with its shipped head profile (sink 4, the profile's window), Gemma-3-270M with its
own sliding layers (exact), and the Llama-3-8B shape with a SYNTHETIC 25%-global profile (sink 64,
window 1024). Also: how many such sequences a fixed pool admits by the engine's reservation rule.

    python bench/pool/bytes.py --out bench/pool/bytes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SYNTH_SINK, SYNTH_WINDOW, machine, synthetic_local  # noqa: E402

from redknot_rag.config import ModelConfig  # noqa: E402
from redknot_rag.kvcache import KVPool, PageAllocator, SeqKV, pool_pages_for  # noqa: E402
from redknot_rag.window import PoolWindows  # noqa: E402

PAGE_SIZE = 16
CHUNK = 1024  # EngineConfig.max_prefill_tokens
DECODE = 32


def llama3_8b() -> ModelConfig:
    return ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_q_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position=131072,
    )  # fmt: skip


def shapes() -> list[tuple[str, ModelConfig, PoolWindows | None, torch.dtype]]:
    from redknot_rag.heads import load_profile_for
    from redknot_rag.loader import load_model

    out = []
    smol = load_model(None, dtype=torch.float32, device="cpu")
    prof = load_profile_for(smol.name, smol.weights_fingerprint)
    assert prof is not None, "the shipped SmolLM2 profile does not match these weights"
    out.append(("SmolLM2-135M (shipped profile)", smol.config, PoolWindows.from_profile(prof, sink=4), torch.bfloat16))
    del smol
    try:
        gemma = load_model("gemma3-270m", dtype=torch.float32, device="cpu")
        arch = PoolWindows.from_architecture(gemma.config)
        out.append(("Gemma-3-270M (sliding layers)", gemma.config, arch, torch.bfloat16))
    except Exception as e:  # the GGUF packages are optional
        print(f"Gemma-3 skipped: {e}", flush=True)
    cfg = llama3_8b()
    synth = PoolWindows(synthetic_local(cfg.num_layers, cfg.num_kv_heads), SYNTH_SINK, SYNTH_WINDOW, "synthetic", False)
    out.append(("Llama-3-8B shape (SYNTHETIC 25%-global profile)", cfg, synth, torch.bfloat16))
    return out


def run_sequence(cfg: ModelConfig, win: PoolWindows | None, tokens: int, dtype: torch.dtype) -> dict:
    """Prefill `tokens` in CHUNK steps + DECODE steps through a real pool; held bytes after, and the peak."""
    need = pool_pages_for(cfg, tokens + DECODE + CHUNK, PAGE_SIZE)
    pool = KVPool(need, PAGE_SIZE, cfg.head_dim, dtype, "meta")
    alloc = PageAllocator(pool.num_pages)
    kv = SeqKV(cfg.num_layers, cfg.num_kv_heads, PAGE_SIZE, windows=win)
    peak = 0
    steps = [(a, min(tokens, a + CHUNK)) for a in range(0, tokens, CHUNK)]
    steps += [(t, t + 1) for t in range(tokens, tokens + DECODE)]
    t0 = time.perf_counter()
    for a, b in steps:
        kv.append(torch.arange(a, b), alloc)
        peak = max(peak, alloc.num_used)
        kv.slide(alloc)
    host_s = time.perf_counter() - t0
    glob, loc = kv.held_pages()
    assert glob + loc == alloc.num_used  # the sequence's accounting is the allocator's
    row = dict(
        tokens=kv.num_tokens, pages_held=alloc.num_used, bytes_held=alloc.num_used * pool.bytes_per_page,
        bytes_global=glob * pool.bytes_per_page, bytes_local=loc * pool.bytes_per_page,
        peak_bytes=peak * pool.bytes_per_page, host_bookkeeping_s=round(host_s, 4),
    )  # fmt: skip
    kv.release(alloc)
    assert alloc.num_used == 0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "bytes_cpu.json"))
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--pool-gib", type=float, default=60.0, help="fixed pool for the admission count")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for name, cfg, win, dtype in shapes():
        for n in lengths:
            dense = run_sequence(cfg, None, n, dtype)
            comp = run_sequence(cfg, win, n, dtype)
            pool_pages = KVPool.pages_for_budget(int(args.pool_gib * (1 << 30)), PAGE_SIZE, cfg.head_dim, dtype)
            res_dense = pool_pages_for(cfg, n + DECODE + 1, PAGE_SIZE)
            g, lo = win.pages_for(n + DECODE + 1, PAGE_SIZE, CHUNK) if win else (res_dense, 0)
            row = dict(
                model=name, context_tokens=n, dtype=str(dtype).replace("torch.", ""),
                local_blocks=win.num_local if win else 0, blocks=cfg.num_kv_blocks,
                sink=win.sink if win else 0, window=win.window if win else 0, source=win.source if win else "",
                dense=dense, compressed=comp, ratio=round(comp["bytes_held"] / dense["bytes_held"], 4),
                peak_ratio=round(comp["peak_bytes"] / dense["peak_bytes"], 4),
                admitted_dense=pool_pages // res_dense, admitted_compressed=pool_pages // (g + lo),
                pool_gib=args.pool_gib,
            )  # fmt: skip
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "context_tokens", "ratio", "peak_ratio",
                                                  "admitted_dense", "admitted_compressed")}), flush=True)  # fmt: skip
    out = dict(
        machine=machine(), page_size=PAGE_SIZE, prefill_chunk=CHUNK, decode_steps=DECODE,
        method="real KVPool (meta device) + PageAllocator + SeqKV: chunked prefill, slide after each step, decode",
        rows=rows,
    )  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
