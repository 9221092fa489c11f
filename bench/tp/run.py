"""Tensor parallel over KV heads: TP=1 vs TP=N on one host (random-weight Llama-3-8B shape, bf16).

    python bench/tp/run.py --tp 2              # 2 GPUs (the issue asks for nvidia-h200-x2); NCCL
    python bench/tp/run.py --tp 2 --tiny       # the same code on a CPU over gloo (tiny shape, smoke run)

Phase 1 runs TP=1 in this process (GPU 0) and saves its logits; phase 2 spawns N ranks (one per GPU,
`torch.multiprocessing`), rank 0 drives the engine, the others follow (`redknot_rag.tp`). Each phase
measures, on the same prompts (random ids, seed 0):

- `logits`: last-position logits of a 512-token prompt; TP=N against TP=1 (max |diff|, relative to
  max |logit|, cosine, argmax agreement; `within_bf16` = rel. max diff <= `--tol`, default 2e-2);
- `prefill`: TTFT (submit → first token, `max_prefill_tokens` chunks) at 4K and 32K prompt tokens;
- `decode`: tokens/s of the engine's decode steps at batch 1 and 64 (512-token prompts);
- `reuse`: TTFT of each reuse policy over 64 x 512-token chunks (+ anchor, + 32-token question):
  chunk KV prefilled and written as segments first, then `runner.on_all_ranks(policy.assemble)` +
  the engine's question prefill to the first token. `redknot` runs without a head profile (random
  weights: every head global).

Decode CUDA graphs are off in both phases (TP has none yet), so TP=1 vs TP=N compares like with
like; the TP=1 engine bench (bench/engine) has the graph numbers. Results: `results_tp_<card>.json`.
Status: written and smoke-run on CPU (`--tiny`) only; the H200 numbers were NOT measured yet.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "engine"))
from common import LLAMA3_8B, StubTokenizer, card, free_memory, hf_random_model, shape, sync  # noqa: E402

POLICIES = ["full", "naive", "epic:16", "cacheblend:0.15", "redknot:0.15"]


def engine_config(args: argparse.Namespace, device: str) -> Any:
    from redknot_rag.config import EngineConfig

    return EngineConfig(
        device=device,
        dtype="float32" if args.tiny else "bfloat16",
        attention_backend="torch" if args.tiny else "auto",
        max_prefill_tokens=512 if args.tiny else 8192,
        max_running_requests=max(args.decode_batches),
        cpu_kv_gib=0.25,
        mem_fraction=0.7,
        cuda_graphs=False,
    )


def full_model(args: argparse.Namespace, device: str) -> Any:
    """HF-named random weights (seed 0, the same on every rank) as a `LoadedModel`."""
    from redknot_rag.config import ModelConfig
    from redknot_rag.loader import LoadedModel

    dtype = torch.float32 if args.tiny else torch.bfloat16
    hf = hf_random_model("llama", shape(LLAMA3_8B, args.tiny), dtype, device)
    mc = ModelConfig.from_hf(hf.config)
    weights = dict(hf.state_dict().items())
    del hf
    return LoadedModel(mc, weights, StubTokenizer(), "random-llama3-8b", "random:llama3-8b")


def rand_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def ttft(engine: Any, prompt: list[int], reps: int) -> float:
    from redknot_rag.sampling import SamplingParams

    times = []
    for rep in range(reps + 1):  # rep 0 warms up (kernel JIT, allocator), untimed
        req = engine.make_request(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        sync(engine.runner.device)
        t0 = time.perf_counter()
        engine.submit(req)
        while not req.output_ids:
            engine.step()
        sync(engine.runner.device)
        if rep:
            times.append(time.perf_counter() - t0)
        while not req.is_finished:
            engine.step()
    return statistics.median(times)


def decode_rate(engine: Any, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    from redknot_rag.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 3, ignore_eos=True)
    reqs = [engine.submit(engine.make_request(rand_ids(prompt_len, vocab, 100 + i), params)) for i in range(batch)]
    while not all(r.output_ids for r in reqs):  # prefill everything first
        engine.step()
    engine.step()  # one untimed decode step at this batch size (warm-up)
    sync(engine.runner.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.runner.device)
    dt = time.perf_counter() - t0
    while not all(r.is_finished for r in reqs):
        engine.step()
    return batch * steps / dt


def last_logits(engine: Any, prompt: list[int]) -> torch.Tensor:
    """Our forward over a fresh sequence → logits of the last position `[vocab]` float32 (host)."""
    from redknot_rag.batch import ForwardBatch

    r = engine.runner
    kv = r.new_seq_kv()
    try:
        pos = torch.arange(len(prompt))
        slots = r.append(kv, pos)
        batch = ForwardBatch(
            torch.tensor(prompt), pos, [kv.slice(0, len(prompt), slots)], torch.tensor([len(prompt) - 1])
        )
        return r.forward(batch)[0].float().cpu()
    finally:
        r.release(kv)


def reuse_ttft(engine: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """TTFT per policy over `--chunks` x `--chunk-tokens` stored chunks."""
    from redknot_rag.rag.chunk_prefill import ChunkPrefiller
    from redknot_rag.request import ReusedContext
    from redknot_rag.reuse import ReuseInput, make_policy
    from redknot_rag.sampling import SamplingParams

    r = engine.runner
    anchor = rand_ids(16, vocab, 7)
    chunks = [rand_ids(args.chunk_tokens, vocab, 1000 + i) for i in range(args.chunks)]
    question = rand_ids(32, vocab, 9)
    pf = engine.run_store_work(lambda: ChunkPrefiller(r, anchor))
    segs = []
    for i in range(0, len(chunks), 8):
        for k, v in pf.prefill(chunks[i : i + 8]):
            segs.append(r.write_segment(k, v))
    inp = ReuseInput(anchor, pf.anchor, chunks, segs, question)
    out: dict[str, Any] = {}
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for name in POLICIES:
        policy = make_policy(name)
        times, recomputed = [], 0
        for rep in range(args.reps + 1):  # rep 0 warms up, untimed
            sync(r.device)
            t0 = time.perf_counter()
            req = engine.make_request(inp.context_ids + question, params)
            asm = r.on_all_ranks(policy.assemble, inp)
            if asm.kv is not None:
                req.reuse = ReusedContext(asm.kv, asm.context_len, asm.reused_tokens, asm.recomputed_tokens, name)
            engine.submit(req)
            while not req.output_ids:
                engine.step()
            sync(r.device)
            if rep:
                times.append(time.perf_counter() - t0)
            recomputed = asm.recomputed_tokens
            while not req.is_finished:
                engine.step()
        out[name] = {"ttft_s": statistics.median(times), "recomputed_tokens": recomputed}
    for s in segs:
        r.drop_segment(s)
    pf.close()
    return out


def measure(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    vocab = engine.model_config.vocab_size
    res: dict[str, Any] = {"info": engine.info()}
    res["logits"] = last_logits(engine, rand_ids(512, vocab, 1))
    res["prefill_ttft_s"] = {str(n): ttft(engine, rand_ids(n, vocab, n), args.reps) for n in args.prefill}
    res["decode_tok_s"] = {str(b): decode_rate(engine, b, 512, args.decode_steps, vocab) for b in args.decode_batches}
    res["reuse"] = reuse_ttft(engine, args, vocab)
    return res


def _rank(rank: int, args: argparse.Namespace, port: int, tp1_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.tp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    from redknot_rag.engine import Engine
    from redknot_rag.tp import TPRunner, init_from_env

    device = "cpu" if args.tiny else "cuda"
    init_from_env(device)
    dev = "cpu" if args.tiny else f"cuda:{rank}"
    loaded = full_model(args, dev)
    runner = TPRunner(engine_config(args, dev), loaded)
    del loaded
    free_memory()
    if rank != 0:
        runner.follow()
        return
    try:
        res = measure(Engine(runner=runner), args)
    finally:
        runner.close()
    tp1 = torch.load(tp1_path)
    a, b = tp1["logits"], res.pop("logits")
    rel = float((a - b).abs().max() / a.abs().max())
    res["logits_vs_tp1"] = {
        "max_abs_diff": float((a - b).abs().max()),
        "rel_max_diff": rel,
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "argmax_equal": bool(a.argmax() == b.argmax()),
        "within_bf16": rel <= args.tol,
        "tol": args.tol,
    }
    torch.save(res, tp1_path + f".tp{args.tp}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU over gloo (a smoke run)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--tol", type=float, default=2e-2, help="bf16 tolerance on max |diff| / max |logit|")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prefill is None:
        args.prefill = [256, 1024] if args.tiny else [4096, 32768]
    import torch.multiprocessing as mp

    device = "cpu" if args.tiny else "cuda:0"
    loaded = full_model(args, device)
    from redknot_rag.engine import Engine

    tp1 = measure(Engine(engine_config(args, device), loaded=loaded), args)
    del loaded
    free_memory()
    tp1_path = str(HERE / f".tp1_{os.getpid()}.pt")
    torch.save(tp1, tp1_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(args, port, tp1_path), nprocs=args.tp, join=True)
    tpn = torch.load(tp1_path + f".tp{args.tp}")
    os.unlink(tp1_path)
    os.unlink(tp1_path + f".tp{args.tp}")
    tp1.pop("logits")
    name = "cpu-tiny" if args.tiny else card()
    result = {
        "card": name if args.tiny else f"{args.tp}x {torch.cuda.get_device_name()}",
        "model": "random-weight Llama-3-8B shape" + (" (tiny)" if args.tiny else ", bf16"),
        "args": {k: v for k, v in vars(args).items()},
        "tp1": tp1,
        f"tp{args.tp}": tpn,
    }
    out = Path(args.out) if args.out else HERE / f"results_tp_{name}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("card", "model")} | {"logits": tpn["logits_vs_tp1"]}, indent=1))
    for tag in ("tp1", f"tp{args.tp}"):
        r = result[tag]
        print(tag, "prefill TTFT s", r["prefill_ttft_s"], "decode tok/s", r["decode_tok_s"])
        print(tag, "reuse TTFT s", {k: round(v["ttft_s"], 4) for k, v in r["reuse"].items()})
    print("wrote", out)


if __name__ == "__main__":
    main()
