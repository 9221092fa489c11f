"""Engine benchmarks: our engine against transformers, same weights, same process.

CPU (default): the embedded default model (SmolLM2-135M, fp32): prefill tokens/s and decode
tokens/s at batch 1 and 16 → results_cpu.json.

GPU (`--gpu`): random-weight Llama-3-8B shape (bf16): full-prefill time-to-first-token at
4K/8K/16K/32K against transformers SDPA, decode tokens/s at batch 1/16/64 against transformers
`generate` (ours eager and with CUDA graphs), and logits parity against transformers on a
512-token prompt for Llama-3-8B and Qwen3-8B shapes → results_engine_<card>.json + PNG.
`--tiny` runs the GPU code path on the CPU with 2-layer shapes (a smoke test).

Decode rate: tokens produced by steps in which every sequence decodes, over those steps' time
(our engine: `engine.step()`, which ends with logits on the host; transformers: generate(N+1)
minus generate(1), the same prompt, greedy).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LLAMA3_8B,
    QWEN3_8B,
    Timer,
    available_backends,
    card,
    engine_from_weights,
    free_memory,
    gib_allocated,
    hf_random_model,
    parity,
    prefill_logits,
    shape,
    sync,
)

HERE = Path(__file__).resolve().parent
TRITON_AB = True  # also time full prefill on the Triton backend (--no-triton-ab skips it)


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def rand_ids(n: int, vocab: int, seed: int, batch: int | None = None) -> Any:
    g = torch.Generator().manual_seed(seed)
    shape_ = (batch, n) if batch else (n,)
    return torch.randint(100, vocab - 1, shape_, generator=g)


# ------------------------------------------------------------------------------------ ours
def our_ttft(engine: Any, ids: list[int], split: dict | None = None) -> float:
    """Seconds from submit to the first sampled token (one request, whole prompt in one step if the
    engine's max_prefill_tokens allows). max_new_tokens=2 so the request's page release falls
    after the timed step. `split` gets the model forward's share (`forward_s`, plan included)."""
    from redknot_rag.sampling import SamplingParams

    req = engine.make_request(ids, SamplingParams(max_new_tokens=2, ignore_eos=True))
    timer = ForwardTimer(engine)
    with Timer(engine.runner.device) as t:
        engine.submit(req)
        while not req.output_ids:
            engine.step()
    timer.detach()
    if split is not None:
        split["forward_s"] = timer.s
    while not req.is_finished:
        engine.step()
    return t.s


class ForwardTimer:
    """Wraps `engine.runner.forward` (device synchronized around it) to split a step into the forward
    (eager or CUDA-graph replay) and the engine's host work (scheduling, slot tables, sampling)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.inner, self.s, self.times = engine, engine.runner.forward, 0.0, []
        engine.runner.forward = self  # instance attribute shadows the method

    def __call__(self, *a: Any, **kw: Any) -> torch.Tensor:
        sync(self.engine.runner.device)
        t = time.perf_counter()
        out = self.inner(*a, **kw)
        sync(self.engine.runner.device)
        self.times.append(time.perf_counter() - t)
        self.s += self.times[-1]
        return out

    def detach(self) -> None:
        del self.engine.runner.forward


def our_decode(engine: Any, prompts: list[list[int]], steps: int) -> dict:
    """Decode tokens/s: prefill everything, then time `steps` steps in which all sequences decode."""
    from redknot_rag.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 4, ignore_eos=True)
    reqs = [engine.submit(engine.make_request(p, params)) for p in prompts]
    while not all(r.output_ids for r in reqs):
        engine.step()
    times = []
    timer = ForwardTimer(engine)
    for _ in range(steps):
        with Timer(engine.runner.device) as t:
            st = engine.step()
        assert st.num_decode == len(prompts), st
        times.append(t.s)
    timer.detach()
    while not all(r.is_finished for r in reqs):
        engine.step()
    total = sum(times)
    fwd = statistics.median(timer.times) * 1e3
    step = statistics.median(times) * 1e3
    return dict(
        batch=len(prompts), steps=steps, seconds=total, tokens_per_s=len(prompts) * steps / total,
        step_ms_median=step, forward_ms_median=fwd, host_ms_median=step - fwd,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ transformers
@torch.inference_mode()
def hf_ttft(model: Any, ids: torch.Tensor) -> float:
    """One forward over the prompt with a KV cache, logits of the last token (what generate's
    prefill does before sampling)."""
    from transformers import DynamicCache

    dev = model.device
    x = ids.view(1, -1).to(dev)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    with Timer(dev) as t:
        out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).item()
    return t.s


@torch.inference_mode()
def hf_generate_s(model: Any, ids: torch.Tensor, new: int) -> float:
    dev = model.device
    x = ids.to(dev)
    with Timer(dev) as t:
        model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    return t.s


def hf_decode(model: Any, ids: torch.Tensor, steps: int) -> dict:
    hf_generate_s(model, ids, 2)  # warm up this batch size
    t1 = min(hf_generate_s(model, ids, 1) for _ in range(2))
    tn = hf_generate_s(model, ids, steps + 1)
    total = tn - t1
    b = ids.shape[0]
    return dict(batch=b, steps=steps, seconds=total, tokens_per_s=b * steps / total, step_ms_median=total / steps * 1e3)


# ------------------------------------------------------------------------------------ CPU mode
def cpu_main(out: Path, lengths: list[int], steps: int, reps: int = 2, threads: int = 0) -> None:
    from transformers import AutoModelForCausalLM

    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import load_model, resolve_model_dir

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    loaded = load_model(None, dtype=torch.float32, device="cpu")
    engine = Engine(
        EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=1.0, max_prefill_tokens=max(lengths) + 16),
        loaded=loaded,
    )
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None)[0], dtype=torch.float32).eval()
    vocab = engine.model_config.vocab_size
    data: dict[str, Any] = dict(
        mode="cpu", model=loaded.name, dtype="float32", threads=torch.get_num_threads(),
        load_average=os.getloadavg(), note="2 shared cores: other jobs ran meanwhile; ours and HF alternate",
        cpu=os.cpu_count(), torch=torch.__version__, attention_backend=engine.runner.backend.name,
        prefill=[], decode=[],
    )  # fmt: skip
    import transformers

    data["transformers"] = transformers.__version__
    our_ttft(engine, rand_ids(32, vocab, 0).tolist())  # warm up
    hf_ttft(hf, rand_ids(32, vocab, 0))
    # ours and transformers alternate, best of each: this machine's cores are shared with other jobs
    for n in lengths:
        ids = rand_ids(n, vocab, n)
        o, h = float("inf"), float("inf")
        for _ in range(reps):
            o = min(o, our_ttft(engine, ids.tolist()))
            h = min(h, hf_ttft(hf, ids))
        row = dict(tokens=n, ours_s=o, hf_s=h, ours_tok_s=n / o, hf_tok_s=n / h, speedup=h / o)
        data["prefill"].append(row)
        log("prefill", row)
    for b in (1, 16):
        prompts = rand_ids(64, vocab, 100 + b, batch=b)
        o = max((our_decode(engine, prompts.tolist(), steps) for _ in range(reps)), key=lambda r: r["tokens_per_s"])
        h = max((hf_decode(hf, prompts, steps) for _ in range(reps)), key=lambda r: r["tokens_per_s"])
        row = dict(batch=b, prompt_tokens=64, ours=o, hf=h, speedup=o["tokens_per_s"] / h["tokens_per_s"])
        data["decode"].append(row)
        log("decode", row)
    assert engine.runner.free_pages == engine.runner.num_pages
    (out / "results_cpu.json").write_text(json.dumps(data, indent=1))
    log("wrote", out / "results_cpu.json")


# ------------------------------------------------------------------------------------ GPU mode
def gpu_main(out: Path, tiny: bool, budget_s: float, backend_arg: str | None) -> None:
    start = time.time()
    dev = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    backends = available_backends(dev)
    backend = backend_arg or backends[0]
    if backend not in backends:  # e.g. --tiny --backend triton under TRITON_INTERPRET=1
        backends.insert(0, backend)
    data: dict[str, Any] = dict(
        mode="gpu", card=card(), device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (tiny)",
        torch=torch.__version__, dtype=str(dtype).replace("torch.", ""), backend=backend,
        backends_available=backends, tiny=tiny, prefill=[], decode=[], parity=[], notes=[],
    )  # fmt: skip
    import transformers

    data["transformers"] = transformers.__version__
    path = out / f"results_engine_{card()}{'_tiny' if tiny else ''}.json"

    def save() -> None:
        path.write_text(json.dumps(data, indent=1))

    ctx = Ctx(dev, dtype, tiny, backend, backends, data, save)
    for part in (llama_part, qwen_part):
        if part is qwen_part and time.time() - start > budget_s:
            data["notes"].append("Qwen3 parity skipped: time budget")
            continue
        try:
            part(ctx)
        except Exception as e:  # keep what the other part measures
            import traceback

            traceback.print_exc()
            data["notes"].append(f"{part.__name__} failed: {type(e).__name__}: {e}")
        free_memory()
        log(f"after {part.__name__}: {gib_allocated():.1f} GiB allocated")
    data["total_s"] = time.time() - start
    save()
    log("wrote", path)
    try:
        plot(path)
    except Exception as e:
        log("plot failed:", e)


class Ctx:
    def __init__(self, dev, dtype, tiny, backend, backends, data, save) -> None:  # noqa: ANN001
        self.dev, self.dtype, self.tiny, self.backend, self.backends = dev, dtype, tiny, backend, backends
        self.data, self.save = data, save
        self.dtype_name = str(dtype).replace("torch.", "")


def hf_refs(hf: Any, ids: torch.Tensor, c: Ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' logits in the run dtype, and in float32 from the same weights (the model is cast
    up and back down; bf16 -> fp32 -> bf16 is exact), to show bf16's own noise floor."""
    x = ids.view(1, -1).to(c.dev)
    with torch.inference_mode():
        ref = hf(input_ids=x).logits[0].float().cpu()
        if c.dtype == torch.float32:
            return ref, None
        hf.float()
        ref32 = hf(input_ids=x).logits[0].float().cpu()
        hf.to(c.dtype)
    free_memory()
    c.data.setdefault("hf_noise_floor", []).append(dict(tokens=len(ids), **parity(ref, ref32)))
    log("transformers bf16 vs fp32", c.data["hf_noise_floor"][-1])
    return ref, ref32


def parity_rows(
    c: Ctx, engine: Any, model: str, ids: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor | None = None
) -> None:
    for bname in c.backends:
        be = engine.runner.backend if bname == c.backend else _backend(engine, bname)
        ours = prefill_logits(engine, ids.tolist(), be)
        row = dict(model=model, tokens=len(ids), backend=bname, **parity(ours, ref))
        if ref32 is not None:
            row["ours_vs_fp32"] = parity(ours, ref32)
            row["hf_bf16_vs_fp32"] = c.data["hf_noise_floor"][-1]
        if bname == "flashinfer":
            row["flashinfer_path"] = "triton" if be.use_triton else "flashinfer"
        c.data["parity"].append(row)
        log("parity", row)
    c.save()


def llama_part(c: Ctx) -> None:
    dev, data, tiny = c.dev, c.data, c.tiny
    lengths = [64, 128, 256, 512] if tiny else [4096, 8192, 16384, 32768]
    batches = [1, 4, 8] if tiny else [1, 16, 64]
    prompt_len, steps, parity_len = (32, 4, 64) if tiny else (512, 32, 512)
    # ---- transformers: Llama-3-8B shape, random init on the device -------------------------
    kw = shape(LLAMA3_8B, tiny)
    hf = hf_random_model("llama", kw, c.dtype, str(dev))
    hf_cfg = hf.config
    vocab = kw["vocab_size"]
    log(f"HF llama built, {gib_allocated():.1f} GiB")
    hf_ttft(hf, rand_ids(lengths[0], vocab, 0))  # warm up
    hf_pre = {}
    for n in lengths:
        ids = rand_ids(n, vocab, n)
        reps = 2 if n >= 16384 and not tiny else 3
        hf_pre[n] = min(hf_ttft(hf, ids) for _ in range(reps))
        log(f"HF prefill {n}: {hf_pre[n] * 1e3:.1f} ms")
    hf_dec = {}
    for b in batches:
        hf_dec[b] = hf_decode(hf, rand_ids(prompt_len, vocab, 100 + b, batch=b), steps)
        log("HF decode", hf_dec[b])
    par_ids = rand_ids(parity_len, vocab, 7)
    ref, ref32 = hf_refs(hf, par_ids, c)
    weights = dict(hf.state_dict().items())
    del hf
    free_memory()

    # ---- ours over the same tensors -----------------------------------------------------------
    max_prefill = 8192 if not tiny else 512  # sizes the pool's activation reserve (engine.py)
    engine = engine_from_weights(
        hf_cfg, weights, "random-llama3-8b", device=str(dev), dtype=c.dtype_name, attention_backend=c.backend,
        max_prefill_tokens=max_prefill, max_running_requests=max(batches), cpu_kv_gib=0.5,
    )  # fmt: skip
    del weights
    free_memory()
    # one step runs the whole prompt (as transformers does): only scheduling changes here
    engine.config = replace(engine.config, max_prefill_tokens=max(lengths) + 64)
    data["pool"] = dict(pages=engine.runner.num_pages, gib=engine.runner.pool_bytes / 2**30)
    log(f"engine built ({c.backend}), {gib_allocated():.1f} GiB allocated, pool {data['pool']}")
    mc = engine.model_config
    parity_rows(c, engine, "llama3-8b-shape", par_ids, ref, ref32)

    t = time.time()
    our_ttft(engine, rand_ids(lengths[0] // 2, vocab, 1).tolist())  # warm up (FlashInfer JIT on a fresh machine)
    data["warmup_s"] = time.time() - t
    for n in lengths:
        ids = rand_ids(n, vocab, n).tolist()
        reps = 2 if n >= 16384 and not tiny else 3
        runs = []
        for _ in range(reps):
            split: dict = {}
            runs.append((our_ttft(engine, ids, split), split["forward_s"]))
        ours, fwd = min(runs)
        used = c.backend
        if c.backend == "flashinfer" and engine.runner.backend.use_triton:
            used = "triton (flashinfer backend fell back)"
        row = dict(tokens=n, ours_s=ours, ours_forward_s=fwd, hf_sdpa_s=hf_pre[n], speedup=hf_pre[n] / ours, path=used)
        data["prefill"].append(row)
        log("prefill", row)
    c.save()
    if c.backend == "flashinfer" and "triton" in c.backends and TRITON_AB:  # the other GPU path, same engine
        main_backend = engine.runner.backend
        engine.runner.backend = _backend(engine, "triton")
        try:
            our_ttft(engine, rand_ids(lengths[0] // 2, vocab, 1).tolist())
            for row in data["prefill"]:
                split = {}
                row["triton_s"] = our_ttft(engine, rand_ids(row["tokens"], vocab, row["tokens"]).tolist(), split)
                row["triton_forward_s"] = split["forward_s"]
                log("prefill triton", row["tokens"], row["triton_s"])
        except Exception as e:
            data["notes"].append(f"triton prefill A/B failed: {type(e).__name__}: {e}")
        finally:
            engine.runner.backend = main_backend
        c.save()
    assert engine.runner.free_pages == engine.runner.num_pages

    # ---- decode: eager, then CUDA graphs -----------------------------------------------------
    eager = {}
    graphs_on, engine.runner.cuda_graphs = engine.runner.cuda_graphs, False  # eager first
    for b in batches:
        eager[b] = our_decode(engine, rand_ids(prompt_len, vocab, 100 + b, batch=b).tolist(), steps)
        log("ours eager decode", eager[b])
    engine.runner.cuda_graphs = graphs_on
    graph: dict[int, Any] = {}
    if dev.type == "cuda" and c.backend in ("flashinfer", "triton"):
        graph = graph_decode(engine, batches, prompt_len, steps, vocab, data)
    for b in batches:
        best = graph.get(b) or eager[b]
        data["decode"].append(dict(
            batch=b, prompt_tokens=prompt_len, ours_eager=eager[b], ours_graph=graph.get(b), hf_generate=hf_dec[b],
            speedup=best["tokens_per_s"] / hf_dec[b]["tokens_per_s"],
        ))  # fmt: skip
    c.save()
    assert engine.runner.free_pages == engine.runner.num_pages
    del mc


def graph_decode(engine: Any, batches: list[int], prompt_len: int, steps: int, vocab: int, data: dict) -> dict:
    """Decode through the engine with its own CUDA graphs (`KVRunner.cuda_graphs`, captured on the
    first decode-only step)."""
    graph: dict[int, Any] = {}
    r = engine.runner
    if not r.cuda_graphs:
        data["notes"].append("CUDA graph decode: not available for this runner (device/backend/config)")
        return graph
    try:
        t = time.time()
        r._decode_graphs()
        data["graph_capture_s"] = time.time() - t
        before = r.graph_replays
        for b in batches:
            graph[b] = our_decode(engine, rand_ids(prompt_len, vocab, 100 + b, batch=b).tolist(), steps)
            log("ours graph decode", graph[b])
        data["graph_replays"] = r.graph_replays - before
    except Exception as e:  # report, keep the eager numbers
        import traceback

        traceback.print_exc()
        data["notes"].append(f"CUDA graph decode failed: {type(e).__name__}: {e}")
    return graph


def qwen_part(c: Ctx) -> None:
    kw = shape(QWEN3_8B, c.tiny)
    parity_len = 64 if c.tiny else 512
    hf = hf_random_model("qwen3", kw, c.dtype, str(c.dev))
    hf_cfg = hf.config
    par_ids = rand_ids(parity_len, kw["vocab_size"], 8)
    ref, ref32 = hf_refs(hf, par_ids, c)
    weights = dict(hf.state_dict().items())
    del hf
    free_memory()
    engine = engine_from_weights(
        hf_cfg, weights, "random-qwen3-8b", device=str(c.dev), dtype=c.dtype_name, attention_backend=c.backend,
        max_prefill_tokens=parity_len, mem_fraction=0.3, cpu_kv_gib=0.1,
    )  # fmt: skip
    del weights
    parity_rows(c, engine, "qwen3-8b-shape", par_ids, ref, ref32)


def _backend(engine: Any, name: str) -> Any:
    return engine.runner.backend_named(name)


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(path).read_text())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    xs = [r["tokens"] for r in d["prefill"]]
    ax.plot(xs, [r["ours_s"] * 1e3 for r in d["prefill"]], "-o", label=f"ours ({d['backend']})")
    ax.plot(xs, [r["hf_sdpa_s"] * 1e3 for r in d["prefill"]], "--s", label="transformers SDPA")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"full prefill, Llama-3-8B shape, bf16 ({d['card']})")
    ax.legend()
    ax = axes[1]
    bs = [r["batch"] for r in d["decode"]]
    x = range(len(bs))
    hf_tps = [r["hf_generate"]["tokens_per_s"] for r in d["decode"]]
    ax.bar([i - 0.27 for i in x], hf_tps, 0.27, label="transformers generate")
    ax.bar([i for i in x], [r["ours_eager"]["tokens_per_s"] for r in d["decode"]], 0.27, label="ours eager")
    ax.bar([i + 0.27 for i in x], [(r["ours_graph"] or {}).get("tokens_per_s", 0) for r in d["decode"]], 0.27,
           label="ours CUDA graph")  # fmt: skip
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"batch {b}" for b in bs])
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path).replace(".json", ".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU mode (random-weight 8B shapes)")
    ap.add_argument("--tiny", action="store_true", help="GPU code path on the CPU with 2-layer shapes")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT for --gpu, else this folder)")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--backend", default=None, help="attention backend (default: flashinfer if installed, else triton)")
    ap.add_argument("--lengths", default="128,512,1024", help="CPU mode: prefill lengths")
    ap.add_argument("--steps", type=int, default=16, help="CPU mode: decode steps")
    ap.add_argument("--threads", type=int, default=0, help="CPU mode: torch threads (0: all cores)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-triton-ab", action="store_true", help="GPU mode: skip the Triton full-prefill A/B")
    args = ap.parse_args()
    global TRITON_AB
    TRITON_AB = not args.no_triton_ab
    if args.plot:
        plot(Path(args.plot))
        return
    if args.gpu or args.tiny:
        out = Path(args.out or os.environ.get("OUT") or HERE)
        out.mkdir(parents=True, exist_ok=True)
        gpu_main(out, args.tiny, args.budget_s, args.backend)
    else:
        out = Path(args.out or HERE)
        cpu_main(out, [int(x) for x in args.lengths.split(",")], args.steps, threads=args.threads)


if __name__ == "__main__":
    main()
