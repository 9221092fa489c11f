"""Load test: N concurrent clients mixing streamed /query and /generate for a fixed time.

Starts `redknot serve` itself (or targets --url), then runs `--clients` closed-loop clients
for `--duration` seconds. Each client streams its request and records the time to the first
token (first SSE event carrying text) and the outcome. 429 answers are the server's deliberate
back-pressure (the client waits Retry-After and goes on); any other non-200 answer, broken
stream or transport error is a failure. The server's RSS is sampled every second.

    python bench/load/run.py --clients 64 --duration 60 --out bench/load/results_cpu.json

Writes a JSON report: p50/p90/p99 TTFT per route, request counts, failures, 429s, RSS series.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from redknot_rag.ports import free_port

QUESTIONS = [
    "What does the global interpreter lock protect?",
    "How do I open a file for appending?",
    "What is a list comprehension?",
    "How are exceptions chained?",
    "What does the with statement do?",
    "How do I format a float with two decimals?",
    "What is a generator?",
    "How does slicing work?",
]
PROMPTS = [
    "Write one sentence about the sea.",
    "List three colors:",
    "The capital of France is",
    "Explain recursion briefly.",
    "def fibonacci(n):",
    "Translate 'good morning' to French:",
]


@dataclass
class Sample:
    route: str
    status: int
    ttft_s: float | None
    latency_s: float
    tokens: int
    error: str | None = None


@dataclass
class Report:
    config: dict
    host: dict
    routes: dict = field(default_factory=dict)
    num_requests: int = 0
    num_ok: int = 0
    num_429: int = 0
    num_failed: int = 0
    failures: list = field(default_factory=list)
    rss_mib: list = field(default_factory=list)
    throughput_rps: float = 0.0
    output_tokens_per_s: float = 0.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))], 4)


async def one_request(client: httpx.AsyncClient, route: str, rng: random.Random, max_new: int) -> Sample:
    if route == "/query":
        body: dict = {"question": rng.choice(QUESTIONS), "top_k": 4, "max_new_tokens": max_new, "stream": True}
    else:
        body = {
            "text": rng.choice(PROMPTS),
            "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.7, "top_p": 0.9},
        }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        async with client.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(
                    route,
                    r.status_code,
                    None,
                    time.perf_counter() - t0,
                    0,
                    None if r.status_code == 429 else r.text[:300],
                )
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                ev = json.loads(payload)
                if "error" in ev:
                    return Sample(route, 200, ttft, time.perf_counter() - t0, tokens, str(ev["error"])[:300])
                has_text = bool(ev.get("text")) if route == "/generate" else ev.get("type") == "token"
                if has_text:
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
            if not done:
                return Sample(route, 200, ttft, time.perf_counter() - t0, tokens, "stream ended without [DONE]")
            return Sample(route, 200, ttft, time.perf_counter() - t0, tokens)
    except httpx.HTTPError as e:
        return Sample(route, 0, None, time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}")


async def client_loop(
    i: int, url: str, headers: dict, routes: list[str], deadline: float, max_new: int, out: list[Sample]
) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        while time.perf_counter() < deadline:
            s = await one_request(client, rng.choice(routes), rng, max_new)
            out.append(s)
            if s.status == 429:
                await asyncio.sleep(1.0)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pid: int | None, deadline: float, series: list) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        if pid is not None:
            v = rss_mib(pid)
            if v is not None:
                series.append([round(time.perf_counter() - t0, 1), round(v, 1)])
        await asyncio.sleep(1.0)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "redknot_rag.cli",
        "serve",
        "--port",
        str(port),
        *(["--ingest-root", str(Path(args.ingest).resolve().parent)] if getattr(args, "ingest", None) else []),
        "--max-running-requests",
        str(args.max_running),
        "--max-queued-requests",
        str(args.max_queued),
        "--log-level",
        "warning",
        *args.server_args,
    ]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"), env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {args.server_log}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def main_async(args: argparse.Namespace) -> Report:
    proc = None
    url, pid = args.url, args.pid
    if url is None:
        proc, url = start_server(args)
        pid = proc.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(url + "/server_info", headers=headers, timeout=30)
        is_json = r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json")
        info = r.json() if is_json else {}  # SGLang's router does not forward /server_info
        routes = ["/generate"]
        if info.get("rag") and not args.generate_only:
            if args.ingest:
                r = httpx.post(
                    url + "/ingest",
                    json={"namespace": "default", "paths": [str(Path(args.ingest).resolve())]},
                    headers={"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {},
                    timeout=1800,
                )
                r.raise_for_status()
            routes = ["/query", "/generate"]
        samples: list[Sample] = []
        rss: list = []
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        await asyncio.gather(
            sample_rss(pid, deadline + 5, rss),
            *(
                client_loop(i, url, headers, routes, deadline, args.max_new_tokens, samples)
                for i in range(args.clients)
            ),
        )
        wall = time.perf_counter() - t0
        admin = {"Authorization": f"Bearer {args.admin_key or args.api_key}"} if args.admin_key or args.api_key else {}
        metrics = httpx.get(url + "/metrics", headers=admin, timeout=30).text  # the admin key reads it
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rep = Report(
        config={
            "clients": args.clients,
            "duration_s": args.duration,
            "routes": routes,
            "max_new_tokens": args.max_new_tokens,
            "max_running_requests": args.max_running,
            "max_queued_requests": args.max_queued,
            "wall_s": round(wall, 1),
        },
        host={
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "server_info": info.get("engine"),
        },
    )
    for route in routes:
        ok = [s for s in samples if s.route == route and s.status == 200 and s.error is None]
        ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
        lats = [s.latency_s for s in ok]
        rep.routes[route] = {
            "ok": len(ok),
            "ttft_p50_s": pct(ttfts, 50),
            "ttft_p90_s": pct(ttfts, 90),
            "ttft_p99_s": pct(ttfts, 99),
            "latency_p50_s": pct(lats, 50),
            "latency_p99_s": pct(lats, 99),
            "http_429": sum(1 for s in samples if s.route == route and s.status == 429),
        }
    rep.num_requests = len(samples)
    rep.num_ok = sum(1 for s in samples if s.status == 200 and s.error is None)
    rep.num_429 = sum(1 for s in samples if s.status == 429)
    bad = [s for s in samples if not (s.status == 429 or (s.status == 200 and s.error is None))]
    rep.num_failed = len(bad)
    rep.failures = [asdict(s) for s in bad[:20]]
    rep.rss_mib = rss
    rep.throughput_rps = round(rep.num_ok / wall, 2)
    rep.output_tokens_per_s = round(sum(s.tokens for s in samples if s.status == 200) / wall, 1)
    rep.config["server_metrics_excerpt"] = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith(
            (
                "redknot_request_success_total",
                "redknot_time_to_first_token_seconds_count",
                "redknot_cached_tokens_total",
                "redknot_rejected_requests_total",
            )
        )
    ]
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="target a running server instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="server pid for RSS sampling (with --url)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--admin-key", default=None)
    ap.add_argument("--data-dir", default=None, help="start the server with RAG over this data dir")
    ap.add_argument("--ingest", default=None, help="a path to ingest (server-side) before the run")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--max-queued", type=int, default=16)
    ap.add_argument("--server-log", default="/tmp/redknot-load-server.log")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra `redknot serve` flags")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args()
    rep = asyncio.run(main_async(args))
    text = json.dumps(asdict(rep), indent=2)
    print(json.dumps({k: v for k, v in asdict(rep).items() if k not in ("rss_mib", "failures")}, indent=2))
    rss = [v for _, v in rep.rss_mib]
    if rss:
        print(f"RSS MiB: start {rss[0]:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f}")
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if rep.num_failed else 0


if __name__ == "__main__":
    sys.exit(main())
