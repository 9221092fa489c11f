"""Needle (passkey) fidelity of pool windows on a real model (CPU): compression on vs off, paired.

Each case hides one sentence "The passkey for the <name> vault is <5 digits>." at a random depth
(10-90%) of real filler text (the pydoc topics of this Python, `evaluation/corpus.py`) cut to the target
length, and asks for it at the end as a completion ("... The passkey for the <name> vault is"). Both arms
run the SAME prompt through the runner (prefill in `--chunk`-token steps as the engine chunks it, then one
token per step, a window slide after each step as the engine does); the compressed arm's sequence is made
with the runner's pool windows (local blocks keep sink + window; pages released after every step), the
dense arm's without. Correct = greedy decoding yields the 5 digits (teacher-forced: every next-token
argmax over the answer's positions matches; one token per step after the prefill, as decode runs). Per length:
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


def make_case(tok, paras: list[str], length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Prompt ids (about `length` tokens) with the needle at a random depth, ending where the answer
    starts; and the answer's ids (the 5 digits)."""
    name, key = rng.choice(NAMES), f"{rng.randrange(10000, 100000)}"
    needle = f"The passkey for the {name} vault is {key}. Remember it: the passkey for the {name} vault is {key}."
    head = "A passkey is hidden in the text below. Find it and remember it.\n\n"
    tail = f"\n\nWhat is the passkey for the {name} vault? The passkey for the {name} vault is"
    body: list[str] = []
    n, i = 0, rng.randrange(len(paras))
    while n < length - 80:
        p = paras[i % len(paras)]
        body.append(p)
        n += len(tok(p, add_special_tokens=False)["input_ids"]) + 2
        i += 1
    while len(body) > 1 and n > length - 80:  # trim the overshoot
        n -= len(tok(body[-1], add_special_tokens=False)["input_ids"]) + 2
        body.pop()
    body.insert(int(rng.uniform(0.1, 0.9) * (len(body) + 1)), needle)
    ids = tok(head + "\n\n".join(body) + tail, add_special_tokens=True)["input_ids"]
    return list(ids), list(tok(" " + key, add_special_tokens=False)["input_ids"])


def run_pair(runner, windows, ids: list[int], answer: list[int], chunk: int) -> tuple[list[int], list[int], int, int]:
    """Greedy predictions for the answer's positions in both arms, teacher-forced (greedy decoding yields the
    answer iff every prediction matches): the prompt in `chunk`-token prefill steps, then one token per
    step, a window slide after every step as the engine does. The first prefill step is the same
    computation in both arms (nothing has slid yet), so it runs once: the compressed arm attaches its KV as
    a shared segment (a reused sequence: its local blocks then drop their references to those pages).
    Returns (dense predictions, compressed predictions, page references each held after the prefill)."""
    n = len(ids)
    c = min(n, chunk)
    dense = runner.new_seq_kv()  # the runner's pool_windows are off (main sets them per arm)
    saved = runner.pool_windows
    runner.pool_windows = windows
    comp = runner.new_seq_kv()
    runner.pool_windows = saved
    try:
        first = runner.append_forward(dense, ids[:c], torch.arange(c), logits=c == n).logits
        k, v = runner.read_tokens(dense, 0, c)
        seg = runner.write_segment(k, v)
        runner.attach(comp, seg, torch.arange(c))
        runner.drop_segment(seg)  # `comp` holds the only reference now
        del k, v
        preds, held = [], []
        for kv in (dense, comp):
            out = first
            runner.slide(kv)
            for a in range(c, n, chunk):
                b = min(n, a + chunk)
                out = runner.append_forward(kv, ids[a:b], torch.arange(a, b), logits=b == n).logits
                runner.slide(kv)
            held.append(sum(kv.held_pages()))
            p = [int(out[-1].argmax())]
            for j, t in enumerate(answer[:-1]):
                out = runner.append_forward(kv, [t], torch.arange(n + j, n + j + 1), logits=True).logits
                runner.slide(kv)
                p.append(int(out[-1].argmax()))
            preds.append(p)
        return preds[0], preds[1], held[0], held[1]
    finally:
        runner.release(dense)
        runner.release(comp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or a model name/path")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (EngineConfig.max_prefill_tokens)")
    ap.add_argument("--mode", default="profile", help="the compressed arm's --pool-local-heads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from redknot_rag.config import EngineConfig
    from redknot_rag.loader import load_model
    from redknot_rag.runner import KVRunner

    loaded = load_model(None if args.model == "default" else args.model, dtype=torch.float32, device="cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=1.0, max_prefill_tokens=args.chunk,
                       pool_local_heads=args.mode, attention_backend="torch")  # fmt: skip
    runner = KVRunner(cfg, loaded)
    win = runner.pool_windows
    if win is None:
        raise SystemExit(f"no pool windows for {loaded.name}: {runner.pool_windows_reason}")
    runner.pool_windows = None  # the dense arm's; run_pair gives the compressed arm `win`
    tok = runner.tokenizer
    paras = filler_paragraphs()
    out: dict = dict(
        machine=machine(), model=loaded.name, windows=dict(source=win.source, sink=win.sink, window=win.window,
        local_blocks=win.num_local, blocks=win.num_blocks), chunk=args.chunk,
        scoring="teacher-forced greedy match of the 5 answer digits",
        cases_per_length=args.cases, seed=args.seed, lengths=[],
    )  # fmt: skip
    for length in [int(x) for x in args.lengths.split(",")]:
        rng = random.Random(args.seed * 1000 + length)
        dense_ok, comp_ok, first_same, rows = [], [], [], []
        held_d, held_c = [], []
        t0 = time.perf_counter()
        for c in range(args.cases):
            ids, answer = make_case(tok, paras, length, rng)
            d_out, c_out, hd, hc = run_pair(runner, win, ids, answer, args.chunk)
            dense_ok.append(d_out == answer)
            comp_ok.append(c_out == answer)
            first_same.append(d_out[0] == c_out[0])
            held_d.append(hd)
            held_c.append(hc)
            rows.append(dict(tokens=len(ids), answer=tok.decode(answer), dense=tok.decode(d_out),
                             compressed=tok.decode(c_out)))  # fmt: skip
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
