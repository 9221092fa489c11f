"""SegPagedAttention benchmarks (GPU).

1. Decode attention bandwidth: K/V bytes read per second over HBM peak, one layer, Hkv=8, g=4,
   head_dim 128, page 16, bf16, batch x context grid; dense (all heads global) vs head-aware
   (25% global, 75% local = sink 4 + window 256). FlashInfer runs dense only (local heads have
   position gaps: its in-kernel RoPE cannot place them; they run on Triton).
2. Decode step of a Llama-3-8B-shape model (random bf16 weights): batch 1/16/64 x 8K/32K where it
   fits, dense vs head-aware, triton vs flashinfer, CUDA graphs on/off. Host planning is timed
   separately (it is not part of the device step and is done once per config here).

Writes results_<card>.json (and a PNG when matplotlib is importable; `--plot FILE` plots later).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

PEAK = {"H100": 3.35e12, "H200": 4.8e12}
HKV, G, D, PS = 8, 4, 128, 16
SINK, WINDOW = 4, 256


def card() -> str:
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else ("H100" if "H100" in name else name.replace(" ", "_"))


def timeit(fn: Any, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters / 1e3  # seconds


# --------------------------------------------------------------------------- attention bandwidth
def row_lengths(batch: int, ctx: int, head_aware: bool) -> torch.Tensor:
    """Visible keys per row (seq, kv_head) `[B*Hkv]`: 2 of 8 heads global when head-aware."""
    lens = torch.full((batch, HKV), ctx, dtype=torch.int64)
    if head_aware:
        local = torch.ones(HKV, dtype=torch.bool)
        local[::4] = False
        lens[:, local] = min(ctx, SINK + WINDOW)
    return lens.flatten()


def attention_case(batch: int, ctx: int, head_aware: bool, fi: Any, res: list[dict]) -> None:
    from redknot_rag.attention.triton_backend import choose_num_splits
    from redknot_rag.kernels.paged_attention import SegPagedMeta, rope_tables, seg_paged_attention

    dev = torch.device("cuda")
    lens = row_lengths(batch, ctx, head_aware)  # [R]
    r = lens.numel()
    pages_per_row = (lens + PS - 1) // PS
    num_pages = int(pages_per_row.sum())
    k = torch.randn(num_pages, PS, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HKV * G, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(num_pages, device=dev, dtype=torch.int64).to(torch.int32)  # scattered pages
    page_indptr = torch.zeros(r + 1, dtype=torch.int64)
    page_indptr[1:] = pages_per_row.cumsum(0)
    kv_bytes = int(lens.sum()) * D * 2 * 2
    # triton: per-key slots and positions; local rows = sink (pos 0..3) + window (pos ctx-256..ctx-1)
    tok_indptr = torch.zeros(r + 1, dtype=torch.int64)
    tok_indptr[1:] = lens.cumsum(0)
    row_of = torch.repeat_interleave(torch.arange(r), lens).to(dev)
    t_in_row = torch.arange(int(lens.sum()), device=dev) - tok_indptr.to(dev)[row_of]
    page = perm[page_indptr.to(dev)[row_of] + t_in_row // PS].long()
    slots = (page * PS + t_in_row % PS).to(torch.int32)
    rl = lens.to(dev)[row_of]
    pos = torch.where((rl < ctx) & (t_in_row >= SINK), ctx - rl + t_in_row, t_in_row).to(torch.int32)
    meta = SegPagedMeta(
        q_pos=torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev),
        row_q_start=torch.arange(batch, dtype=torch.int32, device=dev).repeat_interleave(HKV),
        row_q_len=torch.ones(r, dtype=torch.int32, device=dev),
        row_head=torch.arange(HKV, dtype=torch.int32, device=dev).repeat(batch),
        kv_indptr=tok_indptr.to(torch.int32).to(dev),
        kv_slots=slots,
        kv_pos=pos,
        max_q_len=1,
    )
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = rope_tables(inv_freq, ctx, torch.bfloat16)
    splits = choose_num_splits(r, 1, int(lens.max()), dev, 64, int(lens.sum()))
    kslots, vslots = k.view(-1, D), v.view(-1, D)
    t = timeit(lambda: seg_paged_attention(q, kslots, vslots, meta, cos, sin, G, num_splits=splits))
    base = dict(batch=batch, ctx=ctx, head_aware=head_aware, kv_bytes=kv_bytes)
    peak = PEAK.get(card(), 3.35e12)
    res.append(
        base
        | dict(backend="triton", num_splits=splits, seconds=t, tbps=kv_bytes / t / 1e12, frac_peak=kv_bytes / t / peak)
    )  # noqa: E501
    if fi is not None and not head_aware:
        ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        last = (lens - (pages_per_row - 1) * PS).to(torch.int32)
        w.plan(
            page_indptr.to(torch.int32).to(dev), perm, last.to(dev), G, 1, D, PS,
            pos_encoding_mode="ROPE_LLAMA", q_data_type=torch.bfloat16, rope_theta=500000.0,
        )  # fmt: skip
        qr = q.view(r, G, D)  # rows (seq, head): [B*Hkv, g, D]
        cache = (k.unsqueeze(2), v.unsqueeze(2))
        t = timeit(lambda: w.run(qr, cache))
        res.append(
            base | dict(backend="flashinfer", seconds=t, tbps=kv_bytes / t / 1e12, frac_peak=kv_bytes / t / peak)
        )  # noqa: E501


# --------------------------------------------------------------------------- model decode step
def llama3_8b() -> Any:
    from redknot_rag.config import ModelConfig

    return ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_q_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position=131072,
    )  # fmt: skip


def decode_batch(cfg: Any, batch: int, ctx: int, head_aware: bool, dev: torch.device) -> tuple[Any, int]:
    """Decode batch at position ctx-1; local (layer, head) blocks get pages only for sink + window
    (their invisible middle points at page 0). Returns (ForwardBatch, pages used)."""
    from redknot_rag.batch import ForwardBatch, KVLayout, SeqSlice

    nl, hkv = cfg.num_layers, cfg.num_kv_heads
    is_global = torch.ones(nl, hkv, dtype=torch.bool)
    if head_aware:
        is_global = (torch.arange(hkv)[None, :] + torch.arange(nl)[:, None]) % 4 == 0  # 25% global
    t = torch.arange(ctx)
    vis_local = (t < SINK) | (t >= ctx - WINDOW)
    npg = -(-ctx // PS)
    page_vis = torch.zeros(npg, dtype=torch.bool)
    page_vis[t[vis_local] // PS] = True
    need = is_global[:, :, None] | page_vis[None, None, :]  # [L, Hkv, P] pages that hold visible keys
    next_page = 1  # page 0: where invisible tokens of local heads point
    seqs = []
    for i in range(batch):
        ids = torch.where(need, next_page + need.flatten().cumsum(0).view_as(need) - 1, 0)  # [L, Hkv, P]
        slots = ids[:, :, t // PS] * PS + t % PS  # [L, Hkv, T]
        next_page += int(need.sum())
        vis = is_global[:, :, None] | vis_local[None, None, :] if head_aware else None  # [L, Hkv, T]
        seqs.append(
            SeqSlice(
                q_start=i, q_len=1, new_slots=slots[:, :, -1:].clone().to(dev), kv_slots=slots.to(dev),
                kv_pos=t.to(dev), kv_visible=None if vis is None else vis.to(dev),
                layout=KVLayout(ctx, pos_is_index=True, page_aligned=False, all_visible=vis is None),
            )
        )  # fmt: skip
    fb = ForwardBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (batch,)),
        positions=torch.full((batch,), ctx - 1, dtype=torch.int64),
        seqs=seqs,
        logit_rows=torch.arange(batch),
    )
    return fb, next_page


def model_cases(res: list[dict], deadline: float, have_fi: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the kernels' test fixtures
    from kernel_fixtures import random_weights

    from redknot_rag.model import CausalLM
    from redknot_rag.rope import Rotary

    dev = torch.device("cuda")
    cfg = llama3_8b()
    torch.manual_seed(0)
    model = CausalLM(cfg, random_weights(cfg, torch.bfloat16, "cuda"))
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    rot = Rotary(cfg, dev)
    grid = [(1, 8192), (1, 32768), (16, 8192), (16, 32768), (64, 8192)]
    for batch, ctx in grid:
        for head_aware in (False, True):
            pages_needed = batch * cfg.num_layers * cfg.num_kv_heads * (ctx // PS + 1) + 1
            bytes_needed = pages_needed * PS * D * 2 * 2
            row = dict(batch=batch, ctx=ctx, head_aware=head_aware)
            if bytes_needed > 0.8 * free and not head_aware:
                res.append(row | dict(skipped=f"dense KV {bytes_needed / 2**30:.0f} GiB does not fit"))
                continue
            if time.time() > deadline:
                res.append(row | dict(skipped="time budget"))
                continue
            model_case(model, cfg, rot, row, batch, ctx, head_aware, have_fi, res)
            torch.cuda.empty_cache()


def model_case(
    model: Any,
    cfg: Any,
    rot: Any,
    row: dict,
    batch: int,
    ctx: int,
    head_aware: bool,
    have_fi: bool,
    res: list[dict],
) -> None:
    from redknot_rag.graphs.decode import DecodeGraphRunner, PlannedBackend
    from redknot_rag.kvcache import KVPool
    from redknot_rag.runner import load_backend

    dev = torch.device("cuda")
    t0 = time.time()
    fb, used = decode_batch(cfg, batch, ctx, head_aware, dev)
    pool = KVPool(used, PS, D, torch.bfloat16, dev)
    build_s = time.time() - t0
    for name in ("triton", "flashinfer") if have_fi else ("triton",):
        be = load_backend(name, cfg, pool, rot)
        t0 = time.time()
        be.plan(fb)
        torch.cuda.synchronize()
        plan_s = time.time() - t0
        path = "triton" if name == "triton" or getattr(be, "use_triton", False) else "flashinfer"
        if name == "flashinfer" and path == "triton":
            res.append(row | dict(backend=name, path="triton", note="falls back to triton (same kernel)"))
            continue
        proxy = PlannedBackend(be)
        eager = timeit(lambda: model.forward(fb, proxy), iters=5, warmup=2)  # noqa: B023
        if path == "flashinfer":
            cap = batch * cfg.num_kv_heads * ctx
        else:
            cap = int(be.meta.kv_indptr[:, -1].max())
        runner_be = be
        runner = DecodeGraphRunner(model, runner_be, max_kv_tokens=cap + 1, batch_sizes=(batch,))
        runner.capture()
        slot = runner.prepare(fb)
        graph_s = timeit(lambda: runner.replay(slot, batch), iters=10, warmup=2) if slot else None  # noqa: B023
        res.append(
            row | dict(backend=name, path=path, eager_s=eager, graph_s=graph_s, plan_host_s=plan_s,
                       build_s=build_s, kv_pool_gib=pool.num_bytes / 2**30)
        )  # fmt: skip
        print(res[-1], flush=True)


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(path))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for backend, ha, style in [("flashinfer", False, "-o"), ("triton", False, "--s"), ("triton", True, ":^")]:
        for batch in sorted({r["batch"] for r in data["attention"]}):
            pts = [
                r for r in data["attention"]
                if r["backend"] == backend and r["head_aware"] == ha and r["batch"] == batch
            ]  # fmt: skip
            if pts:
                ax.plot([p["ctx"] for p in pts], [p["frac_peak"] for p in pts], style,
                        label=f"{backend}{' head-aware' if ha else ''} B={batch}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("K/V bytes read / HBM peak")
    ax.set_title(f"decode attention bandwidth ({data['card']})")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    rows = [r for r in data["model"] if "eager_s" in r]
    labels = [f"B{r['batch']} {r['ctx'] // 1024}K {'HA' if r['head_aware'] else 'dense'} {r['path'][:2]}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["eager_s"] * 1e3 for r in rows], 0.4, label="eager")
    ax.bar([i + 0.2 for i in x], [(r["graph_s"] or 0) * 1e3 for r in rows], 0.4, label="CUDA graph")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=70, fontsize=7)
    ax.set_ylabel("decode step (ms)")
    ax.set_title("Llama-3-8B shape, random bf16 weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--plot", default=None, help="only plot an existing results JSON")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot)
        return
    start = time.time()
    try:
        from redknot_rag.attention.flashinfer_backend import import_flashinfer

        fi = import_flashinfer()
    except ImportError:
        fi = None
    data: dict[str, Any] = dict(card=card(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                                peak_bytes_per_s=PEAK.get(card()), attention=[], model=[])  # fmt: skip
    out = os.path.join(args.out, f"results_{card()}.json")

    def save() -> None:
        json.dump(data, open(out, "w"), indent=1)

    grid = [(1, 1024), (1, 32768), (1, 131072), (16, 4096), (16, 32768), (64, 1024), (64, 8192),
            (64, 32768), (64, 131072), (256, 1024), (256, 8192), (256, 32768)]  # fmt: skip
    for batch, ctx in grid:
        for ha in (False, True):
            if time.time() - start > args.budget_s * 0.35:
                break
            attention_case(batch, ctx, ha, fi, data["attention"])
            print(data["attention"][-1], flush=True)
        save()
    model_cases(data["model"], start + args.budget_s, fi is not None)
    save()
    try:
        plot(out)
    except ImportError:
        print("matplotlib missing: plot later with --plot", out)


if __name__ == "__main__":
    main()
