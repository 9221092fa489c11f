"""Pool windows on one GPU: admission, decode tokens/s and prefill time at long context, compressed vs dense.

Random-weight Llama-3-8B shape (bf16), as bench/rag_gpu/run.py builds it, with a SYNTHETIC head profile
(per layer 25% of the kv heads global, the rest local: sink 64 + the last 1024 tokens; `common.py`). Random
weights have no measured profile: this measures the memory and speed mechanics, not fidelity.

1. Admission: sequences of `--context` tokens are allocated in one fixed pool (the runner's, made once)
   in `--prefill-chunk` steps with a window slide after each, as the engine's chunked prefill does, until
   the pool is full: how many the pool HOLDS at once, compressed vs dense. Also how many the
   scheduler's reservation rule ADMITS (`free pages // runner.reservation_pages(context)`). The KV values
   are the pool's zeros (decode cost does not depend on them).
2. Decode: batches of 1, 8 and 32 of those sequences, one token each per step through `runner.forward`
   (the backend's own path; eager unless `--graphs`), append + forward + slide timed together; tokens/s
   = batch / median step. A dense batch that the pool cannot hold is reported as not fitting.
3. Prefill: one real `--context`-token prefill (chunked, slides between chunks), dense vs compressed.

    python bench/pool/gpu.py --out bench/pool/gpu_H100.json        # < 5 min on one H100/H200
    python bench/pool/gpu.py --tiny --out /tmp/pool_tiny.json      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SYNTH_SINK, SYNTH_WINDOW, engine_common, machine, synthetic_local  # noqa: E402

from redknot_rag.batch import ForwardBatch  # noqa: E402
from redknot_rag.window import PoolWindows  # noqa: E402


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build(args: argparse.Namespace) -> Any:
    ec = engine_common  # bench/engine/common.py: the random-weight model and engine builders

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    hf = ec.hf_random_model("llama", ec.shape(ec.LLAMA3_8B, args.tiny), dtype, dev)
    weights = dict(hf.state_dict().items())
    engine = ec.engine_from_weights(
        hf.config, weights, "random-llama3-8b", device=dev, dtype=str(dtype).replace("torch.", ""),
        attention_backend=args.backend, max_prefill_tokens=args.prefill_chunk, cpu_kv_gib=args.cpu_kv_gib,
        mem_fraction=args.mem_fraction, max_running_requests=max(args.batches), cuda_graphs=args.graphs,
        cuda_graph_context=args.context + 64, pool_local_heads="off",
    )  # fmt: skip
    del weights, hf
    ec.free_memory()
    return engine


def fill(runner: Any, windows: PoolWindows | None, ctx: int, chunk: int, limit: int, room: int) -> list[Any]:
    """Sequences of `ctx` tokens allocated (chunked, sliding) until the pool cannot take another whole one
    (each keeps `room` pages spare for decode), at most `limit`."""
    from redknot_rag.kvcache import OutOfPagesError

    saved = runner.pool_windows
    runner.pool_windows = windows
    kvs: list[Any] = []
    try:
        while len(kvs) < limit:
            kv = runner.new_seq_kv()
            kv._reserve(ctx + 64)  # one slot table of the final size (no doubling copies)
            try:
                for a in range(0, ctx, chunk):
                    runner.append(kv, torch.arange(a, min(ctx, a + chunk)))
                    runner.slide(kv)
                if not runner.can_allocate(room):
                    raise OutOfPagesError("no room left to decode")
            except OutOfPagesError:
                runner.release(kv)
                break
            kvs.append(kv)
    finally:
        runner.pool_windows = saved
    return kvs


def decode_rate(runner: Any, kvs: list[Any], steps: int, warmup: int) -> dict:
    dev, vocab = runner.device, runner.model_config.vocab_size
    times = []
    for i in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        pos = [kv.num_tokens for kv in kvs]
        slices = []
        for j, kv in enumerate(kvs):
            slots = runner.append(kv, torch.tensor([pos[j]]))
            slices.append(kv.slice(j, 1, slots))
        ids = torch.randint(0, vocab, (len(kvs),))
        batch = ForwardBatch(ids, torch.tensor(pos), slices, torch.arange(len(kvs)))
        runner.forward(batch)
        for kv in kvs:
            runner.slide(kv)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return dict(step_s=step, tokens_per_s=len(kvs) / step, backend_path=getattr(runner.backend, "path", ""))


def prefill_time(runner: Any, windows: PoolWindows | None, ctx: int, chunk: int) -> dict:
    saved = runner.pool_windows
    runner.pool_windows = windows
    kv = runner.new_seq_kv()
    runner.pool_windows = saved
    vocab = runner.model_config.vocab_size
    ids = torch.randint(0, vocab, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        sync(runner.device)
        t0 = time.perf_counter()
        for a in range(0, ctx, chunk):
            b = min(ctx, a + chunk)
            runner.append_forward(kv, ids[a:b], torch.arange(a, b), logits=b == ctx)
            runner.slide(kv)
        sync(runner.device)
        return dict(prefill_s=time.perf_counter() - t0, pages_held=sum(kv.held_pages()))
    finally:
        runner.release(kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: 2-layer model, 512-token context")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (default 32768; tiny 512)")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32; tiny 1,2,4)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="default 8192; tiny 128")
    ap.add_argument("--mem-fraction", type=float, default=0.6, help="the fixed pool: this share of free memory")
    ap.add_argument("--cpu-kv-gib", type=float, default=0.004, help="the fixed pool on CPU (--tiny)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--graphs", action="store_true", help="decode CUDA graphs (off: eager, both arms)")
    ap.add_argument("--no-prefill", action="store_true")
    args = ap.parse_args()
    args.context = args.context or (512 if args.tiny else 32768)
    args.prefill_chunk = args.prefill_chunk or (128 if args.tiny else 8192)
    args.batches = [int(b) for b in (args.batches or ("1,2,4" if args.tiny else "1,8,32")).split(",")]
    sink, window = (4, 64) if args.tiny else (SYNTH_SINK, SYNTH_WINDOW)
    t_start = time.perf_counter()

    engine = build(args)
    runner = engine.runner
    mc = runner.model_config
    page_bytes = runner.pool_bytes // runner.num_pages
    win = PoolWindows(synthetic_local(mc.num_layers, mc.num_kv_heads), sink, window, "synthetic", False)
    res: dict = dict(
        machine=machine(), model="random Llama-3-8B shape" + (" (tiny)" if args.tiny else ""),
        profile=dict(kind="SYNTHETIC 25%-global", sink=sink, window=window, local_blocks=win.num_local,
                     blocks=win.num_blocks),
        context_tokens=args.context, prefill_chunk=args.prefill_chunk, backend=runner.backend.name,
        cuda_graphs=args.graphs, pool_pages=runner.num_pages, pool_bytes=runner.num_pages * page_bytes,
        page_size=runner.page_size, arms={},
    )  # fmt: skip
    log("pool", res["pool_pages"], "pages", round(res["pool_bytes"] / 2**30, 2), "GiB; backend", runner.backend.name)
    room = mc.num_kv_blocks * (args.steps + 8)  # decode pages per sequence
    for arm, w in (("dense", None), ("compressed", win)):
        saved = runner.pool_windows
        runner.pool_windows = w
        reserve = runner.reservation_pages(args.context + args.steps + 8)
        runner.pool_windows = saved
        admits = runner.free_pages // reserve
        kvs = fill(runner, w, args.context, args.prefill_chunk, max(max(args.batches), admits) + 64, room)
        held = sum(sum(kv.held_pages()) for kv in kvs) / max(1, len(kvs))
        row: dict = dict(admitted_by_reservation=admits, held_at_once=len(kvs), pages_per_sequence=held,
                         bytes_per_sequence=held * page_bytes, decode={})  # fmt: skip
        log(
            arm,
            "admits",
            admits,
            "holds",
            len(kvs),
            "sequences;",
            round(row["bytes_per_sequence"] / 2**30, 3),
            "GiB each",
        )
        for b in args.batches:
            if b > len(kvs):
                row["decode"][str(b)] = dict(fits=False)
                log(arm, "batch", b, "does not fit")
                continue
            # the other sequences give back their pages first: decode appends need room
            r = decode_rate(runner, kvs[:b], args.steps, warmup=3)
            row["decode"][str(b)] = dict(fits=True, **r)
            log(arm, "batch", b, r)
        for kv in kvs:
            runner.release(kv)
        if not args.no_prefill:
            row["prefill"] = prefill_time(runner, w, args.context, args.prefill_chunk)
            log(arm, "prefill", row["prefill"])
        res["arms"][arm] = row
    d, c = res["arms"]["dense"], res["arms"]["compressed"]
    res["summary"] = dict(
        held_ratio=c["held_at_once"] / max(1, d["held_at_once"]),
        admitted_ratio=c["admitted_by_reservation"] / max(1, d["admitted_by_reservation"]),
        bytes_ratio=c["bytes_per_sequence"] / max(1, d["bytes_per_sequence"]),
        decode_speedup={b: c["decode"][b]["tokens_per_s"] / d["decode"][b]["tokens_per_s"]
                        for b in c["decode"] if c["decode"][b].get("fits") and d["decode"][b].get("fits")},
        prefill_ratio=(c["prefill"]["prefill_s"] / d["prefill"]["prefill_s"]) if "prefill" in c else None,
    )  # fmt: skip
    res["seconds"] = time.perf_counter() - t_start
    log("summary", res["summary"])
    Path(args.out).write_text(json.dumps(res, indent=1))
    log("wrote", args.out)


if __name__ == "__main__":
    main()
