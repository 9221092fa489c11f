"""Load benchmark (#28 item 2): 32 concurrent clients of mixed `/query`, `/generate` and chat for 60 s
on the CPU and the default model, ~20% of them leaving mid-stream; p50/p99 time to first token (TTFT)
and inter-token latency (ITL) per kind.

It starts the server of the tree under test itself (`--tree`, default this checkout; the "before"
run points it at a git worktree of the commit before the change), on a free port, with its own data
folder holding a small corpus ingested through `/ingest`. Each client loops: pick a kind (query 40%,
generate 30%, chat 30%), stream it, record the arrival time of every streamed piece of text; with
probability `--disconnect` it closes the stream after its first 1-3 pieces. TTFT counts from sending
the request to the first text; ITL is every gap between two texts of one stream.

    python bench/load/streams.py --label after
    git worktree add /tmp/before <commit> && python bench/load/streams.py --tree /tmp/before --label before
    python bench/load/streams.py --plot
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from redknot_rag.ports import free_ports

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOPICS = [
    ("lighthouse", "The lighthouse on Varn Island was built in {y}. Its lamp burns whale oil and is lit at dusk."),
    ("archive", "The access code for the Dorbrecht archive is {n}. Visitors must sign the ledger first."),
    ("ferry", "The Mirdell ferry departs from pier {n} every morning at six, except on Sundays."),
    ("orchard", "The Halvik orchard grows {n} kinds of apple; the oldest tree was planted in {y}."),
    ("observatory", "The Kesh observatory telescope has a mirror of {n} centimetres, cast in {y}."),
    ("mill", "The Orrin water mill grinds {n} sacks of rye a day and was rebuilt in {y}."),
]
QUESTIONS = [
    "When was the lighthouse on Varn Island built?",
    "What is the access code for the Dorbrecht archive?",
    "From which pier does the Mirdell ferry depart?",
    "How many kinds of apple does the Halvik orchard grow?",
    "How large is the mirror of the Kesh observatory telescope?",
    "How many sacks does the Orrin water mill grind a day?",
]
MODEL = ["default"]  # the served model's id, read from /v1/models at start-up
PROMPTS = ["Once upon a time", "The capital of France is", "List three colours:", "def fibonacci(n):"]


def corpus(n_docs: int) -> list[dict]:
    rng = random.Random(7)
    docs = []
    for i in range(n_docs):
        name, fact = TOPICS[i % len(TOPICS)]
        filler = " ".join(
            f"Entry {j}: the {name} records mention {rng.choice(['rain', 'snow', 'wind', 'fog'])} "
            f"on day {rng.randrange(1, 365)} and a visit by {rng.randrange(2, 90)} travellers."
            for j in range(18)
        )
        text = fact.format(n=rng.randrange(10, 9999), y=rng.randrange(1700, 1999)) + " " + filler
        docs.append({"doc_id": f"{name}-{i}", "text": text})
    return docs


def start_server(tree: Path, data: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree), REDKNOT_LOG_LEVEL="warning")
    cmd = [sys.executable, "-m", "redknot_rag.cli", "serve", "--port", str(port), "--data-dir", str(data)]
    return subprocess.Popen(cmd, cwd=tree, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    async with httpx.AsyncClient() as c:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(base + "/health", timeout=5)).status_code == 200:
                    return
            await asyncio.sleep(1)
    raise TimeoutError("server did not start")


def _texts(kind: str, data: dict) -> str:
    """The text a streamed event adds (kind-specific SSE payloads)."""
    if kind == "query":
        return data.get("text", "") if data.get("type") == "token" else ""
    if kind == "chat":
        ch = data.get("choices") or [{}]
        return (ch[0].get("delta") or {}).get("content") or ""
    return data.get("text", "")  # /generate: cumulative text; any growth counts


async def one_request(c: httpx.AsyncClient, base: str, kind: str, rng: random.Random, leave: int | None) -> dict:
    if kind == "query":
        url, body = base + "/query", {"question": rng.choice(QUESTIONS), "max_new_tokens": 16, "stream": True}
    elif kind == "generate":
        body = {
            "text": rng.choice(PROMPTS),
            "stream": True,
            "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
        }
        url = base + "/generate"
    else:
        body = {
            "model": MODEL[0],
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
        url = base + "/v1/chat/completions"
    t0 = time.perf_counter()
    times: list[float] = []
    last = ""
    status = None
    try:
        async with c.stream("POST", url, json=body, timeout=600) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                text = _texts(kind, data)
                if kind == "generate":
                    grew, last = len(text) > len(last), text if len(text) > len(last) else last
                else:
                    grew = bool(text)
                if grew:
                    times.append(time.perf_counter())
                    if leave is not None and len(times) >= leave:
                        break  # the client leaves: closing the stream aborts the request
    except httpx.HTTPError as e:
        return {"kind": kind, "error": type(e).__name__, "t0": t0}
    out = {"kind": kind, "status": status, "t0": t0, "left": leave is not None, "n": len(times)}
    if times:
        out["ttft"] = times[0] - t0
        out["itl"] = [b - a for a, b in zip(times, times[1:])]
    return out


async def client(i: int, base: str, until: float, disconnect: float, results: list[dict]) -> None:
    rng = random.Random(1000 + i)
    async with httpx.AsyncClient() as c:
        while time.perf_counter() < until:
            kind = rng.choices(["query", "generate", "chat"], [0.4, 0.3, 0.3])[0]
            leave = rng.randint(1, 3) if rng.random() < disconnect else None
            results.append(await one_request(c, base, kind, rng, leave))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def summarize(results: list[dict]) -> dict:
    out = {}
    for kind in ("query", "generate", "chat"):
        rs = [r for r in results if r["kind"] == kind]
        ttft = [r["ttft"] for r in rs if "ttft" in r]
        itl = [g for r in rs for g in r.get("itl", [])]
        out[kind] = {
            "requests": len(rs),
            "errors": sum(1 for r in rs if "error" in r or (r.get("status") or 200) >= 400),
            "left_early": sum(1 for r in rs if r.get("left")),
            "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5),
            "itl_p99_s": pct(itl, 0.99),
            "itl_max_s": round(max(itl), 4) if itl else None,
            "itl_samples": len(itl),
        }
    return out


async def bench(args) -> dict:
    tree = Path(args.tree).resolve()
    with tempfile.TemporaryDirectory(prefix="redknot-load-") as tmp:
        data, port = Path(tmp) / "data", free_ports(1)[0]
        base = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        proc = start_server(tree, data, port, log)
        try:
            await wait_ready(base, proc)
            async with httpx.AsyncClient() as c:
                r = await c.post(base + "/ingest", json={"documents": corpus(args.docs)}, timeout=1200)
                r.raise_for_status()
                MODEL[0] = (await c.get(base + "/v1/models")).json()["data"][0]["id"]
                for q in QUESTIONS[:2]:  # warm-up: a query and a generate
                    await c.post(base + "/query", json={"question": q, "max_new_tokens": 4}, timeout=600)
                await c.post(base + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4}})
            results: list[dict] = []
            t0 = time.perf_counter()
            until = t0 + args.duration
            await asyncio.gather(*(client(i, base, until, args.disconnect, results) for i in range(args.clients)))
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            if proc.poll() is None:
                proc.kill()
        git = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return {
            "label": args.label,
            "tree": str(tree),
            "commit": git.stdout.strip(),
            "dirty_tree": bool(
                subprocess.run(
                    ["git", "-C", str(tree), "status", "--porcelain", "-uno"], capture_output=True, text=True
                ).stdout.strip()
            ),
            "clients": args.clients,
            "duration_s": args.duration,
            "wall_s": round(wall, 1),
            "disconnect": args.disconnect,
            "docs": args.docs,
            "machine": f"CPU ({platform.machine()}), {os.cpu_count()} cores, shared with other jobs",
            "load_avg_after": os.getloadavg(),
            "kinds": summarize(results),
        }


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    labels = [k for k in ("before", "after") if k in data]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ttft", "itl")):
        width = 0.8 / max(len(labels) * 2, 1)
        for j, label in enumerate(labels):
            kinds = data[label]["kinds"]
            for k, q in enumerate(("p50", "p99")):
                xs = [i + (2 * j + k) * width for i in range(3)]
                ys = [kinds[kind][f"{metric}_{q}_s"] or 0 for kind in ("query", "generate", "chat")]
                ax.bar(xs, ys, width, label=f"{label} {q}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(3)], ["/query", "/generate", "chat"])
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title(f"{metric.upper()} under 32 clients (CPU, 2 cores)")
        ax.legend(fontsize=7)
    if "generate" in (data.get("after") or {}).get("kinds", {}):
        axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=str(REPO))
    ap.add_argument("--label", default="after")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--disconnect", type=float, default=0.2)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--out", default=str(HERE / "streams_cpu.json"))
    ap.add_argument("--plot", action="store_true", help="only draw results.png from the JSON")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.plot:
        res = asyncio.run(bench(args))
        data = json.loads(out.read_text()) if out.exists() else {}
        data[args.label] = res
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(json.dumps(res, indent=2))
    plot(out)


if __name__ == "__main__":
    main()
