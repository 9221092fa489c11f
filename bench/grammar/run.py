"""Per-token cost of a constrained-decoding mask on CPU: grammar engines vs the old scanner.

For each case (a nested JSON schema, a regex, a 20-way select) a valid target text is tokenized
with the default model's tokenizer (SmolLM2, vocab 49152) and walked token by token. At every
step each engine computes the mask for the whole vocabulary and applies it to a `[vocab]`
float32 logits row (what `Request.logits_processor` does in the engine); the step asserts the
target token is allowed, then advances. Compile time (schema/regex → grammar) is reported apart.

The old scanner (`legacy_scanner.py`, the pre-issue-16 `server/constrained.py`) does not build a
full mask: it scans candidates in logit order until `keep` viable ones are found, so its cost
depends on the logits. It is timed on random logits (a model that ignores the grammar) with
keep=1 (greedy) and keep=32 (sampling), and on logits where the target ranks first (its best case).

    PYTHONPATH=$PWD python3 bench/grammar/run.py [--reps 3] [--out bench/grammar/results_cpu.json] [--only NAME]

`--batch` measures instead the per-step mask of a batch of constrained requests (per-request masks vs
the engine's one batch mask, and the fill hidden behind the forward; `step_mask.py`) and merges it
into `--out` under "batch_step".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import legacy_scanner  # noqa: E402

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "scores": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"subject": {"type": "string"}, "value": {"type": "number"}},
                "required": ["subject", "value"],
            },
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "tags", "scores", "active"],
}
NESTED_VALUE = {
    "name": "Ida Brask",
    "age": 41,
    "address": {"street": "12 Linden Street", "city": "Varnholt", "zip": "40213"},
    "tags": ["engineer", "lighthouse"],
    "scores": [{"subject": "optics", "value": 9.5}, {"subject": "masonry", "value": 7.25}],
    "active": True,
}
REGEX = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z [a-z]+@[a-z]+\.(com|org|net)"
REGEX_TARGET = "2026-11-30T06:55:14Z alice@example.org"
CHOICES = [
    "Amsterdam", "Barcelona", "Copenhagen", "Dublin", "Edinburgh", "Florence", "Geneva", "Helsinki",
    "Istanbul", "Jerusalem", "Kyoto", "Lisbon", "Madrid", "Nairobi", "Oslo", "Prague", "Quebec City",
    "Reykjavik", "Stockholm", "Tallinn",
]  # fmt: skip
SELECT_REGEX = "(" + "|".join(CHOICES) + ")"


class ProcessorWalk:
    """A walk through one constrained output with a logits processor called as the engine calls it
    (`proc(req, logits)` with `req.output_ids` the tokens so far); `can_end(ids)` asks whether it may stop."""

    def __init__(self, proc: Any, can_end: Any) -> None:
        self.proc, self._can_end = proc, can_end
        self.output_ids: list[int] = []  # the processor reads `req.output_ids`: this walk is the request

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return self.proc(self, logits)

    def advance(self, t: int) -> None:
        self.output_ids.append(t)

    def can_end(self) -> bool:
        return bool(self._can_end(self.output_ids))


def cases() -> list[dict[str, Any]]:
    return [
        {"name": "nested_json_schema", "kind": "json", "spec": json.dumps(NESTED_SCHEMA),
         "target": json.dumps(NESTED_VALUE, separators=(",", ":"))},
        {"name": "regex_datetime_email", "kind": "regex", "spec": REGEX, "target": REGEX_TARGET},
        {"name": "select_20_way", "kind": "regex", "spec": SELECT_REGEX, "target": "Quebec City"},
    ]  # fmt: skip


# ---- engines: compile(case) -> stepper with .mask(logits) -> masked logits and .advance(tok) ----
class XGrammar:
    name = "xgrammar"
    full_mask = True

    def __init__(self, tok: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab = vocab

    def compile(self, case: dict) -> Any:
        if case["kind"] == "json":
            return self.compiler.compile_json_schema(case["spec"], any_whitespace=True)
        return self.compiler.compile_regex(case["spec"])

    def start(self, compiled: Any) -> Any:
        xgr, vocab = self.xgr, self.vocab
        m = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        class S:
            def mask(self, logits: torch.Tensor) -> torch.Tensor:
                m.fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(logits, bitmask[0])
                return logits

            def advance(self, t: int) -> None:
                assert m.accept_token(t)

            def can_end(self) -> bool:
                return bool(m.accept_token(self_eos))

        self_eos = self.info.stop_token_ids[0]
        return S()


class Served:
    """What the server runs: `GrammarBackend` + `GrammarProcessor` (xgrammar fill, numpy bit unpack)."""

    name = "server GrammarProcessor (xgrammar)"
    full_mask = True

    def __init__(self, tok: Any, vocab: int) -> None:
        from redknot_rag.engine.grammar import GrammarBackend

        self.backend = GrammarBackend(tok, vocab, (tok.eos_token_id,))

    def compile(self, case: dict) -> Any:
        from redknot_rag.engine.grammar import Grammar

        g = Grammar("json_schema" if case["kind"] == "json" else "regex", case["spec"])
        self.backend.compile(g)  # timed; `start` gets it from xgrammar's cache
        return g

    def start(self, g: Any) -> Any:
        proc = self.backend.processor(g)

        def can_end(ids: list[int]) -> bool:
            proc.sync(ids)
            return bool(proc.matcher.accept_token(proc.stop_ids[0]))

        return ProcessorWalk(proc, can_end)


class LLGuidance:
    name = "llguidance"
    full_mask = True

    def __init__(self, tok: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, case: dict) -> Any:
        M = self.llg.LLMatcher
        g = M.grammar_from_json_schema(case["spec"]) if case["kind"] == "json" else M.grammar_from_regex(case["spec"])
        m = M(self.tok, g)
        assert not m.is_error(), m.get_error()
        return g

    def start(self, grammar: Any) -> Any:
        llt = self.llg.torch
        m = self.llg.LLMatcher(self.tok, grammar)
        bitmask = llt.allocate_token_bitmask(1, self.vocab)

        class S:
            def mask(self, logits: torch.Tensor) -> torch.Tensor:
                llt.fill_next_token_bitmask(m, bitmask, 0)
                llt.apply_token_bitmask_inplace(logits, bitmask[0])
                return logits

            def advance(self, t: int) -> None:
                assert m.consume_token(t), m.get_error()

            def can_end(self) -> bool:
                return m.is_accepting()

        return S()


class OutlinesCore:
    name = "outlines-core"
    full_mask = True

    def __init__(self, tok: Any, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.vocab_obj = outlines_core.Vocabulary(tok.eos_token_id, _byte_vocab(tok))
        self.vocab = vocab

    def compile(self, case: dict) -> Any:
        oc = self.oc
        rx = oc.json_schema.build_regex_from_schema(case["spec"]) if case["kind"] == "json" else case["spec"]
        return oc.Index(rx, self.vocab_obj)

    def start(self, index: Any) -> Any:
        from outlines_core.kernels import torch as okt

        g = self.oc.Guide(index)
        bitmask = okt.allocate_token_bitmask(self.vocab)

        class S:
            def mask(self, logits: torch.Tensor) -> torch.Tensor:
                okt.fill_next_token_bitmask(g, bitmask)
                okt.apply_token_bitmask_inplace(logits.view(1, -1), bitmask)
                return logits

            def advance(self, t: int) -> None:
                g.advance(t)

            def can_end(self) -> bool:
                return g.is_finished() or eos in g.get_tokens()

        eos = self.vocab_obj.get_eos_token_id()
        return S()


def _byte_vocab(tok: Any) -> dict[bytes, list[int]]:
    """GPT-2 byte-level token strings → raw bytes (what outlines-core's Vocabulary indexes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    inv = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(extra)}
    special = set(tok.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for s, i in tok.get_vocab().items():
        if i in special:
            continue
        out.setdefault(bytes(inv[c] for c in s), []).append(i)
    return out


class Legacy:
    """The old scanner: a partial mask (the first `keep` viable candidates in logit order)."""

    full_mask = False

    def __init__(self, tok: Any, vocab: int, keep: int, logits_kind: str) -> None:
        self.texts = legacy_scanner.TokenTexts.of(tok)
        self.eos = (tok.eos_token_id,)
        self.keep, self.logits_kind = keep, logits_kind
        self.name = f"legacy scanner (keep={keep}, {logits_kind} logits)"

    def compile(self, case: dict) -> Any:
        return legacy_scanner.json_schema_regex(case["spec"]) if case["kind"] == "json" else case["spec"]

    def start(self, pattern: str) -> Any:
        proc = legacy_scanner.RegexProcessor(pattern, self.texts, self.eos, greedy=True)
        proc.keep = self.keep
        return ProcessorWalk(proc, lambda ids: proc.is_complete(proc._sync(ids)))


def run_case(engine: Any, case: dict, ids: list[int], vocab: int, reps: int, target_first: bool) -> dict:
    """One untimed-for-stats warm-up walk (lazy setup lands there), then `reps` timed walks."""
    t0 = time.perf_counter()
    compiled = engine.compile(case)
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(vocab, generator=gen) for _ in ids]
    per_token: list[float] = []
    first_walk = 0.0
    for rep in range(reps + 1):
        s = engine.start(compiled)
        for k, t in enumerate(ids):
            logits = base[k].clone()
            if target_first:
                logits[t] = 100.0
            t1 = time.perf_counter()
            out = s.mask(logits)
            dt = time.perf_counter() - t1
            if rep == 0:
                first_walk += dt
            else:
                per_token.append(dt)
            if engine.full_mask:
                assert torch.isfinite(out[t]), f"{engine.name}: target {t} masked at step {k} of {case['name']}"
            s.advance(t)
        assert s.can_end(), f"{engine.name}: cannot end after the target of {case['name']}"
    return {
        "compile_ms": round(compile_s * 1e3, 2),
        "first_walk_ms": round(first_walk * 1e3, 1),
        "per_token_us_median": round(statistics.median(per_token) * 1e6, 1),
        "per_token_us_mean": round(statistics.fmean(per_token) * 1e6, 1),
        "per_token_us_p90": round(statistics.quantiles(per_token, n=10)[-1] * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results_cpu.json"))
    ap.add_argument("--only", default="", help="run only engines whose name contains this; merge into --out")
    ap.add_argument("--batch", action="store_true", help="per-step batch mask bench (step_mask.py) only")
    ap.add_argument("--batches", default="1,16,64", help="--batch: batch sizes")
    ap.add_argument("--steps", type=int, default=6, help="--batch: measured decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="--batch: rounds per batch size (modes interleaved)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from redknot_rag.loader import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(None)[0])
    vocab = len(tok)
    if args.batch:
        import step_mask

        out = Path(args.out)
        merged = json.loads(out.read_text()) if out.exists() else {}
        merged["batch_step"] = step_mask.run(
            tok, vocab, cases(), [int(b) for b in args.batches.split(",")], args.steps, args.rounds, reps=20
        )
        merged["batch_step"]["machine"] = f"CPU: shared 2-core box ({platform.processor() or platform.machine()})"
        out.write_text(json.dumps(merged, indent=1) + "\n")
        print("wrote", args.out)
        return
    engines: list[tuple[Any, bool]] = []
    for make in (Served, XGrammar, LLGuidance, OutlinesCore):
        if args.only and args.only not in make.name:
            continue
        t0 = time.perf_counter()
        eng = make(tok, vocab)
        print(f"{eng.name}: tokenizer setup {time.perf_counter() - t0:.2f}s", flush=True)
        engines.append((eng, False))
    if not args.only or args.only in "legacy scanner":
        t0 = time.perf_counter()
        engines.append((Legacy(tok, vocab, 1, "random"), False))
        print(f"legacy: token texts {time.perf_counter() - t0:.2f}s", flush=True)
        engines.append((Legacy(tok, vocab, 32, "random"), False))
        engines.append((Legacy(tok, vocab, 1, "target-first"), True))
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.only and out.exists() else None
    results: dict[str, Any] = {
        "machine": f"CPU: shared 2-core box ({platform.processor() or platform.machine()}), 1 torch thread",
        "tokenizer": "SmolLM2-135M-Instruct", "vocab": vocab, "reps": args.reps, "cases": {},
    }  # fmt: skip
    for case in cases():
        ids = list(tok.encode(case["target"], add_special_tokens=False))
        row: dict[str, Any] = {"spec": case["spec"], "target": case["target"], "num_tokens": len(ids), "engines": {}}
        if previous is not None:
            row["engines"] = dict(previous["cases"][case["name"]]["engines"])
        for eng, target_first in engines:
            try:
                r = run_case(eng, case, ids, vocab, args.reps, target_first)
            except Exception as e:  # an engine that cannot run a case is a finding, not a crash
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            row["engines"][eng.name] = r
            print(case["name"], eng.name, r, flush=True)
        results["cases"][case["name"]] = row
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
