"""Ingest throughput against the model's own prefill rate, in one run on one engine (issue 28, new user 1).

`redknot ingest` computes every chunk's KV with the model, so the model's prefill rate bounds it. This
script builds the service the way `redknot ingest` does (`rag.factory.build_service`, engine thread on),
ingests the packaged sample corpus into a temporary folder, then, on the same engine, times plain
prefills of `--prompt-tokens` tokens (a request with one new token: its TTFT). Written: the ingest's
tokens/s end to end (parse, chunk, embed, index, KV prefill, store writes), the prefill tokens/s, their
ratio (goal >= 0.8) and the machine.

    python bench/ingest/run.py --out bench/ingest/results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from redknot_rag.rag.factory import ServiceSettings, build_service
from redknot_rag.sampling import SamplingParams


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def prefill_rate(engine, tokens: int, repeats: int) -> dict:
    """Median tokens/s of a plain `tokens`-token prefill (TTFT of a request with one new token)."""
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(repeats):
        ids = torch.randint(100, vocab - 1, (tokens,), generator=g).tolist()
        req = engine.make_request(ids, SamplingParams(max_new_tokens=1))
        t0 = time.perf_counter()
        engine.submit(req)
        req.done.wait()
        rates.append(tokens / (time.perf_counter() - t0))
    return {"prompt_tokens": tokens, "repeats": repeats, "tokens_per_s": statistics.median(rates), "all": rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=12, help="documents of the sample corpus to ingest")
    ap.add_argument("--max-doc-chars", type=int, default=10_000, help="skip longer sample documents")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/ingest/results_cpu.json"))
    args = ap.parse_args()

    corpus = Path(str(resources.files("redknot_rag") / "data" / "sample_corpus.jsonl"))
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    docs = [d for d in docs if len(d["text"]) <= args.max_doc_chars][: args.docs]
    with tempfile.TemporaryDirectory(prefix="redknot-ingest-bench-") as tmp:
        t_load = time.perf_counter()
        rag = build_service(ServiceSettings(data_dir=Path(tmp)))
        load_s = time.perf_counter() - t_load
        engine = rag.engine
        prefill_before = prefill_rate(engine, args.prompt_tokens, args.repeats)  # also warms the forward
        s = rag.ingest_texts(docs, "bench")
        prefill_after = prefill_rate(engine, args.prompt_tokens, args.repeats)
        engine.shutdown()
    prefill = statistics.mean([prefill_before["tokens_per_s"], prefill_after["tokens_per_s"]])
    out = {
        "machine": machine(),
        "model": engine.runner.name,
        "dtype": str(engine.runner.dtype).replace("torch.", ""),
        "load_s": round(load_s, 1),
        "ingest": {
            "documents": s.documents,
            "chunks": s.chunks,
            "tokens": s.tokens,
            "seconds": round(s.seconds, 2),
            "tokens_per_s": round(s.tokens_per_s, 1),
            "kv_bytes_per_token": round(s.kv_bytes / s.tokens, 1) if s.tokens else 0,
        },
        "prefill_before": prefill_before,
        "prefill_after": prefill_after,
        "prefill_tokens_per_s": round(prefill, 1),
        "ingest_over_prefill": round(s.tokens_per_s / prefill, 3),
        "goal": ">= 0.8",
        "note": "same process, same engine; the machine is shared with other jobs, so both rates are noisy",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
