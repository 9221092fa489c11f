"""RAG time-to-first-token by reuse policy (GPU, speed only; random-weight Llama-3-8B shape, bf16).

A query is `[anchor][chunk_1]...[chunk_k][question]`: k x 512-token chunks (k = 8: 4K context;
k = 64: 32K) and a 64-token question. Chunk KV is prefilled behind the anchor first (ingestion,
untimed) and stays resident in the GPU pool (the hot tier). Then, per policy, one run each:

  load       relocate: attach the anchor and chunk segments at their assembled positions (host-side
             slot tables; no KV copy)
  select     what to recompute (redknot: a probe pass of the question over the relocated context)
  recompute  the selected context tokens' KV, in the assembled context (copy-on-write pages)
  question   question prefill over the repaired context until the first sampled token (engine.step)

`full` prefills the whole prompt (one engine step; all of it is "question" here). Every boundary
is timed with torch.cuda.synchronize. `plan_s` is the host planning inside those phases (attention
backend `plan()`: slot tables → per-layer key lists / page tables, and their upload).

redknot has no shipped profile for a random model: it runs twice, with `profile=None` (every head
global: recompute only) and with a synthetic profile of 25% global heads ((layer + head) % 4 == 0;
the rest local: anchor sink + last `window` tokens), ratio 0.1 in both.

`--tiny` runs the same code on the CPU with a 2-layer model and short chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from common import LLAMA3_8B, Timer, available_backends, card, engine_from_weights, free_memory, shape, sync  # noqa: E402

HERE = Path(__file__).resolve().parent


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def synthetic_profile(num_layers: int, num_kv_heads: int, window: int) -> Any:
    """25% global heads ((layer + head) % 4 == 0), the rest local. Speed only: not calibrated."""
    from redknot_rag.heads import HeadProfile

    classes = [[int((li + h) % 4 == 0) for h in range(num_kv_heads)] for li in range(num_layers)]
    zeros = [[0.0] * num_kv_heads for _ in range(num_layers)]
    return HeadProfile(
        model="synthetic-25pct-global", weights_fingerprint="none", num_layers=num_layers,
        num_kv_heads=num_kv_heads, window=window, locality_threshold=0.0, classes=classes,
        locality=zeros, reuse_deviation=zeros, retrieval=zeros, calibration={"synthetic": True},
    )  # fmt: skip


class PlanTimer:
    """Wraps `backend.plan` to add up its host time (device synchronized around it)."""

    def __init__(self, backend: Any, dev: torch.device) -> None:
        self.inner, self.dev, self.s, self.calls = backend.plan, dev, 0.0, 0
        backend.plan = self

    def __call__(self, batch: Any) -> None:
        sync(self.dev)
        t = time.perf_counter()
        self.inner(batch)
        sync(self.dev)
        self.s += time.perf_counter() - t
        self.calls += 1

    def take(self) -> float:
        s, self.s = self.s, 0.0
        return s


def build_engine(tiny: bool, backend: str) -> Any:
    from transformers import LlamaConfig

    from redknot_rag.config import ModelConfig
    from redknot_rag.kernels.testing import random_weights

    dev = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    mc = ModelConfig.from_hf(LlamaConfig(**shape(LLAMA3_8B, tiny), eos_token_id=None, bos_token_id=None))
    torch.manual_seed(0)
    weights = random_weights(mc, dtype, dev)
    engine = engine_from_weights(
        mc, weights, "random-llama3-8b", device=dev, dtype=str(dtype).replace("torch.", ""),
        attention_backend=backend, max_prefill_tokens=8192 if not tiny else 512, cpu_kv_gib=0.5,
    )  # fmt: skip
    del weights
    free_memory()
    return engine


def ingest(engine: Any, anchor: list[int], chunks: list[list[int]], group: int) -> tuple[Any, list[Any]]:
    from redknot_rag.rag.prefill import ChunkPrefiller

    pf = ChunkPrefiller(engine.runner, anchor)
    segs = []
    for i in range(0, len(chunks), group):
        for k, v in pf.prefill(chunks[i : i + group]):
            segs.append(engine.runner.write_segment(k, v))
        del k, v
    free_memory()
    return pf.anchor, segs


def query(engine: Any, policy: Any, inp: Any, plans: PlanTimer) -> dict:
    """One RAG query under `policy` (mirrors `_SelectivePolicy.assemble` with timers); returns seconds per phase."""
    from redknot_rag.request import ReusedContext
    from redknot_rag.reuse import FullPolicy, NaivePolicy, recompute, relocate
    from redknot_rag.sampling import SamplingParams

    dev = engine.runner.device
    ctx = inp.context_ids
    prompt = ctx + inp.question_ids
    out: dict[str, Any] = dict(load_s=0.0, select_s=0.0, recompute_s=0.0, recomputed_tokens=0)
    plans.take()
    kv = None
    sync(dev)
    t0 = time.perf_counter()
    if not isinstance(policy, FullPolicy):
        vis = None if isinstance(policy, NaivePolicy) else policy.visibility(engine.runner, inp)
        with Timer(dev) as t:
            kv = relocate(engine.runner, inp, vis)
        out["load_s"] = t.s
        out["load_plan_s"] = plans.take()
        if not isinstance(policy, NaivePolicy):
            with Timer(dev) as t:
                idx = torch.unique(policy.select(engine.runner, inp, kv).to(torch.int64))
            out["select_s"] = t.s
            with Timer(dev) as t:
                recompute(engine.runner, kv, ctx, idx)
            out["recompute_s"] = t.s
            out["recompute_plan_s"] = plans.take()
            out["recompute_path"] = _path(engine)
            out["recomputed_tokens"] = int(idx.numel())
    req = engine.make_request(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
    if kv is not None:
        n_ctx = kv.num_tokens
        reused = n_ctx - len(inp.anchor_ids) - out["recomputed_tokens"]
        req.reuse = ReusedContext(kv, n_ctx, reused, out["recomputed_tokens"], type(policy).__name__)
    with Timer(dev) as t:
        engine.submit(req)
        while not req.output_ids:
            engine.step()
    out["question_s"] = t.s
    out["question_plan_s"] = plans.take()
    out["question_path"] = _path(engine)
    out["ttft_s"] = time.perf_counter() - t0
    while not req.is_finished:
        engine.step()
    out["plan_s"] = out.get("load_plan_s", 0.0) + out.get("recompute_plan_s", 0.0) + out["question_plan_s"]
    return out


def plan_microbench(engine: Any, inp: Any) -> dict:
    """Host work of one question prefill over the largest context: relocation (slot tables), and the
    Triton plan built on the device (as shipped) vs on the host (the same ops on CPU tensors, i.e.
    the pre-fix code path without its upload)."""
    from redknot_rag.batch import ForwardBatch, SeqSlice
    from redknot_rag.kernels.flashinfer_backend import build_page_tables, is_contiguous_layout
    from redknot_rag.kernels.seg_meta import build_plan
    from redknot_rag.reuse import relocate

    mc, dev = engine.model_config, engine.runner.device
    out: dict[str, Any] = dict(context_tokens=len(inp.context_ids))
    with Timer(dev) as t:
        kv = relocate(engine.runner, inp)
    out["relocate_s"] = t.s
    try:
        n = kv.num_tokens
        pos = torch.arange(n, n + len(inp.question_ids))
        slots = engine.runner.append(kv, pos)
        batch = ForwardBatch(torch.tensor(inp.question_ids), pos, [SeqSlice(kv, 0, len(pos), slots)], torch.tensor([0]))
        for where in (dev, torch.device("cpu")):
            times = []
            for _ in range(3):
                with Timer(dev) as t:
                    build_plan(batch, mc.num_layers, mc.num_kv_heads, where)
                times.append(t.s)
            out[f"build_plan_{where.type}_s"] = min(times)
        with Timer(dev) as t:
            ok = is_contiguous_layout(batch, engine.config.page_size)
            build_page_tables(batch, engine.config.page_size)
        out["flashinfer_page_tables_s"], out["flashinfer_layout_ok"] = t.s, ok
    finally:
        engine.runner.release(kv)
    return out


def _path(engine: Any) -> str:
    be = engine.runner.backend
    if be.name == "flashinfer":
        return "triton" if be.use_triton else "flashinfer"
    return be.name


def policies(engine: Any, window: int) -> list[tuple[str, Any]]:
    from redknot_rag.reuse import EpicPolicy, FullPolicy, NaivePolicy, RedKnotPolicy

    mc = engine.model_config
    return [
        ("full", FullPolicy()),
        ("naive", NaivePolicy()),
        ("epic:16", EpicPolicy(16)),
        ("redknot (no profile, all global)", RedKnotPolicy(profile=None, ratio=0.1)),
        ("redknot r=0.02 (no profile)", RedKnotPolicy(profile=None, ratio=0.02, head_tokens=2)),
        ("redknot (synthetic 25% global)",
         RedKnotPolicy(synthetic_profile(mc.num_layers, mc.num_kv_heads, window), ratio=0.1)),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.plot:
        plot(Path(args.plot))
        return
    start = time.time()
    tiny = args.tiny
    dev = torch.device("cpu" if tiny else "cuda")
    backends = available_backends(dev)
    backend = args.backend or backends[0]
    chunk_len, q_len, anchor_len, window = (32, 8, 32, 16) if tiny else (512, 64, 32, 256)
    scenarios = [4, 16] if tiny else [8, 64]
    engine = build_engine(tiny, backend)
    mc = engine.model_config
    plans = PlanTimer(engine.runner.backend, dev)
    data: dict[str, Any] = dict(
        card=card(), device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (tiny)",
        torch=torch.__version__, backend=backend, tiny=tiny, chunk_tokens=chunk_len, question_tokens=q_len,
        anchor_tokens=anchor_len, local_window=window, redknot_ratio=0.1, page_size=engine.config.page_size,
        pool_gib=engine.runner.pool.num_bytes / 2**30, scenarios=[], notes=[],
    )  # fmt: skip
    out_dir = Path(args.out or os.environ.get("OUT") or HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results_rag_{card()}{'_tiny' if tiny else ''}.json"

    def save() -> None:
        path.write_text(json.dumps(data, indent=1))

    g = torch.Generator().manual_seed(0)
    vocab = mc.vocab_size

    def rand(n: int) -> list[int]:
        return torch.randint(100, vocab - 1, (n,), generator=g).tolist()

    anchor = rand(anchor_len)
    chunks = [rand(chunk_len) for _ in range(max(scenarios))]
    question = rand(q_len)
    with Timer(dev) as t:
        anchor_seg, segs = ingest(engine, anchor, chunks, group=8)
    data["ingest_s"] = t.s
    data["ingest_plan_s"] = plans.take()
    log(f"ingested {len(chunks)} chunks in {t.s:.2f} s")
    # whole-prompt prefill in one step, as transformers and the engine bench do (scheduling only)
    engine.config = replace(engine.config, max_prefill_tokens=anchor_len + max(scenarios) * chunk_len + q_len + 64)

    from redknot_rag.reuse import ReuseInput

    pols = policies(engine, window)
    warm = ReuseInput(anchor, anchor_seg, chunks[: scenarios[0]], segs[: scenarios[0]], question)
    with Timer(dev) as t:
        for _, p in pols:  # warm up every path (kernel JIT) at the small size
            query(engine, p, warm, plans)
    data["warmup_s"] = t.s
    free_pages = engine.runner.allocator.num_free
    for k in scenarios:
        inp = ReuseInput(anchor, anchor_seg, chunks[:k], segs[:k], question)
        sc: dict[str, Any] = dict(chunks=k, context_tokens=len(inp.context_ids), policies={})
        data["scenarios"].append(sc)
        for name, p in pols:
            if time.time() - start > args.budget_s:
                data["notes"].append(f"{k} chunks, {name}: skipped (time budget)")
                continue
            runs = [query(engine, p, inp, plans) for _ in range(args.reps)]
            best = min(runs, key=lambda r: r["ttft_s"])
            best["ttft_all_s"] = [r["ttft_s"] for r in runs]
            best["ttft_median_s"] = statistics.median(best["ttft_all_s"])
            sc["policies"][name] = best
            shown = {a: (round(b, 4) if isinstance(b, float) else b) for a, b in best.items() if a != "ttft_all_s"}
            log(k, name, shown)
            assert engine.runner.allocator.num_free == free_pages, "pages leaked"
        full = sc["policies"].get("full")
        for r in sc["policies"].values():
            if full:
                r["speedup_vs_full"] = full["ttft_s"] / r["ttft_s"]
        save()
    try:
        data["host_planning"] = plan_microbench(engine, ReuseInput(anchor, anchor_seg, chunks, segs, question))
        log("host planning", data["host_planning"])
    except Exception as e:
        data["notes"].append(f"host planning microbench failed: {type(e).__name__}: {e}")
    data["total_s"] = time.time() - start
    save()
    log("wrote", path)
    try:
        plot(path)
    except Exception as e:
        log("plot failed:", e)


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(path).read_text())
    fig, axes = plt.subplots(1, len(d["scenarios"]), figsize=(6 * len(d["scenarios"]), 4.8))
    axes = axes if hasattr(axes, "__len__") else [axes]
    parts = [
        ("load_s", "load"), ("select_s", "select (probe)"), ("recompute_s", "recompute"),
        ("question_s", "question prefill"),
    ]  # fmt: skip
    for ax, sc in zip(axes, d["scenarios"]):
        names = list(sc["policies"])
        bottom = [0.0] * len(names)
        for key, label in parts:
            vals = [sc["policies"][n].get(key, 0.0) * 1e3 for n in names]
            ax.bar(range(len(names)), vals, bottom=bottom, label=label)
            bottom = [a + b for a, b in zip(bottom, vals)]
        for i, n in enumerate(names):
            sp = sc["policies"][n].get("speedup_vs_full")
            label = f"{bottom[i]:.0f} ms" + (f"\n{sp:.1f}x" if sp else "")
            ax.text(i, bottom[i], label, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(
            f"{sc['chunks']} x {d['chunk_tokens']} chunks + {d['question_tokens']}-token question ({d['card']})"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path).replace(".json", ".png"), dpi=110)


if __name__ == "__main__":
    main()
