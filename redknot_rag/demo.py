"""`redknot query` (one RAG question) and `redknot demo` (the quick start: ingest the sample corpus,
answer questions with KV reuse, and show the timing against full prefill on the same machine)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DEMO_QUESTIONS = [
    "What does the del statement do?",
    "What does the global statement mean?",
    "Which values are considered false in a truth value test?",
]
DEMO_MAX_DOC_CHARS = 10_000  # keep the quick start's ingestion to ~10 s of CPU


def _cmd_query(args: argparse.Namespace) -> int:
    from redknot_rag.ingest import open_service
    from redknot_rag.rag import run_query
    from redknot_rag.sampling import SamplingParams

    rag = open_service(args, args.reuse_policy)
    res = run_query(
        rag,
        args.question,
        top_k=args.top_k,
        namespace=args.namespace,
        params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
    )
    print(res.answer)
    print(
        json.dumps(
            {
                "sources": [
                    {"doc_id": s.doc_id, "chunk_id": s.chunk_id, "score": round(s.score, 3)} for s in res.sources
                ],
                "usage": res.usage,
                "timing_ms": res.timing,
            },
            indent=2,
        )
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    from redknot_rag.ingest import open_service
    from redknot_rag.rag import run_query
    from redknot_rag.sampling import SamplingParams

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="redknot-demo-"))
    args.data_dir = str(data_dir)
    corpus = Path(str(resources.files("redknot_rag") / "data" / "sample_corpus.jsonl"))
    rag = open_service(args)
    print(f"== ingest {corpus.name} into {data_dir} (chunk KV precompute, stored per KV head)")
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    docs = [d for d in docs if len(d["text"]) <= DEMO_MAX_DOC_CHARS]
    s = rag.ingest_texts(docs, "default")
    print(
        f"   {s.documents} documents, {s.chunks} chunks, {s.tokens} tokens, {s.kv_bytes / 2**20:.1f} MiB KV "
        f"in {s.seconds:.1f} s ({s.tokens_per_s:.0f} tokens/s)"
    )
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    rows = []
    for q in DEMO_QUESTIONS:
        sources = rag.retrieve(q, top_k=args.top_k)
        run_query(rag, q, reuse_policy="naive", sources=sources, params=SamplingParams(max_new_tokens=1))  # warm cache
        out = {}
        for pol in ("full", rag.default_policy):
            r = run_query(rag, q, reuse_policy=pol, sources=sources, params=params)
            out[pol] = r
        full, reuse = out["full"], out[rag.default_policy]
        print(f"\nQ: {q}\n   sources: {', '.join(s.doc_id for s in sources)}")
        print(f"   [{rag.default_policy}] {reuse.answer.strip()[:200]}")
        print(f"   [full]    {full.answer.strip()[:200]}")
        t = reuse.timing
        print(
            f"   TTFT {rag.default_policy}: {t['ttft_ms']:.0f} ms (retrieve {t['retrieve_ms']:.0f}, load "
            f"{t['kv_load_ms']:.0f}, recompute {t['recompute_ms']:.0f}, question prefill "
            f"{t['question_prefill_ms']:.0f}) vs full prefill {full.timing['ttft_ms']:.0f} ms "
            f"-> {full.timing['ttft_ms'] / t['ttft_ms']:.1f}x; {reuse.usage['cached_tokens']} of "
            f"{reuse.usage['prompt_tokens']} prompt tokens reused"
        )
        rows.append(full.timing["ttft_ms"] / t["ttft_ms"])
    print(f"\nmean TTFT speed-up over full prefill on this machine: {sum(rows) / len(rows):.1f}x")
    return 0


def register_cli(sub) -> None:
    from redknot_rag.ingest import DEFAULT_DATA_DIR
    from redknot_rag.options import add_engine_args

    q = sub.add_parser("query", help="answer one question from ingested documents (reuses stored KV)")
    q.add_argument("question")
    q.add_argument("--top-k", type=int, default=6)
    q.add_argument("--namespace", default="default")
    q.add_argument("--reuse-policy", default=None, help="full, naive, epic[:k], cacheblend[:r], redknot[:r]")
    q.add_argument("--max-new-tokens", type=int, default=64)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    add_engine_args(q)
    q.set_defaults(func=_cmd_query)
    d = sub.add_parser("demo", help="quick start: ingest the sample corpus and answer questions with reuse")
    d.add_argument("--data-dir", default=None, help="default: a fresh temporary folder")
    d.add_argument("--top-k", type=int, default=6)
    d.add_argument("--max-new-tokens", type=int, default=48)
    add_engine_args(d)
    d.set_defaults(func=_cmd_demo)
