"""Time per output token at token 100, 500 and 1000 of one 1,000-token greedy output (CPU).

Issue #24: the engine re-decoded the whole output on every token (quadratic in the output length);
the incremental detokenizer makes the output stage's cost per token flat. Two numbers per position:

- `step_ms`: wall time between consecutive tokens (the whole engine step: forward + output stage;
  the forward's attention grows a little with the context on its own),
- `output_ms`: time inside the output stage's accept (detokenization, stop strings, streaming),
  measured by wrapping the method the tree under test has (`Engine._accept` before the split,
  `OutputStage.accept` after).

Each figure is the median over a window of 20 tokens ending at that position, over `--repeats` runs.
Run it against any tree: `PYTHONPATH=/tmp/before python bench/decode_output/run.py --label before`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _wrap_accept(engine, sink: list[float]):
    """Record the seconds of each accept call, wherever the tree under test keeps it; returns the undo."""
    target = getattr(engine, "output", None)
    name = "accept" if target is not None and hasattr(target, "accept") else "_accept"
    obj = target if name == "accept" else engine
    inner = getattr(obj, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            sink.append(time.perf_counter() - t)

    setattr(obj, name, timed)
    return lambda: delattr(obj, name)  # the instance attribute goes, the class's method is back


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model path (default: the project's default model)")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import redknot_rag
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.sampling import SamplingParams

    cfg = EngineConfig(model_path=args.model, device="cpu", dtype="float32", cpu_kv_gib=0.5)
    engine = Engine(cfg)
    prompt = engine.tokenizer.encode("Write a long story about a lighthouse keeper and the sea.")
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    positions = [p for p in (100, 500, 1000) if p <= args.tokens]
    step: dict[int, list[float]] = {p: [] for p in positions}
    output: dict[int, list[float]] = {p: [] for p in positions}
    for _ in range(args.repeats):
        acc: list[float] = []
        undo = _wrap_accept(engine, acc)
        (req,) = engine.generate([prompt], params)
        undo()
        times = req.token_times
        assert len(times) == args.tokens, len(times)
        gaps = [b - a for a, b in zip(times, times[1:])]  # gaps[i]: token i+1 → i+2
        for p in positions:
            step[p].append(statistics.median(gaps[p - 21 : p - 1]) * 1e3)
            output[p].append(statistics.median(acc[p - 20 : p]) * 1e3)
    result = {
        "label": args.label,
        "tree": str(Path(redknot_rag.__file__).resolve().parent.parent),
        "model": engine.runner.name,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "machine": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, shared",
        "torch_threads": torch.get_num_threads(),
        "step_ms": {str(p): round(statistics.median(v), 3) for p, v in step.items()},
        "output_ms": {str(p): round(statistics.median(v), 4) for p, v in output.items()},
    }
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.label] = result
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
