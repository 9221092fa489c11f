"""Fidelity harness: every reuse policy against `full` on the same RAG questions (`redknot eval`).

Two case generators with different phrasing: `planted` (one planted fact in real help-topic text, 6
chunks) and `facts` (numbers/dates, two facts that must both be used, the fact in the first or last
chunk, 4/8/12 chunks, decoys; `redknot_rag/evaluation/fact_cases.py`). Every policy answers every case, so
differences to `full` are paired: per policy we report accuracy with a paired-bootstrap 95% interval and
the exact McNemar p-value on the difference, first-token KL(full || policy), greedy agreement@32 with
`full`, the recomputed fraction of chunk tokens and the median TTFT speed-up (each request's first token
measured alone), per generator and pooled. Per-case records are written as JSONL while the run goes,
so an interrupted run still reports.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_POLICIES = (
    "full",
    "naive",
    "cacheblend:0.1",
    "redknot:0.05",
    "redknot-dense:0.05",
    "redknot:0.05:4:64:6",
)
QUICK_POLICIES = ("full", "naive", "redknot:0.1")
SETS = ("planted", "facts")
MAX_RECOMPUTE = 0.10  # the GPU path needs the budget small (issue 10)
MIN_SPEEDUP_CPU = 5.0
MAX_ACCURACY_LOSS = 0.02  # the default rule: within 2 points of full ...
MAX_CI_LOSS = 0.04  # ... with the paired CI's lower end above -4 points
FRONTIER_BUDGETS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# frontier families: a policy name per budget, whose recomputed fraction is that budget
FRONTIER_FAMILIES = {
    "redknot": "redknot:{b}:0",  # the question probe's top tokens (global heads), no fixed head tokens
    "cacheblend": "cacheblend:{b}",
    "epic": "epic-frac:{b}",  # EPIC's first-k with k scaled to the budget per chunk
    "redknot-chunks": "redknot-chunks:{b}",  # whole chunks by the probe's ranking
    "redknot-dense": "redknot-dense:{b}:0",  # the probe over every head
    "oracle-select": "oracle:select:{b}",  # the ceiling of token selection (bench only)
}
# oracles that are not budget sweeps
STRUCTURE_ORACLES = (
    "oracle:answer-chunk",
    "oracle:other-chunks",
    "oracle:first:full",
    "oracle:last:full",
    "oracle:first:naive",
    "oracle:last:naive",
)


@dataclass(frozen=True)
class EvalCase:
    """One question over chunk texts in prompt order; `check(output)` says whether the answer is right."""

    case_id: str
    set_name: str
    question: str
    chunks: tuple[str, ...]
    check: Callable[[str], bool]
    answer_chunks: tuple[int, ...] = ()  # indices into `chunks` of the chunks holding the needed facts


@dataclass(frozen=True)
class Record:
    """One (case, policy) outcome."""

    case_id: str
    set_name: str
    policy: str
    correct: bool
    first_token_kl: float
    agreement_32: float
    recomputed_tokens: int
    chunk_tokens: int
    ttft_ms: float
    load_ms: float
    recompute_ms: float
    output: str


def planted_cases(n: int, seed: int, tokenizer, num_chunks: int = 4, chunk_tokens: int = 112) -> list[EvalCase]:
    """Planted-fact cases: the fact's chunk and `num_chunks - 1` others, in a seeded order."""
    from redknot_rag.evaluation.planted_facts import make_planted_cases
    from redknot_rag.retrieval.chunker import Chunker

    chunker = Chunker(tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=0)
    rng = random.Random(seed)
    out: list[EvalCase] = []
    for case in make_planted_cases(2 * n + 8, seed=seed, num_distractors=num_chunks - 1):
        fact_chunk, others = None, []
        for d in case.docs:
            for c in chunker.chunk(d):
                if fact_chunk is None and case.fact_sentence in c.text:
                    fact_chunk = c.text
                else:
                    others.append(c.text)
        if fact_chunk is None or len(others) < num_chunks - 1:
            continue  # the chunker split the fact sentence (rare)
        texts = [fact_chunk] + others[: num_chunks - 1]
        order = list(range(len(texts)))
        rng.shuffle(order)  # the permutation `rng.shuffle(texts)` made before, so the cases stay the same
        texts = [texts[i] for i in order]
        answer = case.answer.lower()
        out.append(EvalCase(case.case_id, "planted", case.question, tuple(texts), _contains(answer), (order.index(0),)))
        if len(out) == n:
            break
    return out


