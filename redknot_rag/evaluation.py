"""Fidelity harness: every reuse policy against `full` on planted-fact RAG questions (`redknot eval`).

Per case: 6 chunks of real text (Python's own help topics), one holding a planted fact, in a seeded
order; the question asks for the fact. Per policy we measure accuracy (answer string in the greedy
output), first-token KL(full || policy), greedy-token agreement with `full` over the first 32 tokens,
and TTFT split into load / recompute / question prefill (each request measured alone).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_POLICIES = (
    "full",
    "naive",
    "epic:16",
    "epic:64",
    "cacheblend:0.15",
    "redknot:0.1",
    "redknot:0.2",
    "redknot:0.3",
)


@dataclass
class PolicyStats:
    correct: int = 0
    kl: float = 0.0
    agree: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    load_ms: float = 0.0
    recompute_ms: float = 0.0
    question_ms: float = 0.0
    recomputed_tokens: int = 0
    context_tokens: int = 0

    def row(self, n: int) -> dict:
        t = sorted(self.ttft_ms)
        return {
            "accuracy": self.correct / n,
            "first_token_kl": self.kl / n,
            "agreement_32": self.agree / n,
            "ttft_ms_mean": sum(t) / n,
            "ttft_ms_p50": t[n // 2],
            "load_ms": self.load_ms / n,
            "recompute_ms": self.recompute_ms / n,
            "question_prefill_ms": self.question_ms / n,
            "recompute_fraction": self.recomputed_tokens / max(self.context_tokens, 1),
        }


def build_cases(rag, n: int, seed: int, num_chunks: int = 6, chunk_tokens: int = 220):
    """[(case, chunk token ids (fact chunk included, shuffled))] from planted-fact cases."""
    from redknot_rag.retrieval.chunker import Chunker
    from redknot_rag.retrieval.planted_facts import make_planted_cases

    chunker = Chunker(rag.engine.tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=0)
    rng = random.Random(seed)
    out = []
    for case in make_planted_cases(n, seed=seed, num_distractors=num_chunks - 1):
        fact_chunk, others = None, []
        for d in case.docs:
            for c in chunker.chunk(d):
                if fact_chunk is None and case.fact_sentence in c.text:
                    fact_chunk = c.text
                else:
                    others.append(c.text)
        if fact_chunk is None:
            continue  # the chunker split the fact sentence; skip the case (rare)
        texts = [fact_chunk] + others[: num_chunks - 1]
        rng.shuffle(texts)
        out.append((case, [rag.chunk_token_ids(t) for t in texts]))
    return out


def run_eval(
    rag,
    policies=DEFAULT_POLICIES,
    n: int = 100,
    seed: int = 0,
    max_new_tokens: int = 32,
    progress: bool = True,
    on_case=None,
) -> dict:
    from tqdm import tqdm

    from redknot_rag.rag.assemble import Timing
    from redknot_rag.rag.layout import chunk_key
    from redknot_rag.sampling import SamplingParams

    e = rag.engine
    prefiller = rag.assembler.prefiller
    cases = build_cases(rag, n, seed)
    stats = {p: PolicyStats() for p in policies}
    params = SamplingParams(max_new_tokens=max_new_tokens)
    done = 0
    for case, chunks in tqdm(cases, desc="eval", disable=not progress):
        fresh = [c for c in chunks if not rag.store.contains(chunk_key(c))]
        if fresh:  # ingestion: chunk KV computed once, stored per head
            for c, (k, v) in zip(fresh, e.call(lambda f=fresh: prefiller.prefill(f))):
                rag.store.put(chunk_key(c), k.cpu(), v.cpu())
        q = rag.question_ids(case.question)
        reqs = {}
        first: dict[str, torch.Tensor] = {}
        for pol in policies:
            rag.flush_cache()  # every policy loads chunk KV from the store tier
            timing = Timing()
            t0 = time.perf_counter()
            req = rag.assembler.build(chunks, q, pol, params, timing)
            req.logits_processor = _keep_first(first, pol)
            req.arrival_time = t0
            t_sub = time.perf_counter()
            e.submit(req)
            while req.first_token_time is None and not req.is_finished:
                e.step(only={req.rid})
            s = stats[pol]
            s.ttft_ms.append((req.first_token_time - t0) * 1e3)
            s.load_ms += timing.kv_load_ms
            s.recompute_ms += timing.recompute_ms
            s.question_ms += (req.first_token_time - t_sub) * 1e3
            s.recomputed_tokens += req.reuse.recomputed_tokens if req.reuse is not None else sum(map(len, chunks))
            s.context_tokens += sum(map(len, chunks))
            reqs[pol] = req
        while any(not r.is_finished for r in reqs.values()):
            e.step()
        ref = reqs["full"]
        ref_lp = first["full"].log_softmax(-1)
        for pol, r in reqs.items():
            s = stats[pol]
            s.correct += case.answer.lower() in r.output_text.lower()
            s.kl += float((ref_lp.exp() * (ref_lp - first[pol].log_softmax(-1))).sum())
            k = min(32, len(ref.output_ids))
            s.agree += sum(a == b for a, b in zip(ref.output_ids[:k], r.output_ids[:k])) / max(k, 1)
        done += 1
        if on_case is not None:
            on_case(_summary(e, stats, done, seed, max_new_tokens))
    return _summary(e, stats, done, seed, max_new_tokens)


def _keep_first(into: dict, name: str):
    """A logits observer that records the first sampled position's logits `[vocab]` under `name`."""

    def observe(req, logits):
        into.setdefault(name, logits.clone())
        return logits

    return observe


