"""Needle (passkey) fidelity of pool windows on a real model (CPU): compression on vs off, paired.

Each case hides one sentence "The passkey for the <name> vault is <5 digits>." at a random depth
(10-90%) of real filler text (the pydoc topics of this Python, `evaluation/corpus.py`) cut to the target
length, and asks for it at the end (the model's chat template). Both arms run the SAME prompt through
the engine (chunked prefill of `--chunk` tokens, greedy decode); the compressed arm's sequence is made
with the runner's pool windows (local blocks keep sink + window; pages released after every step), the
dense arm's without. Correct = the 5 digits appear in the first `--max-new-tokens` tokens. Per length:
accuracies, the paired difference with its bootstrap 95% CI and exact McNemar p
(`evaluation/paired_stats.py`), first-token agreement, and the pool bytes each arm held at the end of
prefill.

    python bench/pool/needle.py --model default --lengths 1024,2048,4096 --cases 30 \
        --out bench/pool/needle_SmolLM2.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from redknot_rag.evaluation.corpus import topic_texts  # noqa: E402
from redknot_rag.evaluation.paired_stats import compare_paired, format_diff_ci  # noqa: E402

NAMES = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "krypton", "lumen", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra"]  # fmt: skip


def filler_paragraphs() -> list[str]:
    paras = []
    for text in topic_texts().values():
        paras += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
    return paras


def make_case(tok, paras: list[str], length: int, rng: random.Random) -> tuple[list[int], str]:
    """Prompt ids (about `length` tokens, chat template) with the needle at a random depth; the answer."""
    name, key = rng.choice(NAMES), f"{rng.randrange(10000, 100000)}"
    needle = f"The passkey for the {name} vault is {key}. Remember it: {key}."
    question = f"What is the passkey for the {name} vault? Answer with the number only."
    start = rng.randrange(len(paras))
    body: list[str] = []
    n = 0
    i = start
    while n < length - 60:
        p = paras[i % len(paras)]
        body.append(p)
        n += len(tok(p, add_special_tokens=False)["input_ids"]) + 2
        i += 1
    while len(body) > 1 and n > length - 60:  # trim the overshoot
        n -= len(tok(body[-1], add_special_tokens=False)["input_ids"]) + 2
        body.pop()
    body.insert(int(rng.uniform(0.1, 0.9) * len(body)), needle)
    msg = "\n\n".join(body) + "\n\n" + question
    ids = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids), key


def run_arm(engine, windows, ids: list[int], max_new: int) -> tuple[list[int], int]:
    """Greedy answer through the engine with the runner's pool windows set to `windows`; and the page
    references the sequence held right after its prefill (sampled by a step hook)."""
    from redknot_rag.sampling import SamplingParams

    runner = engine.runner
    saved = runner.pool_windows
    runner.pool_windows = windows
    try:
        req = engine.submit(engine.make_request(ids, SamplingParams(max_new_tokens=max_new, ignore_eos=True)))
        held = 0
        while not req.is_finished:
            engine.step()
            if req.kv is not None and not held and req.output_ids:
                held = sum(req.kv.held_pages())
        return req.output_ids, held
    finally:
        runner.pool_windows = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or a model name/path")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (EngineConfig.max_prefill_tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--mode", default="profile", help="the compressed arm's --pool-local-heads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import load_model

    loaded = load_model(None if args.model == "default" else args.model, dtype=torch.float32, device="cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=1.0, max_prefill_tokens=args.chunk,
                       pool_local_heads=args.mode, attention_backend="torch")  # fmt: skip
    engine = Engine(cfg, loaded=loaded)
    win = engine.runner.pool_windows
    if win is None:
        raise SystemExit(f"no pool windows for {loaded.name}: {engine.runner.pool_windows_reason}")
    tok = engine.tokenizer
    paras = filler_paragraphs()
    out: dict = dict(
        machine=machine(), model=loaded.name, windows=dict(source=win.source, sink=win.sink, window=win.window,
        local_blocks=win.num_local, blocks=win.num_blocks), chunk=args.chunk, max_new_tokens=args.max_new_tokens,
        cases_per_length=args.cases, seed=args.seed, lengths=[],
    )  # fmt: skip
    for length in [int(x) for x in args.lengths.split(",")]:
        rng = random.Random(args.seed * 1000 + length)
        dense_ok, comp_ok, first_same, rows = [], [], [], []
        held_d, held_c = [], []
        t0 = time.perf_counter()
        for c in range(args.cases):
            ids, key = make_case(tok, paras, length, rng)
            d_out, hd = run_arm(engine, None, ids, args.max_new_tokens)
            c_out, hc = run_arm(engine, win, ids, args.max_new_tokens)
            d_txt, c_txt = tok.decode(d_out), tok.decode(c_out)
            dense_ok.append(key in d_txt)
            comp_ok.append(key in c_txt)
            first_same.append(d_out[:1] == c_out[:1])
            held_d.append(hd)
            held_c.append(hc)
            rows.append(dict(tokens=len(ids), key=key, dense=d_txt, compressed=c_txt))
            print(f"{length} case {c}: {len(ids)} tok, dense {dense_ok[-1]} comp {comp_ok[-1]} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
        cmp = compare_paired(dense_ok, comp_ok)
        out["lengths"].append(dict(
            target_tokens=length, cases=len(rows), accuracy_dense=cmp.accuracy_a, accuracy_compressed=cmp.accuracy_b,
            diff=cmp.accuracy_diff, ci95=list(cmp.ci95), diff_ci=format_diff_ci(cmp.accuracy_diff, cmp.ci95),
            mcnemar_p=cmp.mcnemar_p, only_dense=cmp.num_only_a, only_compressed=cmp.num_only_b,
            first_token_agreement=sum(first_same) / len(first_same),
            pool_pages_after_prefill_dense=sum(held_d) / len(held_d),
            pool_pages_after_prefill_compressed=sum(held_c) / len(held_c),
            seconds=round(time.perf_counter() - t0, 1), records=rows,
        ))  # fmt: skip
        print(json.dumps({k: v for k, v in out["lengths"][-1].items() if k != "records"}), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