def _contains(answer: str) -> Callable[[str], bool]:
    return lambda text: answer in text.lower()


def fact_cases(n: int, seed: int) -> list[EvalCase]:
    """The second generator (numbers/dates, two facts, first/last chunk, 4/8/12 chunks, decoys)."""
    from redknot_rag.evaluation.fact_cases import make_fact_cases

    return [
        EvalCase(c.case_id, "facts", c.question, tuple(c.chunks), c.is_correct, tuple(c.fact_chunks))
        for c in make_fact_cases(n, seed=seed, sizes=(4, 6, 8), min_chars=200, max_chars=400)
    ]


def build_cases(set_name: str, n: int, seed: int, tokenizer) -> list[EvalCase]:
    """`n` cases of one set, or of both (`all`: half each, interleaved)."""
    if set_name == "planted":
        return planted_cases(n, seed, tokenizer)
    if set_name == "facts":
        return fact_cases(n, seed)
    if set_name == "all":
        a, b = planted_cases(n - n // 2, seed, tokenizer), fact_cases(n // 2, seed)
        return [c for pair in zip(a, b) for c in pair] + a[len(b) :]
    raise ValueError(f"unknown case set {set_name!r}; known: {', '.join(SETS)}, all")


def _keep_first(into: dict, name: str):
    """A logits observer that records the first sampled position's logits `[vocab]` under `name`."""

    def observe(req, logits):
        into.setdefault(name, logits.clone())
        return logits

    return observe


def run_case(rag, case: EvalCase, policies: Sequence[str], max_new_tokens: int = 32) -> list[Record]:
    """Every policy on one case: TTFT of each request measured alone, then all decoded together."""
    from redknot_rag.evaluation.paired_stats import agreement_at_k, first_token_kl
    from redknot_rag.evaluation.reuse_oracles import is_oracle, oracle_arm
    from redknot_rag.rag.assemble import Timing
    from redknot_rag.rag.layout import chunk_key
    from redknot_rag.sampling import SamplingParams

    e = rag.engine
    layout = rag.layout
    chunks = [layout.chunk_ids(t) for t in case.chunks]
    fresh = [c for c in chunks if not rag.store.contains(chunk_key(c))]
    if fresh:  # ingestion: chunk KV computed once, stored per head
        for c, (k, v) in zip(fresh, rag.assembler.prefiller.prefill(fresh)):
            rag.store.put(chunk_key(c), k.cpu(), v.cpu())
    q = layout.question_ids(case.question)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    reqs: dict = {}
    timings: dict = {}
    ttft: dict[str, float] = {}
    first: dict[str, torch.Tensor] = {}
    select_cache: dict = {}  # the oracle selector's ranking of this case, shared by its budgets
    for pol in policies:
        rag.flush_cache()  # every policy loads chunk KV from the store tier
        timing = Timing()
        order, name, obj = chunks, pol, None
        if is_oracle(pol):  # bench only: built here per case, never by name through the assembler
            arm = oracle_arm(pol, len(chunks), case.answer_chunks, select_cache)
            order = [chunks[i] for i in arm.order]
            if isinstance(arm.policy, str):
                name = arm.policy  # a served policy over reordered chunks
            else:
                obj = arm.policy
        t0 = time.perf_counter()
        req = rag.assembler.build(order, q, name, params, timing, policy_obj=obj)
        req.logits_processor = _keep_first(first, pol)
        req.arrival_time = t0
        e.submit(req)
        steps = 0
        while req.first_token_time is None and not req.is_finished:
            e.step(only={req.rid})
            steps += 1
            # every prefill step that gets pages makes progress; one that never finishes is waiting for pages
            # the other policies' requests hold until their shared decode (seen with 21 policies, 1 GiB)
            if steps > len(req.prompt_ids) + 64:
                raise RuntimeError(
                    f"{pol} on case {case.case_id}: no first token after {steps} steps; the KV pool cannot hold "
                    f"{len(policies)} policies' requests at once (raise --cpu-kv-gib)"
                )
        if req.error:
            raise RuntimeError(f"{pol} failed on case {case.case_id}: {req.error}")
        ttft[pol] = (req.first_token_time - t0) * 1e3
        reqs[pol], timings[pol] = req, timing
    while any(not r.is_finished for r in reqs.values()):
        e.step()
    ref = reqs["full"]
    n_chunk = sum(map(len, chunks))
    out = []
    for pol, r in reqs.items():
        recomputed = r.reuse.recomputed_tokens if r.reuse is not None else n_chunk
        out.append(
            Record(
                case.case_id,
                case.set_name,
                pol,
                bool(case.check(r.output_text)),
                first_token_kl(first["full"], first[pol]),
                agreement_at_k(ref.output_ids, r.output_ids, 32),
                recomputed,
                n_chunk,
                ttft[pol],
                timings[pol].kv_load_ms,
                timings[pol].recompute_ms,
                r.output_text,
            )
        )
    return out


def summarize(records: Sequence[Record], reference: str = "full") -> dict:
    """Per policy: accuracy, paired difference to `reference` with its bootstrap 95% CI and McNemar p,
    mean first-token KL, agreement@32, recomputed fraction, median TTFT and median speed-up."""
    from redknot_rag.evaluation.paired_stats import compare_paired

    by: dict[str, dict[str, Record]] = {}
    for r in records:
        by.setdefault(r.policy, {})[r.case_id] = r
    ref = by[reference]
    out: dict[str, dict] = {}
    for pol, recs in by.items():
        ids = [cid for cid in ref if cid in recs]
        a = [ref[i].correct for i in ids]
        b = [recs[i].correct for i in ids]
        cmp = compare_paired(a, b)
        out[pol] = {
            "num_cases": len(ids),
            "accuracy": cmp.accuracy_b,
            "accuracy_diff": cmp.accuracy_diff,
            "accuracy_diff_ci95": [round(cmp.ci95[0], 4), round(cmp.ci95[1], 4)],
            "mcnemar_p": cmp.mcnemar_p,
            "first_token_kl": statistics.fmean(recs[i].first_token_kl for i in ids),
            "agreement_32": statistics.fmean(recs[i].agreement_32 for i in ids),
            "recompute_fraction": sum(recs[i].recomputed_tokens for i in ids)
            / max(sum(recs[i].chunk_tokens for i in ids), 1),
            "ttft_ms_median": statistics.median(recs[i].ttft_ms for i in ids),
            "speedup_median": statistics.median(ref[i].ttft_ms / max(recs[i].ttft_ms, 1e-9) for i in ids),
            "load_ms_median": statistics.median(recs[i].load_ms for i in ids),
            "recompute_ms_median": statistics.median(recs[i].recompute_ms for i in ids),
        }
    return out


@dataclass(frozen=True)
class DefaultChoice:
    """What the default rule found: `policy` qualifies (None: nothing measured does), `closest` is the
    qualifying policy or, failing that, the one that misses the rule by least; `shortfall` is that miss
    in accuracy points (0 for a qualifying policy)."""

    policy: str | None
    closest: str | None
    shortfall: float
    rule: str = (
        "smallest recompute fraction whose accuracy is within 2 points of full, with the paired 95% CI's "
        "lower end above -4 points, and not below naive's accuracy"
    )

    @property
    def is_qualified(self) -> bool:
        return self.policy is not None


def _shortfall(p: dict, naive_diff: float) -> float:
    """How far a policy misses the default rule, in accuracy (0: it qualifies)."""
    return (
        max(0.0, -MAX_ACCURACY_LOSS - p["accuracy_diff"])
        + max(0.0, -MAX_CI_LOSS - p["accuracy_diff_ci95"][0] + 1e-9)
        + max(0.0, naive_diff - p["accuracy_diff"])
    )


def choose_default(policies: dict[str, dict]) -> DefaultChoice:
    """The default rule over measured reuse policies (not `full`, not oracles, not frontier endpoints that
    are naive or full by construction): the smallest recomputed fraction within 2 points of full whose CI
    lower end is above -4 points and that is not worse than naive; ties by accuracy, then first-token KL.
    Finds nothing when nothing qualifies: then `closest` names the policy that misses by least."""
    from redknot_rag.evaluation.reuse_oracles import is_oracle

    cands = {n: p for n, p in policies.items() if n != "full" and not is_oracle(n) and "alias_of" not in p}
    if not cands:
        return DefaultChoice(None, None, float("inf"))
    naive_diff = policies["naive"]["accuracy_diff"] if "naive" in policies else -1.0
    miss = {n: _shortfall(p, naive_diff) for n, p in cands.items()}
    ok = [n for n in cands if miss[n] == 0.0]
    if ok:
        best = min(
            ok,
            key=lambda n: (
                round(cands[n]["recompute_fraction"], 6),
                -cands[n]["accuracy_diff"],
                cands[n]["first_token_kl"],
            ),
        )
        return DefaultChoice(best, best, 0.0)
    near = min(cands, key=lambda n: (round(miss[n], 6), cands[n]["recompute_fraction"]))
    return DefaultChoice(None, near, miss[near])


def goals(p: dict, min_speedup: float) -> dict[str, bool]:
    """The fidelity issue's goals for the default policy, each checked."""
    return {
        "accuracy_within_2_points": p["accuracy_diff"] >= -0.02,
        "ci_lower_above_minus_4": p["accuracy_diff_ci95"][0] > -0.04,
        "kl_at_most_0.05": p["first_token_kl"] <= 0.05,
        "agreement_32_at_least_0.85": p["agreement_32"] >= 0.85,
        "speedup_floor": p["speedup_median"] >= min_speedup,
        "recompute_at_most_10pct": p["recompute_fraction"] <= MAX_RECOMPUTE + 1e-9,
    }


def frontier_policies(families: Sequence[str], budgets: Sequence[float] = FRONTIER_BUDGETS) -> list[str]:
    """Policy names of the frontier families at `budgets` (0 and 1 left out: naive and full by construction,
    `frontier_aliases` fills them in)."""
    out = []
    for fam in families:
        if fam not in FRONTIER_FAMILIES:
            raise ValueError(f"unknown frontier family {fam!r}; known: {', '.join(FRONTIER_FAMILIES)}")
        out += [FRONTIER_FAMILIES[fam].format(b=b) for b in budgets if 0.0 < b < 1.0]
    return out


def frontier_aliases(policies: dict[str, dict], families: Sequence[str]) -> dict[str, dict]:
    """The 0% and 100% points of each family: at 0 a family selects nothing (= naive), at 1 it recomputes
    every chunk token in order (= full prefill); `tests/test_frontier.py` checks both. Marked `alias_of`."""
    out: dict[str, dict] = {}
    for fam in families:
        for b, ref in ((0.0, "naive"), (1.0, "full")):
            name = FRONTIER_FAMILIES[fam].format(b=b)
            if name not in policies and ref in policies:
                out[name] = {**policies[ref], "alias_of": ref}
    return out


def split_oracles(pooled: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    from redknot_rag.evaluation.reuse_oracles import is_oracle

    return {n: p for n, p in pooled.items() if not is_oracle(n)}, {n: p for n, p in pooled.items() if is_oracle(n)}


def family_of(name: str) -> str | None:
    for fam, pattern in FRONTIER_FAMILIES.items():
        head, _, tail = pattern.partition("{b}")
        if name.startswith(head) and name.endswith(tail) and _is_number(name[len(head) : len(name) - len(tail)]):
            return fam
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def report(records: Sequence[Record], meta: dict, families: Sequence[str] = ()) -> dict:
    """The results JSON: pooled and per generator (served policies under `policies`, oracles under
    `oracles`, the 0 and 1 endpoints of every frontier family measured or named in `families` filled in),
    and the default rule's choice, which may be none."""
    pooled = summarize(records)
    sets = sorted({r.set_name for r in records})
    per_set = {s: summarize([r for r in records if r.set_name == s]) for s in sets} if len(sets) > 1 else {}
    policies, oracles = split_oracles(pooled)
    measured = sorted({f for f in map(family_of, pooled) if f is not None} | set(families))
    policies.update(frontier_aliases(pooled, [f for f in measured if not FRONTIER_FAMILIES[f].startswith("oracle:")]))
    oracles.update(frontier_aliases(pooled, [f for f in measured if FRONTIER_FAMILIES[f].startswith("oracle:")]))
    choice = choose_default(policies)
    pick = choice.policy or choice.closest
    return {
        **meta,
        "num_cases": len({r.case_id for r in records}),
        "sets": sets,
        "default_policy": choice.policy,
        "default_choice": {
            "policy": choice.policy,
            "qualified": choice.is_qualified,
            "closest": choice.closest,
            "shortfall": choice.shortfall,
            "rule": choice.rule,
        },
        "default_goals": goals(policies[pick], meta.get("min_speedup", 0.0)) if pick else {},
        "frontier_families": measured,
        "policies": policies,
        "oracles": oracles,
        "per_set": per_set,
    }


def run_eval(
    rag,
    policies: Sequence[str] = DEFAULT_POLICIES,
    n: int = 400,
    seed: int = 0,
    set_name: str = "all",
    max_new_tokens: int = 32,
    progress: bool = True,
    records_path: Path | None = None,
    store_setting: str | None = None,
    families: Sequence[str] = (),
) -> dict:
    from tqdm import tqdm

    from redknot_rag.evaluation.reuse_oracles import is_oracle, oracle_arm

    if "full" not in policies:
        raise ValueError("the policies must include 'full' (the reference)")
    for p in policies:  # validate every name before any work
        if is_oracle(p):
            oracle_arm(p, 2, (0,), {})
        else:
            rag.assembler.policy(p)
    cases = build_cases(set_name, n, seed, rag.engine.tokenizer)
    done: set[tuple[str, str]] = set()
    records: list[Record] = []
    if records_path is not None and records_path.exists():  # resume: keep what an earlier run measured
        for line in records_path.read_text().splitlines():
            d = json.loads(line)
            if d["policy"] in policies:
                records.append(Record(**d))
        done = {(r.case_id, r.policy) for r in records}
    sink = records_path.open("a") if records_path is not None else None
    try:
        for case in tqdm(cases, desc=f"eval {set_name}", disable=not progress):
            missing = [p for p in policies if (case.case_id, p) not in done]
            if not missing:
                continue
            # `full` is the reference of every paired metric: rerun it with whatever this case still lacks
            run = ["full", *[p for p in missing if p != "full"]]
            for r in run_case(rag, case, run, max_new_tokens):
                if r.policy not in missing:
                    continue
                records.append(r)
                if sink is not None:
                    sink.write(json.dumps(asdict(r)) + "\n")
            if sink is not None:
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    keep = {c.case_id for c in cases}
    records = [r for r in records if r.case_id in keep and r.policy in policies]
    return report(records, eval_meta(rag, seed, set_name, max_new_tokens, store_setting), families)


def eval_meta(rag, seed: int, set_name: str, max_new_tokens: int, store_setting: str | None) -> dict:
    from redknot_rag.evaluation.store_fidelity import store_footprint

    runner = rag.engine.runner
    return {
        "model": runner.name,
        "device": str(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""),
        "seed": seed,
        "set": set_name,
        "max_new_tokens": max_new_tokens,
        "max_recompute": MAX_RECOMPUTE,
        "min_speedup": MIN_SPEEDUP_CPU if runner.device.type == "cpu" else 0.0,
        "store_setting": store_setting or "dense",
        "store": store_footprint(rag.store, runner),  # bytes per stored token of this run's store
    }


def report_from_records(records_path: Path, policies: Sequence[str], meta: dict, families: Sequence[str] = ()) -> dict:
    """The report over the cases of a records file that every policy answered (an interrupted run)."""
    recs = [Record(**json.loads(line)) for line in records_path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.policy in policies]
    by_case: dict[str, set[str]] = {}
    for r in recs:
        by_case.setdefault(r.case_id, set()).add(r.policy)
    complete = {c for c, ps in by_case.items() if ps >= set(policies)}
    if not complete:
        raise ValueError(f"no case in {records_path} has records for every policy")
    return report([r for r in recs if r.case_id in complete], meta, families)


def _family_points(entries: dict[str, dict]) -> dict[str, list[tuple[str, dict]]]:
    fams: dict[str, list[tuple[str, dict]]] = {}
    for name, r in entries.items():
        fam = family_of(name)
        if fam is not None:
            fams.setdefault(fam, []).append((name, r))
    return {f: sorted(v, key=lambda x: x[1]["recompute_fraction"]) for f, v in fams.items()}


def plot_frontier(result: dict, path: Path) -> None:
    """Per family: accuracy difference to full (paired 95% CI), first-token KL and median TTFT against the
    recomputed fraction; oracles dashed (the selector's ceiling) or as labelled points, left out of the TTFT
    panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol, orc = result["policies"], result.get("oracles", {})
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for fam, pts in _family_points({**pol, **orc}).items():
        xs = [r["recompute_fraction"] for _, r in pts]
        ds = [r["accuracy_diff"] for _, r in pts]
        lo = [r["accuracy_diff"] - r["accuracy_diff_ci95"][0] for _, r in pts]
        hi = [r["accuracy_diff_ci95"][1] - r["accuracy_diff"] for _, r in pts]
        ls = "--" if fam.startswith("oracle") else "-"
        axes[0].errorbar(xs, ds, yerr=[lo, hi], ls=ls, marker="o", ms=4, capsize=2, lw=1.2, label=fam)
        axes[1].plot(xs, [r["first_token_kl"] for _, r in pts], ls=ls, marker="o", ms=4, label=fam)
        if not fam.startswith("oracle"):  # an oracle's TTFT is no serving cost (it ran a full prefill to rank)
            axes[2].plot(xs, [r["ttft_ms_median"] for _, r in pts], ls=ls, marker="o", ms=4, label=fam)
    singles = {n: r for n, r in {**pol, **orc}.items() if family_of(n) is None}
    for name, r in singles.items():
        x, d = r["recompute_fraction"], r["accuracy_diff"]
        mark = "*" if name == (result["default_choice"].get("policy") if "default_choice" in result else None) else "x"
        axes[0].scatter([x], [d], marker=mark, s=60, c="black")
        axes[0].annotate(name.removeprefix("oracle:"), (x, d), fontsize=7)
        axes[1].scatter([x], [r["first_token_kl"]], marker=mark, s=40, c="black")
        if not name.startswith("oracle:"):
            axes[2].scatter([x], [r["ttft_ms_median"]], marker=mark, s=40, c="black")
            axes[2].annotate(name, (x, r["ttft_ms_median"]), fontsize=7)
    for ax in axes:
        ax.set_xlabel("recomputed fraction of chunk tokens")
    axes[0].set_ylabel("accuracy − full (paired 95% CI)")
    axes[0].axhline(-MAX_ACCURACY_LOSS, ls=":", c="red", lw=1)
    axes[0].axhline(-MAX_CI_LOSS, ls=":", c="orange", lw=1)
    axes[0].axhline(0, c="black", lw=0.5)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("first-token KL(full ‖ policy)")
    axes[1].set_yscale("symlog", linthresh=0.01)
    axes[1].axhline(0.05, ls=":", c="red", lw=1)
    axes[2].set_ylabel(f"median TTFT, ms ({result['device']}, each request alone)")
    ch = result.get("default_choice", {})
    picked = ch.get("policy") or f"none qualifies (closest {ch.get('closest')})"
    fig.suptitle(
        f"{result['model']}: {result['num_cases']} paired cases ({', '.join(result['sets'])}); default {picked}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _row(name: str, r: dict, note: str = "") -> str:
    from redknot_rag.evaluation.paired_stats import format_diff_ci

    diff = format_diff_ci(r["accuracy_diff"], r["accuracy_diff_ci95"])
    alias = f" (= {r['alias_of']}, by construction)" if "alias_of" in r else ""
    return (
        f"| {name}{note}{alias} | {100 * r['recompute_fraction']:.1f}% | {r['accuracy']:.3f} | {diff} "
        f"| {r['mcnemar_p']:.3g} | {r['first_token_kl']:.3f} | {r['agreement_32']:.3f} | "
        f"{r['ttft_ms_median']:.0f} | {r['speedup_median']:.1f}x |"
    )


_HEADER = [
    "| policy | recomputed | accuracy | Δ vs full [95% CI] | McNemar p | first-token KL | agreement@32 | "
    "TTFT median ms | speed-up (median) |",
    "|---|---|---|---|---|---|---|---|---|",
]


def format_table(result: dict) -> str:
    """The served policies: frontier families by budget, then the rest; the default rule's choice marked."""
    choice = result.get("default_choice", {})
    lines = list(_HEADER)
    pol = result["policies"]
    fams = _family_points(pol)
    rest = [n for n in pol if family_of(n) is None]

    def note(n: str) -> str:
        if n == choice.get("policy"):
            return " (default)"
        return " (closest; does not qualify)" if n == choice.get("closest") else ""

    for n in rest:
        lines.append(_row(n, pol[n], note(n)))
    for pts in fams.values():
        lines += [_row(n, r, note(n)) for n, r in pts]
    return "\n".join(lines)


def format_oracle_table(result: dict) -> str:
    """The oracles (bench only), with full and naive for reference."""
    lines = list(_HEADER)
    pol, orc = result["policies"], result.get("oracles", {})
    lines += [_row(n, pol[n]) for n in ("full", "naive") if n in pol]
    for pts in _family_points(orc).values():
        lines += [_row(n, r) for n, r in pts]
    lines += [_row(n, r) for n, r in orc.items() if family_of(n) is None]
    return "\n".join(lines)