def _summary(e, stats: dict[str, PolicyStats], n_eval: int, seed: int, max_new_tokens: int) -> dict:
    return {
        "cases": n_eval,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "model": e.runner.name,
        "device": str(e.runner.device),
        "chunks_per_case": 6,
        "policies": {p: s.row(n_eval) for p, s in stats.items()},
    }


def plot_tradeoff(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = result["policies"]
    full_ttft = pol["full"]["ttft_ms_mean"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, r in pol.items():
        speed = full_ttft / r["ttft_ms_mean"]
        axes[0].scatter(r["recompute_fraction"], r["accuracy"], s=40)
        axes[0].annotate(name, (r["recompute_fraction"], r["accuracy"]), fontsize=8)
        axes[1].scatter(speed, r["accuracy"], s=40)
        axes[1].annotate(f"{name} (KL {r['first_token_kl']:.2f})", (speed, r["accuracy"]), fontsize=8)
    axes[0].set_xlabel("recomputed fraction of context tokens")
    axes[0].set_ylabel("answer accuracy")
    axes[1].set_xlabel("TTFT speed-up over full prefill (x)")
    axes[1].set_xscale("log")
    axes[1].axhline(pol["full"]["accuracy"] - 0.02, ls="--", c="gray", lw=1)
    axes[1].axvline(5, ls="--", c="gray", lw=1)
    fig.suptitle(f"{result['model']} on {result['device']}: {result['cases']} planted-fact cases, 6 chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(result: dict) -> str:
    full = result["policies"]["full"]["ttft_ms_mean"]
    lines = [
        "| policy | accuracy | first-token KL | agreement@32 | TTFT ms | speed-up | load | recompute | "
        "question | recomputed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["policies"].items():
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['first_token_kl']:.3f} | {r['agreement_32']:.3f} | "
            f"{r['ttft_ms_mean']:.0f} | {full / r['ttft_ms_mean']:.1f}x | {r['load_ms']:.0f} | "
            f"{r['recompute_ms']:.0f} | {r['question_prefill_ms']:.0f} | {r['recompute_fraction']:.1%} |"
        )
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    from redknot_rag.ingest import open_service

    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="redknot-eval-")
    rag = open_service(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:  # after every case, so an interrupted run still reports
        (out / "results_cpu.json").write_text(json.dumps(partial, indent=1))

    res = run_eval(rag, tuple(args.policies.split(",")), n=args.cases, seed=args.seed, on_case=save)
    save(res)
    plot_tradeoff(res, out / "tradeoff_cpu.png")
    table = format_table(res)
    (out / "table_cpu.md").write_text(table + "\n")
    print(table)
    return 0


def register_cli(sub) -> None:
    from redknot_rag.options import add_engine_args

    p = sub.add_parser("eval", help="fidelity of every reuse policy against full prefill (planted facts)")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--out", default="bench/reuse")
    p.add_argument("--data-dir", default=None)
    add_engine_args(p)
    p.set_defaults(func=_cmd_eval)
