"""Control traffic of tensor parallelism per engine step, CPU gloo, TP=2 (tiny-gqa, fp32).

Rank 0 drives the engine; every control message it sends to the followers goes through
`torch.distributed.broadcast_object_list` on the control group. This script counts those calls (messages)
and the serialized payload bytes (what `_object_to_tensor` produces, i.e. the bytes on the wire besides
the 8-byte size header), per engine step, and tags each step by its batch (decode-only or not). It counts
from outside the code under test, so the same script measures any tree:

    PYTHONPATH=/tmp/tp_before python bench/tp/control_cpu.py --label before   # a worktree of the old HEAD
    python bench/tp/control_cpu.py --label after

and merges `{label: result}` into `bench/tp/control_cpu.json`. Scenarios: greedy decode of 1 and 8 plain
prompts, and of one RAG request assembled with `cacheblend:0.3` (its attached chunk segments + recompute);
messages/bytes of the RAG assembly (`Assembler.build`) are reported beside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

OUT = Path(__file__).with_name("control_cpu.json")
NEW_TOKENS = 16
PROMPT = "Once upon a time there was a small robot who"
CHUNKS = [
    "Alice keeps the spare key of the lab under the blue flowerpot near the door.",
    "The quarterly report is due on the third Friday of March, says the manager.",
]
QUESTION = "Where is the spare key of the lab?"


class Counter:
    """Wraps the two functions every control message passes through (rank 0 is the source)."""

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.messages = 0
        self.bytes = 0
        inner_bcast, inner_obj = dist.broadcast_object_list, c10d._object_to_tensor

        def bcast(*a: Any, **kw: Any) -> Any:
            self.messages += 1
            return inner_bcast(*a, **kw)

        def to_tensor(*a: Any, **kw: Any) -> Any:
            t, size = inner_obj(*a, **kw)
            self.bytes += int(size.sum())
            return t, size

        dist.broadcast_object_list = bcast
        c10d._object_to_tensor = to_tensor

    def mark(self) -> tuple[int, int]:
        return self.messages, self.bytes


def _steps(engine: Any, counter: Counter, reqs: list[Any], kinds: list[bool]) -> list[dict[str, Any]]:
    """Step until `reqs` finish; per step: decode-only?, messages, bytes."""
    out = []
    while not all(r.is_finished for r in reqs):
        kinds.clear()
        m0, b0 = counter.mark()
        engine.step()
        m1, b1 = counter.mark()
        out.append({"decode": bool(kinds) and all(kinds), "messages": m1 - m0, "bytes": b1 - b0})
    return out


def _summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    dec = [s for s in steps if s["decode"]]
    other = [s for s in steps if not s["decode"]]
    return {
        "decode_steps": len(dec),
        "decode_messages_per_step": statistics.mean(s["messages"] for s in dec) if dec else None,
        "decode_messages_max": max((s["messages"] for s in dec), default=None),
        "decode_bytes_per_step": statistics.mean(s["bytes"] for s in dec) if dec else None,
        "decode_bytes_max": max((s["bytes"] for s in dec), default=None),
        "other_steps": len(other),
        "other_messages": sum(s["messages"] for s in other),
        "other_bytes": sum(s["bytes"] for s in other),
    }


def _drive(engine: Any, counter: Counter, tmp: Path) -> dict[str, Any]:
    from redknot_rag.rag.assemble import Assembler
    from redknot_rag.rag.layout import PromptLayout, make_fingerprint
    from redknot_rag.sampling import SamplingParams
    from redknot_rag.store import ChunkKVStore

    runner = engine.runner
    kinds: list[bool] = []
    forward = runner.forward

    def tagged(batch: Any, *a: Any, **kw: Any) -> Any:
        kinds.append(all(s.q_len == 1 for s in batch.seqs))
        return forward(batch, *a, **kw)

    runner.forward = tagged  # the engine's step calls runner.forward(batch)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tok = engine.tokenizer
    res: dict[str, Any] = {}
    for b in (1, 8):
        reqs = [engine.make_request(tok.encode(f"{PROMPT} {i}"), greedy) for i in range(b)]
        for r in reqs:
            engine.submit(r)
        res[f"plain_batch{b}"] = _summary(_steps(engine, counter, reqs, kinds))
    layout = PromptLayout.for_tokenizer(tok)
    store = ChunkKVStore(tmp / "kv", make_fingerprint(layout, runner.weights_fingerprint, runner.dtype))
    asm = Assembler(engine, layout, store)
    chunks = [layout.chunk_ids(c) for c in CHUNKS]
    asm.build(chunks, layout.question_ids(QUESTION), "naive", greedy)  # warm: chunks prefilled and stored
    m0, b0 = counter.mark()
    req = asm.build(chunks, layout.question_ids(QUESTION), "cacheblend:0.3", greedy)
    m1, b1 = counter.mark()
    engine.submit(req)
    rag = _summary(_steps(engine, counter, [req], kinds))
    res["rag_cacheblend_batch1"] = {**rag, "assembly_messages": m1 - m0, "assembly_bytes": b1 - b0}
    asm.close()
    runner.forward = forward
    return res


def _rank(rank: int, size: int, port: int, tmp: str, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        from redknot_rag.config import EngineConfig
        from redknot_rag.engine import Engine
        from redknot_rag.loader import load_model
        from redknot_rag.tp import TPRunner, init_from_env

        counter = Counter()
        init_from_env("cpu")
        cfg = EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.02)
        runner = TPRunner(cfg, load_model("tiny-gqa"))
        if rank == 0:
            try:
                out = _drive(Engine(runner=runner), counter, Path(tmp))
            finally:
                runner.close()
            results.put(("ok", out))
        else:
            runner.follow()
            results.put(("follower", None))
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


def main() -> None:
    from redknot_rag.ports import free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="key in control_cpu.json (before / after)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, 2, port, tmp, results)) for r in range(2)]
        for p in procs:
            p.start()
        got: dict[str, Any] = {}
        for _ in range(2):
            kind, val = results.get(timeout=600)
            if kind == "error":
                raise SystemExit(val)
            got[kind] = val
        for p in procs:
            p.join(timeout=60)
    import redknot_rag

    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data["machine"] = f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), gloo, TP=2"
    data["model"] = "tiny-gqa (2 layers, 4 q heads, 2 KV heads), fp32, torch backend"
    data["new_tokens"] = NEW_TOKENS
    data[args.label] = {"tree": str(Path(redknot_rag.__file__).parent.parent), **got["ok"]}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data[args.label], indent=1))


if __name__ == "__main__":
    main()
