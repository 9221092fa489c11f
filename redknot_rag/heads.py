"""Head profiles: which (layer, kv_head) blocks are local (sink + recent window suffices) and which
are global, measured by a calibration run. Head patterns are data — a `[layers x kv_heads]` file.

`redknot profile-heads` writes `profiles/<model>.json` and a PNG heat map.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

LOCAL, GLOBAL = 0, 1


@dataclass(frozen=True)
class HeadProfile:
    """Per-(layer, kv_head) scores and classes. `classes[l][h]` is LOCAL (0) or GLOBAL (1).

    Local heads read the anchor (the attention sink) plus the last `window` context tokens.
    """

    model: str
    weights_fingerprint: str
    num_layers: int
    num_kv_heads: int
    window: int
    locality_threshold: float
    classes: list[list[int]]
    locality: list[list[float]]
    reuse_deviation: list[list[float]]
    retrieval: list[list[float]]
    calibration: dict

    def class_tensor(self) -> torch.Tensor:
        return torch.tensor(self.classes, dtype=torch.int64)  # [L, Hkv]

    @property
    def num_global(self) -> int:
        return int(self.class_tensor().sum())

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> HeadProfile:
        return cls(**json.loads(Path(path).read_text()))


def shipped_profile_path(model_name: str) -> Path:
    return Path(str(resources.files("redknot_rag") / "profiles" / f"{model_name}.json"))


def load_profile_for(engine) -> HeadProfile | None:
    """The shipped/calibrated profile for the engine's model, if its fingerprint matches."""
    path = shipped_profile_path(engine.loaded.name)
    if not path.is_file():
        return None
    prof = HeadProfile.load(path)
    if prof.weights_fingerprint != engine.loaded.weights_fingerprint:
        return None
    return prof


