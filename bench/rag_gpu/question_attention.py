"""One layer of the question's attention (GPU): 64 queries at the tail of a 4K / 32K paged context,
Llama-3-8B attention shape (8 kv heads, GQA group 4, head_dim 128, bf16, page 16, head-granular pages
as the FlashInfer backend maps them: `num_kv_heads=1`, one request per kv head, in-kernel RoPE), under
FlashInfer 0.5.3 plans: the eager default, forced KV splits (`fixed_split_size` in pages), no split
(`disable_split_kv`), and the CUDA-graph-mode wrapper with the padded layout of `redknot_rag/graphs/prefill.py`.
Prints and writes `question_attention_<card>.json`: microseconds per call (CUDA events, median of 5 x 50).

`python bench/rag_gpu/question_attention.py --out DIR`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from common import card  # noqa: E402

HKV, G, D, PS, Q = 8, 4, 128, 16, 64
SPLITS = (16, 64, 256)  # pages per KV chunk (the default plan picks 128 at 32K, 17 at 4K)


def timed(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        runs.append(a.elapsed_time(b) * 1e3 / iters)
    return statistics.median(runs)


def main() -> None:
    import flashinfer

    from redknot_rag.graphs.prefill import padded_requests

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent))
    args = ap.parse_args()
    dev = torch.device("cuda")
    ws = torch.zeros(1 << 30, dtype=torch.uint8, device=dev)
    kw = dict(
        num_qo_heads=G, num_kv_heads=1, head_dim_qk=D, page_size=PS, causal=True, pos_encoding_mode="ROPE_LLAMA",
        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=D**-0.5, rope_scale=1.0, rope_theta=5e5,
    )  # fmt: skip
    rows = []
    for ctx in (4128 + Q, 32800 + Q):
        p = -(-ctx // PS)
        k = torch.randn(HKV * p + 1, PS, 1, D, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        pages = (torch.randperm(HKV * p, device=dev) + 1).to(torch.int32).view(1, HKV, p)  # [L=1, Hkv, P]
        q = torch.randn(HKV * Q, G, D, dtype=torch.bfloat16, device=dev)  # rows (head, token)
        qo = torch.arange(HKV + 1, dtype=torch.int32) * Q
        kvp = torch.arange(HKV + 1, dtype=torch.int32) * p
        lpl = torch.full((HKV,), ctx - (p - 1) * PS, dtype=torch.int32)
        want = None
        plans = [("eager default", {})] + [(f"eager fixed_split_size={n}", {"fixed_split_size": n}) for n in SPLITS]
        plans.append(("eager disable_split_kv", {"disable_split_kv": True}))
        for label, extra in plans:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
            try:
                w.plan(qo.to(dev), kvp.to(dev), pages.reshape(-1), lpl.to(dev), **kw, **extra)
                o = w.run(q, (k, v))
            except Exception as e:  # e.g. a split too fine for the workspace
                rows.append(dict(context=ctx, plan=label, error=f"{type(e).__name__}: {e}"))
                print(rows[-1], flush=True)
                continue
            want = o if want is None else want
            err = (o.float() - want.float()).abs().max().item()
            us = timed(lambda w=w: w.run(q, (k, v)))  # noqa: B023 (q, k, v: fixed within this context)
            rows.append(dict(context=ctx, plan=label, us=us, max_diff_vs_default=err))
            print(rows[-1], flush=True)
        rq = padded_requests(Q, Q, pages, ctx, PS)
        idx = torch.zeros(rq.indices.shape[1] + 64, dtype=torch.int32, device=dev)

        def i32(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=dev)

        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            ws, "NHD", use_cuda_graph=True, backend="fa2", qo_indptr_buf=i32(2 * HKV + 1),
            paged_kv_indptr_buf=i32(2 * HKV + 1), paged_kv_indices_buf=idx, paged_kv_last_page_len_buf=i32(2 * HKV),
        )  # fmt: skip
        w.plan(rq.qo_indptr, rq.kv_indptr, rq.indices[0], rq.last_page_len, **kw)
        o = w.run(q, (k, v))
        err = (o.float() - want.float()).abs().max().item()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            w.run(q, (k, v))
        rows.append(dict(context=ctx, plan="cuda-graph mode, padded layout (replay)", us=timed(g.replay),
                         max_diff_vs_default=err))  # fmt: skip
        print(rows[-1], flush=True)
        bytes_kv = 2 * HKV * ctx * D * 2
        for r in rows:
            if r["context"] == ctx and "us" in r:
                r["kv_tb_per_s"] = bytes_kv / (r["us"] * 1e-6) / 1e12
    out = Path(args.out) / f"question_attention_{card()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
