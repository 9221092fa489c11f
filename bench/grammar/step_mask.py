"""Per-step grammar mask cost for a batch of B constrained requests (B = 1, 16, 64) on CPU.

Part 1, the mask alone: B `GrammarProcessor`s at real matcher states (run.py's three cases, walked
part way), one logits row `[vocab]` each.
- per request (the old way): each processor fills its own `[1, ceil(vocab/32)]` mask and applies it
  to its row (xgrammar fill + numpy unpack + `torch.where`);
- batch: `StepGrammarMask`, one xgrammar batch fill into `[B, ceil(vocab/32)]` on the worker thread
  and one `apply_token_bitmask_inplace` over the `[B, vocab]` logits; then each processor's call
  (only its "anything left?" check).
Both include the processors' calls, as the engine makes them. `batch_ms` waits for the fill (thread
hand-off included); `batch_after_fill_ms` starts the clock once the fill is done, which is what the
engine step waits for when the forward hides the fill. Fill and apply are also timed alone.

Part 2, the engine step: B decode requests on the default model (SmolLM2-135M, fp32): step time
unconstrained, constrained with the batch mask (fill overlapped with the forward) and constrained
with per-request masks, over rounds that interleave the three modes. Per step, the probe also times
the mask work on the critical path (the wait for the fill after the forward, the apply, the
processors' calls) and the fill on the worker; the fill minus that wait ran hidden behind the forward.

    PYTHONPATH=$PWD python3 bench/grammar/run.py --batch [--batches 1,16,64] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
import xgrammar as xgr

from redknot_rag.engine.grammar import Grammar, GrammarBackend, GrammarProcessor, StepGrammarMask

# Part 2 grammars: none of them can end within the measured steps, so the batch stays B wide.
LONG_GRAMMARS = [
    Grammar("json_schema", json.dumps({"type": "object", "properties": {"notes": {"type": "string", "minLength": 400}},
                                       "required": ["notes"]})),
    Grammar("regex", r"(\d{3}-){60}\d{3}"),
    Grammar("ebnf", 'root ::= ("yes" | "no") (" " [a-z]+){60} "."'),
]  # fmt: skip


class _Req:
    def __init__(self, output_ids: list[int]) -> None:
        self.output_ids = output_ids


def _median_ms(fn: Any, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 3)


def mask_only(tok: Any, vocab: int, cases: list[dict], batch: int, reps: int) -> dict:
    """Part 1 for one batch size: per-request vs batch mask of `batch` processors, in ms per step."""
    backend = GrammarBackend(tok, vocab, (tok.eos_token_id,))
    procs: list[GrammarProcessor] = []
    reqs: list[_Req] = []
    for i in range(batch):
        case = cases[i % len(cases)]
        g = Grammar("json_schema" if case["kind"] == "json" else "regex", case["spec"])
        ids = list(tok.encode(case["target"], add_special_tokens=False))
        req = _Req(ids[: (i * 7) % len(ids)])  # each member at its own point of its grammar
        proc = backend.processor(g)
        assert proc.sync(req.output_ids)
        procs.append(proc)
        reqs.append(req)
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch))
    members = [(p, i, len(r.output_ids)) for i, (p, r) in enumerate(zip(procs, reqs))]

    def per_request() -> list[torch.Tensor]:
        for p in procs:
            p._step_n = -1  # no batch mask this step
        return [p(r, logits[i]) for i, (p, r) in enumerate(zip(procs, reqs))]

    work = logits.clone()

    def batched() -> list[torch.Tensor]:
        work.copy_(logits)  # the engine masks the step's logits in place; ~B*0.2 MB copy, also in the timing
        StepGrammarMask(members, batch, vocab).start().apply(work)
        return [p(r, work[i]) for i, (p, r) in enumerate(zip(procs, reqs))]

    ref, got = per_request(), batched()
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), "batch mask differs from per-request masks"
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    filler = xgr.BatchGrammarMatcher(max_threads="auto")
    matchers = [p.matcher for p in procs]
    copy_ms = _median_ms(lambda: work.copy_(logits), reps)

    def xgrammar_apply() -> None:
        xgr.apply_token_bitmask_inplace(work, bitmask, vocab_size=vocab)

    def fill_each() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    filled = StepGrammarMask(members, batch, vocab).start()
    filled.wait()

    def after_fill() -> float:
        """The batch path when the fill is already done (hidden behind the forward): apply + checks."""
        work.copy_(logits)
        m = StepGrammarMask(members, batch, vocab).start()
        m.wait()
        t0 = time.perf_counter()
        m.apply(work)
        for i, (p, r) in enumerate(zip(procs, reqs)):
            p(r, work[i])
        return time.perf_counter() - t0

    return {
        "per_request_ms": _median_ms(per_request, reps),
        "batch_ms": round(_median_ms(batched, reps) - copy_ms, 3),
        "batch_after_fill_ms": round(statistics.median(after_fill() for _ in range(reps)) * 1e3, 3),
        "fill_per_request_ms": _median_ms(fill_each, reps),
        "fill_batch_ms": _median_ms(lambda: filler.batch_fill_next_token_bitmask(matchers, bitmask), reps),
        "apply_batch_numpy_ms": _median_ms(lambda: filled.apply(work), reps),
        "apply_batch_xgrammar_ms": _median_ms(xgrammar_apply, reps),
    }  # fmt: skip


class _Probe:
    """Times, per engine step, the mask work on the step's critical path (patched in, then restored):
    the wait for the batch fill after the forward, the batch apply and the processors' calls; and the
    batch fill itself, which runs on the worker thread."""

    def __init__(self) -> None:
        self.saved = (
            xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask,
            StepGrammarMask.wait,
            StepGrammarMask.apply,
            GrammarProcessor.__call__,
        )
        self.now: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def _add(self, key: str, t0: float) -> None:
        self.now[key] = self.now.get(key, 0.0) + time.perf_counter() - t0

    def install(self) -> None:
        fill, wait, apply, call = self.saved
        probe = self

        def timed_fill(self: Any, *a: Any, **k: Any) -> None:
            t0 = time.perf_counter()
            fill(self, *a, **k)
            probe._add("fill", t0)

        def timed_wait(self: StepGrammarMask) -> bool:
            t0 = time.perf_counter()
            ok = wait(self)
            if not getattr(self, "_waited", False):  # the join right after the forward
                self._waited = True  # type: ignore[attr-defined]
                probe._add("exposed_wait", t0)
            return ok

        def timed_apply(self: StepGrammarMask, logits: torch.Tensor) -> None:
            t0 = time.perf_counter()
            apply(self, logits)
            probe._add("apply", t0)

        def timed_call(self: GrammarProcessor, req: Any, logits: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            out = call(self, req, logits)
            probe._add("processors", t0)
            return out

        xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask = timed_fill  # type: ignore[method-assign]
        StepGrammarMask.wait = timed_wait  # type: ignore[method-assign]
        StepGrammarMask.apply = timed_apply  # type: ignore[method-assign]
        GrammarProcessor.__call__ = timed_call  # type: ignore[method-assign]

    def restore(self) -> None:
        fill, wait, apply, call = self.saved
        xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask = fill  # type: ignore[method-assign]
        StepGrammarMask.wait = wait  # type: ignore[method-assign]
        StepGrammarMask.apply = apply  # type: ignore[method-assign]
        GrammarProcessor.__call__ = call  # type: ignore[method-assign]

    def end_step(self, seconds: float) -> None:
        self.steps.append({"step": seconds, **self.now})
        self.now = {}


def engine_steps(engine: Any, batch: int, mode: str, steps: int, probe: _Probe) -> None:
    """Part 2, one round of one batch size and mode ("none", "batch", "per_request"): `steps` decode
    steps of `batch` requests, each recorded by `probe`."""
    from redknot_rag.chat import chat_prompt_ids
    from redknot_rag.sampling import SamplingParams

    mc = engine.model_config
    backend = GrammarBackend.of(engine.tokenizer, mc.vocab_size, tuple(mc.eos_token_ids))
    reqs = []
    for i in range(batch):
        ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": f"Write note number {i}."}])
        req = engine.make_request(ids, SamplingParams(max_new_tokens=steps + 8, ignore_eos=mode == "none"))
        if mode != "none":
            req.logits_processor = backend.processor(LONG_GRAMMARS[i % len(LONG_GRAMMARS)])
        reqs.append(engine.submit(req))
    from redknot_rag.engine import driver as engine_driver

    saved = engine_driver.start_grammar_masks
    try:
        if mode == "per_request":
            engine_driver.start_grammar_masks = lambda built: None  # type: ignore[assignment]
        while not all(r.is_prefill_done for r in reqs):
            engine.step()
        for _ in range(2):  # warm-up decode steps
            engine.step()
        probe.now = {}
        probe.install()
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            probe.end_step(time.perf_counter() - t0)
            assert engine.last_step.num_decode == batch, "a request ended inside the measured steps"
    finally:
        probe.restore()
        engine_driver.start_grammar_masks = saved
        for r in reqs:
            engine.abort(r.rid)
        while engine.has_work():
            engine.step()


def _summary(probe: _Probe) -> dict[str, float]:
    """Medians over the recorded steps, in ms; `critical_mask_ms`: the mask work the step waited for."""
    keys = ("step", "fill", "exposed_wait", "apply", "processors")
    out = {f"{k}_ms": round(statistics.median(s.get(k, 0.0) for s in probe.steps) * 1e3, 3) for k in keys}
    crit = [s.get("exposed_wait", 0.0) + s.get("apply", 0.0) + s.get("processors", 0.0) for s in probe.steps]
    out["critical_mask_ms"] = round(statistics.median(crit) * 1e3, 3)
    hidden = [max(s.get("fill", 0.0) - s.get("exposed_wait", 0.0), 0.0) for s in probe.steps]
    out["hidden_fill_ms"] = round(statistics.median(hidden) * 1e3, 3)
    return out


def run(tok: Any, vocab: int, cases: list[dict], batches: list[int], steps: int, rounds: int, reps: int) -> dict:
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.loader import load_model

    result: dict[str, Any] = {"batches": batches, "mask_only": {}, "engine_step": {}}
    for b in batches:
        result["mask_only"][str(b)] = r = mask_only(tok, vocab, cases, b, reps)
        print("mask only, B =", b, r, flush=True)
    engine = Engine(
        EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.5),
        loaded=load_model(None, dtype=torch.float32, device="cpu"),
    )
    result["engine_model"] = "SmolLM2-135M-Instruct (Q4_1 dequantized), fp32"
    result["torch_threads"] = torch.get_num_threads()
    result["steps"] = steps
    result["rounds"] = rounds
    modes = ("none", "batch", "per_request")
    for b in batches:
        probes = {m: _Probe() for m in modes}
        for _ in range(rounds):  # modes interleaved: the shared box's load drifts hit all three alike
            for m in modes:
                engine_steps(engine, b, m, steps, probes[m])
        row = {m: _summary(probes[m]) for m in modes}
        result["engine_step"][str(b)] = row
        print("engine step, B =", b, row, flush=True)
    return result