def profile_heads(
    engine, num_cases: int = 8, window: int = 64, locality_threshold: float = 0.8, seed: int = 0, progress: bool = True
) -> HeadProfile:
    """Calibrate on planted-fact RAG prompts (real text from the stdlib + one planted fact each).

    Per head: locality = question attention mass on anchor + last `window` context tokens (full
    prefill); reuse deviation = relative change of the head's output on the question when the context
    is assembled from independently prefilled chunks; retrieval = attention mass on the fact sentence.
    """
    from tqdm import tqdm

    from redknot_rag.chat import ChatFormat, encode
    from redknot_rag.chunkkv import ChunkPrefiller, write_segment
    from redknot_rag.probe import ProbeBackend
    from redknot_rag.rag import CHUNK_SEPARATOR, QUESTION_TEMPLATE
    from redknot_rag.retrieval.planted_facts import make_planted_cases
    from redknot_rag.reuse import ReuseInput, relocate

    mc = engine.model_config
    tok = engine.tokenizer
    fmt = ChatFormat.from_tokenizer(tok)
    anchor = encode(tok, fmt.prefix)
    pf = ChunkPrefiller(engine, anchor)
    probe = ProbeBackend(mc, engine.pool, engine.rotary)
    nl, nh, g = mc.num_layers, mc.num_kv_heads, mc.num_kv_groups
    loc = torch.zeros(nl, nh)
    dev = torch.zeros(nl, nh)
    ret = torch.zeros(nl, nh)
    rng = random.Random(seed)
    cases = make_planted_cases(num_cases, seed=seed + 1000, num_distractors=5)
    for case in tqdm(cases, desc="profiling heads", disable=not progress):
        docs = list(case.docs)
        rng.shuffle(docs)
        chunks = [encode(tok, d.text.strip() + CHUNK_SEPARATOR)[:256] for d in docs]
        q = encode(tok, QUESTION_TEMPLATE.format(question=case.question) + fmt.suffix)
        ctx = list(anchor) + [t for c in chunks for t in c]
        fact = encode(tok, case.fact_sentence)
        fact_mask = torch.zeros(len(ctx) + len(q), dtype=torch.bool)
        for i in range(len(anchor), len(ctx) - len(fact) + 1):  # locate the fact sentence's tokens
            if ctx[i : i + len(fact)] == fact:
                fact_mask[i : i + len(fact)] = True
        outs = []
        for mode in ("full", "naive"):
            if mode == "full":
                kv = engine.new_seq_kv()
                pf.attach_anchor(kv)
                engine.append_forward(kv, ctx[len(anchor) :], torch.arange(len(anchor), len(ctx)))
                segs = []
            else:
                kvs = pf.prefill(chunks)
                segs = [write_segment(engine.pool, engine.allocator, k, v) for k, v in kvs]
                kv = relocate(engine, ReuseInput(anchor, pf.anchor.segment, chunks, segs, q))
            try:
                engine.append_forward(kv, q, torch.arange(len(ctx), len(ctx) + len(q)), backend=probe)
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
                kv.release(engine.allocator)
                for s in segs:
                    engine.allocator.decref(s.pages.numpy())
        for li in range(nl):
            f, n_ = outs[0][li], outs[1][li]  # [Tq, Hq, D]
            diff = (f - n_).view(f.shape[0], nh, g, -1).pow(2).sum(dim=(0, 2, 3)).sqrt()  # [Hkv]
            ref = f.view(f.shape[0], nh, g, -1).pow(2).sum(dim=(0, 2, 3)).sqrt()
            dev[li] += diff / ref.clamp_min(1e-6)
    n = len(cases)
    loc, dev, ret = loc / n, dev / n, ret / n
    classes = ((loc < locality_threshold) | (ret > ret.quantile(0.75))).long()  # global unless clearly local
    engine.allocator.decref(pf.anchor.segment.pages.numpy())
    return HeadProfile(
        model=engine.loaded.name,
        weights_fingerprint=engine.loaded.weights_fingerprint,
        num_layers=nl,
        num_kv_heads=nh,
        window=window,
        locality_threshold=locality_threshold,
        classes=classes.tolist(),
        locality=loc.tolist(),
        reuse_deviation=dev.tolist(),
        retrieval=ret.tolist(),
        calibration={"cases": n, "seed": seed, "chunks_per_case": 6, "data": "planted facts in pydoc_data topics"},
    )


def plot_profile(prof: HeadProfile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(12, 6), sharey=True)
    for ax, (title, data) in zip(
        axes,
        [
            ("locality (sink+window mass)", prof.locality),
            ("reuse deviation", prof.reuse_deviation),
            ("retrieval (fact mass)", prof.retrieval),
            ("class (1 = global)", prof.classes),
        ],
    ):
        im = ax.imshow(torch.tensor(data, dtype=torch.float32).numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("kv head")
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_ylabel("layer")
    fig.suptitle(
        f"{prof.model}: {prof.num_global}/{prof.num_layers * prof.num_kv_heads} global heads, window {prof.window}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_profile(args: argparse.Namespace) -> int:
    from redknot_rag.cli import engine_config_from_args
    from redknot_rag.engine import Engine

    engine = Engine(engine_config_from_args(args))
    t0 = time.perf_counter()
    prof = profile_heads(engine, num_cases=args.cases, window=args.window, locality_threshold=args.threshold)
    out = Path(args.out) if args.out else shipped_profile_path(engine.loaded.name)
    prof.save(out)
    plot_profile(prof, out.with_suffix(".png"))
    print(
        f"{prof.num_global}/{prof.num_layers * prof.num_kv_heads} global heads; wrote {out} and "
        f"{out.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def register_cli(sub) -> None:
    from redknot_rag.cli import add_engine_args

    p = sub.add_parser("profile-heads", help="calibrate local/global KV heads for a model")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.8, help="locality above which a head is local")
    p.add_argument("--out", default=None, help="profile path (default: the package's profiles/ folder)")
    add_engine_args(p)
    p.set_defaults(func=_cmd_profile)
