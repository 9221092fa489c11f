"""bench/load through SGLang's router: 1 vs 2 replicas of `redknot serve` at the same offered load.

For each replica count, `redknot_rag.cluster` starts redis-server + the replicas + sglang-router
(cache_aware), then `bench/load/run.py --url <router> --generate-only` drives the same closed-loop
clients for the same time. Each replica runs with one torch thread (`OMP_NUM_THREADS=1`), so 2 replicas
use 2 cores where 1 uses 1: what adding a replica buys when it brings its own hardware.

    python bench/load/router.py --clients 16 --duration 30 [--policy round_robin]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from redknot_rag.ports import free_ports

HERE = Path(__file__).resolve().parent


def one_run(replicas: int, args: argparse.Namespace, tmp: Path) -> dict:
    from redknot_rag.cluster import Cluster, ClusterSpec

    router, base, redis = free_ports(3)
    serve = ("--max-running-requests", str(args.max_running), "--max-queued-requests", str(args.max_queued),
             "--log-level", "warning", *args.serve_args)  # fmt: skip
    spec = ClusterSpec(replicas=replicas, port=router, replica_port=base, redis_port=redis, serve_args=serve,
                       policy=args.policy, log_dir=tmp / f"logs-{replicas}")  # fmt: skip
    out = tmp / f"load-{replicas}.json"
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the replicas
    with Cluster(spec):
        cmd = [sys.executable, str(HERE / "run.py"), "--url", spec.router_url, "--generate-only",
               "--clients", str(args.clients), "--duration", str(args.duration),
               "--max-new-tokens", str(args.max_new_tokens), "--out", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        per_replica = [answered(spec.replica_url(i)) for i in range(replicas)]
    rep = json.loads(out.read_text())
    rep.pop("rss_mib", None)
    rep["answered_per_replica"] = per_replica
    return rep


def answered(url: str) -> int:
    """Requests a replica finished (its `redknot_request_success_total`)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return int(sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("redknot_request_success_total")))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--max-queued", type=int, default=16)
    ap.add_argument("--policy", default="cache_aware", help="the router's policy")
    ap.add_argument("--out", default=None, help="default: results_cpu_router_<policy>.json here")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then extra `redknot serve` flags")
    args = ap.parse_args()
    args.serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    with tempfile.TemporaryDirectory() as d:
        runs = {str(n): one_run(n, args, Path(d)) for n in (1, 2)}
    g = {n: r["routes"]["/generate"] for n, r in runs.items()}
    summary = {
        n: {"requests_per_s": runs[n]["throughput_rps"], "ttft_p50_s": g[n]["ttft_p50_s"],
            "ttft_p99_s": g[n]["ttft_p99_s"], "ok": runs[n]["num_ok"], "failed": runs[n]["num_failed"],
            "http_429": runs[n]["num_429"], "answered_per_replica": runs[n]["answered_per_replica"]}
        for n in runs
    }  # fmt: skip
    ratios = {
        "requests_per_s_2_over_1": round(summary["2"]["requests_per_s"] / max(summary["1"]["requests_per_s"], 1e-9), 2),
        "ttft_p50_2_over_1": round(summary["2"]["ttft_p50_s"] / max(summary["1"]["ttft_p50_s"], 1e-9), 2),
        "ttft_p99_2_over_1": round(summary["2"]["ttft_p99_s"] / max(summary["1"]["ttft_p99_s"], 1e-9), 2),
    }
    result = {
        "machine": "shared 2-core CPU box (other jobs running), default model (SmolLM2-135M), fp32",
        "router": f"sglang-router 0.3.2, {args.policy}",
        "replica_threads": 1,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    out = Path(args.out) if args.out else HERE / f"results_cpu_router_{args.policy}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
