"""Which `/query` decoding defaults end an answer without costing accuracy (issue 28, new user 5).

On the default model, greedy answers often repeat their sentence until the token limit. This script
answers the fidelity harness's cases (`evaluation.harness.build_cases`: planted facts and paraphrased
multi-fact cases) under the served default policy, greedy, once per candidate setting, on the same
stored chunk KV, and reports per setting: accuracy (the harness's check), the answers that ran to the
token limit, those that repeat a sentence, mean new tokens and decode seconds.

    python bench/query_defaults/run.py --cases 24 --out bench/query_defaults/results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from redknot_rag.evaluation.harness import build_cases
from redknot_rag.rag.factory import ServiceSettings, build_service
from redknot_rag.rag.service import Source, run_query
from redknot_rag.sampling import SamplingParams

SETTINGS = {  # name -> SamplingParams fields (greedy in all)
    "old: 128 tokens": dict(max_new_tokens=128),
    "128 + stop blank line": dict(max_new_tokens=128, stop=("\n\n",)),
    "128 + repetition 1.1": dict(max_new_tokens=128, repetition_penalty=1.1),
    "128 + stop blank line + repetition 1.1": dict(max_new_tokens=128, stop=("\n\n",), repetition_penalty=1.1),
}
_SENTENCE = re.compile(r"[^.!?\n]{8,}[.!?\n]")


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        "cpu",
    )
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def repeats_a_sentence(text: str) -> bool:
    seen: set[str] = set()
    for m in _SENTENCE.finditer(text):
        s = " ".join(m.group(0).split()).lower()
        if s in seen:
            return True
        seen.add(s)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/query_defaults/results_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="redknot-query-defaults-") as tmp:
        rag = build_service(ServiceSettings(data_dir=Path(tmp)))  # engine thread on, as `serve`
        policy = rag.default_policy
        cases = build_cases("all", args.cases, args.seed, rag.engine.tokenizer)
        rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for i, case in enumerate(cases):
            # the case's chunks in prompt order (`prepare` puts the first source last, next to the question)
            sources = [Source(f"c{j}", f"c{j}", 1.0, t, 0, len(t)) for j, t in enumerate(case.chunks)][::-1]
            for name, fields in SETTINGS.items():
                params = SamplingParams(**fields)
                t0 = time.perf_counter()
                res = run_query(rag, case.question, sources=sources, params=params, reuse_policy=policy)
                n = res.usage["completion_tokens"]
                rows[name].append(
                    {
                        "case": case.case_id,
                        "correct": bool(case.check(res.answer)),
                        "tokens": n,
                        "at_limit": n >= params.max_new_tokens,
                        "repeats": repeats_a_sentence(res.answer),
                        "seconds": time.perf_counter() - t0,
                        "finish": res.finish_reason,
                        "output": res.answer,
                    }
                )
            print(f"case {i + 1}/{len(cases)} done", file=sys.stderr, flush=True)
        rag.engine.shutdown()
        summary = {}
        for name, rs in rows.items():
            n = len(rs)
            summary[name] = {
                "params": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS[name].items()},
                "accuracy": sum(r["correct"] for r in rs) / n,
                "at_token_limit": sum(r["at_limit"] for r in rs) / n,
                "repeats_a_sentence": sum(r["repeats"] for r in rs) / n,
                "mean_new_tokens": sum(r["tokens"] for r in rs) / n,
                "mean_decode_s": sum(r["seconds"] for r in rs) / n,
            }
        base = rows["old: 128 tokens"]
        for name, rs in rows.items():  # paired: cases one setting gets right and the old default not, and back
            summary[name]["only_this_right"] = sum(r["correct"] and not b["correct"] for r, b in zip(rs, base))
            summary[name]["only_old_right"] = sum(b["correct"] and not r["correct"] for r, b in zip(rs, base))
        out = {
            "machine": machine(),
            "model": rag.engine.runner.name,
            "policy": policy,
            "cases": len(cases),
            "seed": args.seed,
            "summary": summary,
            "records": rows,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"machine": out["machine"], "policy": policy, "cases": len(cases), "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
