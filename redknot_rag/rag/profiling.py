"""Head-profile calibration (`redknot profile-heads`): which (layer, kv_head) blocks are local.

Runs RAG prompts through the model twice per case (full prefill, and relocated independently-prefilled
chunks) and records, per head, the question's attention locality, the reuse deviation of the head's
output, and the attention mass on the fact sentences. The prompts come from both case generators, on
seeds the fidelity harness does not use: planted facts in long help-topic passages (6 chunks) and the
`facts` set (numbers/dates, two facts, first/last chunk, 4/6/8 chunks, decoys). The result is data: a
`HeadProfile` file (`heads.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from redknot_rag.chat import encode
from redknot_rag.heads import HeadProfile
from redknot_rag.kvcache import KVSegment
from redknot_rag.rag.chunk_prefill import ChunkPrefiller
from redknot_rag.rag.layout import PromptLayout
from redknot_rag.reuse import ReuseInput, relocate
from redknot_rag.runner import KVRunner

CALIBRATION_SEED_OFFSET = 1000  # the fidelity harness uses seeds 0..; calibration never sees its cases


@dataclass(frozen=True)
class CalibrationPrompt:
    """One calibration case: chunk texts in prompt order, the question, the sentences that answer it."""

    chunks: tuple[str, ...]
    question: str
    fact_sentences: tuple[str, ...]


def calibration_prompts(num_cases: int, seed: int) -> list[CalibrationPrompt]:
    """`num_cases` prompts, alternating planted-fact and `facts` cases (half each, planted first)."""
    from redknot_rag.evaluation.fact_cases import make_fact_cases
    from redknot_rag.evaluation.planted_facts import make_planted_cases

    rng = random.Random(seed)
    planted = []
    for case in make_planted_cases(num_cases - num_cases // 2, seed=seed + CALIBRATION_SEED_OFFSET, num_distractors=5):
        docs = list(case.docs)
        rng.shuffle(docs)
        planted.append(CalibrationPrompt(tuple(d.text for d in docs), case.question, (case.fact_sentence,)))
    facts = [
        CalibrationPrompt(c.chunks, c.question, c.fact_sentences)
        for c in make_fact_cases(num_cases // 2, seed=seed + CALIBRATION_SEED_OFFSET, sizes=(4, 6, 8))
    ]
    out = [p for pair in zip(planted, facts) for p in pair]
    return out + planted[len(facts) :]


def _find_all(haystack: list[int], needle: list[int], start: int) -> list[int]:
    """Start indices of `needle` in `haystack[start:]` (token ids)."""
    n = len(needle)
    return [i for i in range(start, len(haystack) - n + 1) if n and haystack[i : i + n] == needle]


def profile_heads(
    runner: KVRunner,
    num_cases: int = 48,
    window: int = 64,
    locality_threshold: float = 0.8,
    seed: int = 0,
    progress: bool = True,
) -> HeadProfile:
    """Calibrate on RAG prompts from both case generators (`calibration_prompts`).

    Per head: locality = question attention mass on anchor + last `window` context tokens (full
    prefill); reuse deviation = relative change of the head's output on the question when the context
    is assembled from independently prefilled chunks; retrieval = attention mass on the fact sentences.
    """
    from tqdm import tqdm

    mc = runner.model_config
    tok = runner.tokenizer
    layout = PromptLayout.for_tokenizer(tok)
    anchor = list(layout.anchor_ids)
    pf = ChunkPrefiller(runner, layout.anchor_ids)
    probe = runner.probe_backend()
    nl, nh, g = mc.num_layers, mc.num_kv_heads, mc.num_kv_groups
    loc = torch.zeros(nl, nh)
    dev = torch.zeros(nl, nh)
    ret = torch.zeros(nl, nh)
    cases = calibration_prompts(num_cases, seed)
    found = 0  # cases whose fact sentence was located in the prompt's tokens
    try:
        for case in tqdm(cases, desc="profiling heads", disable=not progress):
            chunks = [layout.chunk_ids(text)[:256] for text in case.chunks]
            q = layout.question_ids(case.question)
            ctx = layout.prompt_ids(chunks, [])
            fact_mask = torch.zeros(len(ctx) + len(q), dtype=torch.bool)
            for sentence in case.fact_sentences:  # locate each fact sentence's tokens (with or without a leading space)
                for fact in (encode(tok, sentence), encode(tok, " " + sentence)):
                    for i in _find_all(ctx, fact, len(anchor)):
                        fact_mask[i : i + len(fact)] = True
            found += int(bool(fact_mask.any()))
            outs = []
            for mode in ("full", "naive"):
                segs: list[KVSegment] = []
                if mode == "full":
                    kv = runner.new_seq_kv()
                    pf.attach_anchor(kv)
                    runner.append_forward(kv, ctx[len(anchor) :], torch.arange(len(anchor), len(ctx)))
                else:
                    segs = [runner.write_segment(k, v) for k, v in pf.prefill(chunks)]
                    kv = relocate(runner, ReuseInput(anchor, pf.anchor, chunks, segs, q))
                try:
                    runner.append_forward(kv, q, torch.arange(len(ctx), len(ctx) + len(q)), backend=probe)
                    outs.append([o.clone() for o in probe.outputs])
                    if mode == "full":
                        t = kv.num_tokens
                        near = torch.zeros(t, dtype=torch.bool)
                        near[: len(anchor)] = True
                        near[max(0, len(ctx) - window) :] = True
                        for li, a in enumerate(probe.attn):  # a: [Hkv, T] summed over q tokens and group
                            total = a.sum(-1)
                            loc[li] += a[:, near].sum(-1) / total
                            ret[li] += a[:, fact_mask[:t]].sum(-1) / total
                finally:
                    runner.release(kv)
                    for s in segs:
                        runner.drop_segment(s)
            for li in range(nl):
                f, n_ = outs[0][li], outs[1][li]  # [Tq, Hq, D]
                diff = (f - n_).view(f.shape[0], nh, g, -1).pow(2).sum(dim=(0, 2, 3)).sqrt()  # [Hkv]
                ref = f.view(f.shape[0], nh, g, -1).pow(2).sum(dim=(0, 2, 3)).sqrt()
                dev[li] += diff / ref.clamp_min(1e-6)
    finally:
        pf.close()
    n = len(cases)
    loc, dev, ret = loc / n, dev / n, ret / n
    classes = ((loc < locality_threshold) | (ret > ret.quantile(0.75))).long()  # global unless clearly local
    sliding = torch.tensor([mc.is_sliding(i) for i in range(nl)], dtype=torch.bool)  # [L]
    classes[sliding] = 0  # sliding-window layers are local by construction (they never see beyond their window)
    return HeadProfile(
        model=runner.name,
        weights_fingerprint=runner.weights_fingerprint,
        num_layers=nl,
        num_kv_heads=nh,
        window=window,
        locality_threshold=locality_threshold,
        classes=classes.tolist(),
        locality=loc.tolist(),
        reuse_deviation=dev.tolist(),
        retrieval=ret.tolist(),
        calibration={
            "cases": n,
            "seed": seed,
            "chunks_per_case": "6 (planted), 4/6/8 (facts)",
            "data": "planted facts in pydoc_data topics + the facts set (numbers/dates, two facts, decoys)",
            "cases_with_fact_located": found,
            "rule": f"global if locality < {locality_threshold} or retrieval in the top quartile",
            "sliding_layers_local": int(sliding.sum()),
        },
    )
