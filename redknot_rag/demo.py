"""`redknot query` (one RAG question) and `redknot demo` (the quick start: ingest the sample corpus,
answer questions with KV reuse, and show the timing against full prefill on the same machine)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

DEMO_QUESTIONS = [
    "What does the del statement do?",
    "What does the global statement mean?",
    "Which values are considered false in a truth value test?",
]
DEMO_MAX_DOC_CHARS = 10_000  # keep the quick start's ingestion to ~10 s of CPU


def _cmd_query(args: argparse.Namespace) -> int:
    from redknot_rag.ingest_cli import require_store
    from redknot_rag.limits import MAX_QUESTION_CHARS, is_blank
    from redknot_rag.options import service_settings_from_args
    from redknot_rag.rag import run_query
    from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
    from redknot_rag.rag.factory import build_service

    if is_blank(args.question):
        raise ValueError("empty question (only whitespace, control or zero-width characters)")
    if len(args.question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question of {len(args.question)} chars exceeds the limit of {MAX_QUESTION_CHARS}")
    settings = service_settings_from_args(args, args.reuse_policy)  # a bad policy name fails here
    params = dataclasses.replace(QUERY_DEFAULTS, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    params.validate()
    require_store(args.data_dir, args.namespace)  # before the model loads; creates nothing
    rag = build_service(settings)
    res = run_query(
        rag,
        args.question,
        top_k=args.top_k,
        namespace=args.namespace,
        params=params,
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


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cmd_demo(args: argparse.Namespace) -> int:
    is_temp = args.data_dir is None
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="redknot-demo-"))
    args.data_dir = str(data_dir)
    try:
        return _run_demo(args, data_dir)
    finally:
        if is_temp and not args.keep:
            size = _dir_bytes(data_dir) / 2**20
            shutil.rmtree(data_dir, ignore_errors=True)
            print(
                f"\nremoved the demo's temporary data folder {data_dir} ({size:.0f} MiB); "
                "pass --data-dir DIR or --keep to keep it"
            )
        elif is_temp:
            print(
                f"\nthe demo's data stays in {data_dir} ({_dir_bytes(data_dir) / 2**20:.0f} MiB); "
                f"try `redknot query --data-dir {data_dir} QUESTION`"
            )


def _run_demo(args: argparse.Namespace, data_dir: Path) -> int:
    from importlib import resources

    from redknot_rag.options import service_settings_from_args
    from redknot_rag.rag import run_query
    from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
    from redknot_rag.rag.factory import build_service
    from redknot_rag.sampling import SamplingParams

    corpus = Path(str(resources.files("redknot_rag") / "data" / "sample_corpus.jsonl"))
    print("== loading the model and the embedder", flush=True)
    rag = build_service(service_settings_from_args(args))
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    docs = [d for d in docs if len(d["text"]) <= DEMO_MAX_DOC_CHARS]
    print(
        f"== ingest {len(docs)} documents of {corpus.name} into {data_dir}: parse, chunk, embed, then precompute "
        "each chunk's KV (stored per KV head); ~10-30 s on a CPU",
        flush=True,
    )
    s = rag.ingest_texts(docs, "default")
    print(
        f"   {s.documents} documents, {s.chunks} chunks, {s.tokens} tokens, {s.kv_bytes / 2**20:.1f} MiB KV "
        f"in {s.seconds:.1f} s ({s.tokens_per_s:.0f} tokens/s)"
    )
    params = dataclasses.replace(QUERY_DEFAULTS, max_new_tokens=args.max_new_tokens)
    rows = []
    for q in DEMO_QUESTIONS:
        t0 = time.perf_counter()
        sources = rag.retrieve(q, top_k=args.top_k)
        retrieve_ms = (time.perf_counter() - t0) * 1e3
        run_query(rag, q, reuse_policy="naive", sources=sources, params=SamplingParams(max_new_tokens=1))  # warm-up
        rag.flush_cache()  # the measured query loads its chunks' KV from the store, as a cold query does
        out = {}
        for pol in ("full", rag.default_policy):
            out[pol] = run_query(rag, q, reuse_policy=pol, sources=sources, params=params)
        full, reuse = out["full"], out[rag.default_policy]
        print(f"\nQ: {q}\n   sources: {', '.join(s.doc_id for s in sources)}")
        print(f"   [{rag.default_policy}] {reuse.answer.strip()[:200]}")
        print(f"   [full]    {full.answer.strip()[:200]}")
        t = reuse.timing
        print(
            f"   retrieve {retrieve_ms:.0f} ms, then TTFT {rag.default_policy}: {t['ttft_ms']:.0f} ms (KV load "
            f"{t.get('kv_load_ms', 0):.0f}, recompute {t.get('recompute_ms', 0):.0f}, question prefill "
            f"{t.get('question_prefill_ms', 0):.0f}) vs full prefill {full.timing['ttft_ms']:.0f} ms "
            f"-> {full.timing['ttft_ms'] / t['ttft_ms']:.1f}x; {reuse.usage['cached_tokens']} of "
            f"{reuse.usage['prompt_tokens']} prompt tokens reused"
        )
        rows.append(full.timing["ttft_ms"] / t["ttft_ms"])
    print(f"\nmean TTFT speed-up over full prefill on this machine: {sum(rows) / len(rows):.1f}x")
    return 0


def register_cli(sub) -> None:
    from redknot_rag.ingest_cli import HELP
    from redknot_rag.options import add_engine_args
    from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
    from redknot_rag.rag.factory import DEFAULT_DATA_DIR

    q = sub.add_parser(
        "query", help="answer one question from ingested documents (reuses stored KV)", formatter_class=HELP
    )
    q.add_argument("question")
    q.add_argument("--top-k", type=int, default=6, help="chunks retrieved into the prompt (1-64)")
    q.add_argument("--namespace", default="default", help="namespace to search")
    q.add_argument(
        "--reuse-policy",
        default=None,
        help="full, naive, epic[:k], cacheblend[:r], redknot[:r[:k[:w]]], redknot-local[:r[:k[:w]]], "
        "redknot-dense[:r[:k]] (default: the one `redknot serve` uses, measured for the model and recorded "
        "with its head profile)",
    )
    q.add_argument(
        "--max-new-tokens", type=int, default=QUERY_DEFAULTS.max_new_tokens, help="longest answer, in tokens"
    )
    q.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    q.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="where `redknot ingest` stored the documents")
    add_engine_args(q)
    q.set_defaults(func=_cmd_query)
    d = sub.add_parser(
        "demo", help="quick start: ingest the sample corpus and answer questions with reuse", formatter_class=HELP
    )
    d.add_argument("--data-dir", default=None, help="keep the data here (default: a temporary folder, removed after)")
    d.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    d.add_argument("--top-k", type=int, default=6, help="chunks retrieved into each prompt")
    d.add_argument(
        "--max-new-tokens", type=int, default=QUERY_DEFAULTS.max_new_tokens, help="longest answer, in tokens"
    )
    add_engine_args(d)
    d.set_defaults(func=_cmd_demo)
