"""Tensor parallelism over KV heads on CPU: 2 ranks over gloo give the same greedy tokens as 1 rank.

Model: the shipped `tiny-gqa` config (`redknot_rag/tiny.py`: 2 layers, 4 q heads over 2 KV heads,
random weights from a fixed seed, the default model's tokenizer), because the default model
(SmolLM2-135M) has 3 KV heads, which do not divide by 2 (`shard_config` refuses it; tested below).
Each rank is a spawned process; rank 0 runs the engine and the reuse layer, rank 1 follows.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import alternating_profile

from redknot_rag.ports import free_port

pytestmark = pytest.mark.timeout(600)  # a rank that hangs in a collective fails the test, not CI

PROMPTS = ["The capital of France is", "Once upon a time there was a small robot who", "1, 2, 3,"]
CHUNKS = [
    "Alice keeps the spare key of the lab under the blue flowerpot near the door.",
    "The quarterly report is due on the third Friday of March, says the manager.",
    "Bob's favourite dish is a mushroom risotto with parmesan and a little lemon.",
]
QUESTION = "Where is the spare key of the lab?"
POLICIES = ["naive", "cacheblend:0.3", "redknot:0.3", "redknot-local:0.3:2:8"]
NEW_TOKENS = 12


def _run_all(engine: Any, tmp: Path) -> dict[str, Any]:
    """Greedy plain prompts, then the RAG prompt under each reuse policy (store in `tmp`)."""
    from redknot_rag.rag.assemble import Assembler
    from redknot_rag.rag.layout import PromptLayout, make_fingerprint
    from redknot_rag.sampling import SamplingParams
    from redknot_rag.store import ChunkKVStore

    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tok = engine.tokenizer
    out: dict[str, Any] = {}
    reqs = engine.generate([tok.encode(p) for p in PROMPTS], greedy)
    out["plain"] = [r.output_ids for r in reqs]
    runner = engine.runner
    layout = PromptLayout.for_tokenizer(tok)
    store = ChunkKVStore(tmp / "kv", make_fingerprint(layout, runner.weights_fingerprint, runner.dtype))
    asm = Assembler(engine, layout, store, profile=alternating_profile(runner))
    chunks = [layout.chunk_ids(c) for c in CHUNKS]
    for name in POLICIES:
        req = asm.build(chunks, layout.question_ids(QUESTION), name, greedy)
        engine.submit(req)
        while not req.is_finished:
            engine.step()
        reuse = req.reuse
        out[name] = (req.output_ids, reuse.recomputed_tokens if reuse else None, reuse.stats if reuse else None)
    asm.close()
    out["free_pages"] = runner.free_pages
    out["num_pages"] = runner.num_pages
    return out


def _decode_messages(engine: Any, counted: list[int]) -> list[int]:
    """Control messages rank 0 sends in each decode step of 4 sequences (`counted[0]`: messages so far)."""
    from redknot_rag.sampling import SamplingParams

    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = [engine.make_request(engine.tokenizer.encode(p), greedy) for p in PROMPTS + ["x y z"]]
    for r in reqs:
        engine.submit(r)
    engine.step()  # the prefill step
    per_step = []
    while not all(r.is_finished for r in reqs):
        before = counted[0]
        engine.step()
        per_step.append(counted[0] - before)
    return per_step


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

        init_from_env("cpu")
        cfg = EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.02)
        runner = TPRunner(cfg, load_model("tiny-gqa"))
        if rank == 0:
            counted = [0]
            send = dist.broadcast_object_list

            def counting(*a: Any, **kw: Any) -> Any:
                counted[0] += 1
                return send(*a, **kw)

            dist.broadcast_object_list = counting  # every control message goes through it
            try:
                engine = Engine(runner=runner)
                out = _run_all(engine, Path(tmp))
                out["decode_messages"] = _decode_messages(engine, counted)
            finally:
                runner.close()
            out["info"] = runner.info()
            results.put(("ok", out))
        else:
            runner.follow()
            results.put(("follower", {"free_pages": runner.free_pages, "seqs": sorted(runner._seqs)}))
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


@pytest.fixture(scope="module")
def tp1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine

    torch.manual_seed(0)
    engine = Engine(EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.02))
    return _run_all(engine, tmp_path_factory.mktemp("tp1"))


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory, tp1: dict[str, Any]) -> dict[str, Any]:
    tmp = str(tmp_path_factory.mktemp("tp2"))
    return _spawn_ranks(_rank, 2, lambda r, port, results: (r, 2, port, tmp, results), timeout=240)


def _spawn_ranks(target: Any, size: int, args: Any, timeout: float) -> dict[str, Any]:
    """Run `target(*args(rank, port, results))` in `size` spawned processes; each puts one `(kind, value)` on
    `results` ("error" fails the test). Returns the values by kind; every process is joined or killed."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=args(r, port, results)) for r in range(size)]
    for p in procs:
        p.start()
    got: dict[str, Any] = {}
    try:
        for _ in range(size):
            kind, val = results.get(timeout=timeout)
            if kind == "error":
                pytest.fail(val)
            got[kind] = val
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got


def test_tp2_greedy_equals_tp1(tp1: dict[str, Any], tp2: dict[str, Any]) -> None:
    out = tp2["ok"]
    assert out["info"]["tp_size"] == 2 and out["info"]["kv_heads_per_rank"] == 1
    assert out["plain"] == tp1["plain"]
    assert all(len(ids) == NEW_TOKENS for ids in out["plain"])


@pytest.mark.parametrize("policy", POLICIES)
def test_tp2_reuse_equals_tp1(tp1: dict[str, Any], tp2: dict[str, Any], policy: str) -> None:
    ids2, recomputed2, stats2 = tp2["ok"][policy]
    ids1, recomputed1, stats1 = tp1[policy]
    assert ids2 == ids1
    assert recomputed2 == recomputed1
    if policy != "naive":  # the selection signal was summed over both ranks: the same tokens
        assert recomputed1 > 0
        assert stats2["recomputed_positions"] == stats1["recomputed_positions"]


def test_tp2_ranks_stay_in_lockstep(tp1: dict[str, Any], tp2: dict[str, Any]) -> None:
    """Every page came back on both ranks, and the follower dropped its twins of dead objects."""
    out, follower = tp2["ok"], tp2["follower"]
    assert out["free_pages"] == out["num_pages"] == follower["free_pages"]
    assert tp1["free_pages"] == tp1["num_pages"]
    assert len(follower["seqs"]) < 8  # twins of sequences rank 0 dropped are forgotten (dozens were made)


def test_tp2_one_control_message_per_decode_step(tp2: dict[str, Any]) -> None:
    """A decode step of 4 sequences reaches the follower as one message (the batch with its page ops)."""
    steps = tp2["ok"]["decode_messages"]
    assert len(steps) >= 4 and set(steps) == {1}


def test_shard_refuses_what_does_not_divide(loaded_default: Any) -> None:
    from redknot_rag.tp import TPConfigError, shard_config

    with pytest.raises(TPConfigError, match="KV heads \\(3\\) do not divide by 2"):
        shard_config(loaded_default.config, 2)
    assert shard_config(loaded_default.config, 3).num_kv_heads == 1


def test_shard_weights_reassemble() -> None:
    """Column shards of q/k/v and gate/up, row shards of o/down: concatenated back, the full matrices."""
    from redknot_rag.loader import load_model
    from redknot_rag.tp import shard_config, shard_weights

    full = load_model("tiny-gqa")
    shards = [shard_weights(full.weights, full.config, r, 2) for r in range(2)]
    p = "model.layers.1."
    for name, dim in [("self_attn.k_proj", 0), ("mlp.up_proj", 0), ("self_attn.o_proj", 1), ("mlp.down_proj", 1)]:
        key = p + name + ".weight"
        assert torch.equal(torch.cat([s[key] for s in shards], dim=dim), full.weights[key])
    local = shard_config(full.config, 2)
    assert shards[1][p + "self_attn.q_proj.weight"].shape == (local.num_q_heads * local.head_dim, local.hidden_size)


def _wait_health(url: str, proc: Any, timeout: float = 240) -> None:
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("server did not come up")


def test_serve_tp2_http_on_rank0(tp1: dict[str, Any], tmp_path: Path) -> None:
    """`redknot serve --tp 2` starts rank 1 itself; /generate on rank 0 answers what TP=1 generates, and
    /ingest + /query (RAG with `redknot` reuse) run across both ranks."""
    import subprocess
    import sys

    import httpx

    from redknot_rag.loader import load_model

    port = free_port()
    cmd = [sys.executable, "-m", "redknot_rag.cli", "serve", "--tp", "2", "--model-path", "tiny-gqa"]
    cmd += ["--device", "cpu", "--dtype", "float32", "--cpu-kv-gib", "0.05", "--port", str(port)]
    cmd += ["--data-dir", str(tmp_path / "data")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc)
        tok = load_model("tiny-gqa").tokenizer
        body = {
            "input_ids": tok.encode(PROMPTS[1]),
            "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        }
        got = httpx.post(url + "/generate", json=body, timeout=60).json()
        assert got["output_ids"] == tp1["plain"][1]
        info = httpx.get(url + "/server_info", timeout=10).json()["engine"]
        assert info["tp_size"] == 2 and info["kv_heads_per_rank"] == 1
        docs = [{"doc_id": f"d{i}", "text": t} for i, t in enumerate(CHUNKS)]
        ing = httpx.post(url + "/ingest", json={"documents": docs}, timeout=120).json()["documents"]
        assert ing["kv_chunks"] == len(CHUNKS) and ing["kv_bytes"] > 0  # head-complete KV, gathered
        body = {"question": QUESTION, "top_k": 2, "reuse_policy": "redknot:0.3", "max_new_tokens": 4}
        ans = httpx.post(url + "/query", json=body, timeout=120).json()
        assert ans["usage"]["cached_tokens"] > 0 and ans["reuse"]["recomputed_tokens"] > 0
    finally:
        proc.terminate()
        rc = proc.wait(timeout=60)
    assert rc == 0, (tmp_path / "serve.log").read_text()[-2000:]


def test_serve_tp_refuses_heads_that_do_not_divide() -> None:
    """The default model has 3 KV heads: `--tp 2` fails before any rank starts, with the reason."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "redknot_rag.cli", "serve", "--tp", "2", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "KV heads (3) do not divide by 2" in out.stderr


def _graph_rank(rank: int, size: int, port: int, results: Any) -> None:
    """One rank on cuda:<rank> over NCCL: greedy decode with CUDA graphs; reports tokens and graph replays."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        import torch.distributed as dist

        from redknot_rag.config import EngineConfig
        from redknot_rag.engine import Engine
        from redknot_rag.sampling import SamplingParams
        from redknot_rag.tp import TPRunner, init_from_env

        init_from_env("cuda")
        runner = TPRunner(EngineConfig(model_path="tiny-gqa", device=f"cuda:{rank}"))
        if rank == 0:
            try:
                engine = Engine(runner=runner)
                greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
                reqs = engine.generate([engine.tokenizer.encode(p) for p in PROMPTS], greedy)
                out = {"ids": [r.output_ids for r in reqs], "replays": runner.graph_replays}
            finally:
                runner.close()
            results.put(("ok", out))
        else:
            runner.follow()
            results.put(("follower", {"replays": runner.graph_replays}))
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tp_decode_replays_cuda_graphs() -> None:
    """Under TP, decode replays CUDA graphs on every rank (the row-parallel all-reduces captured inside them).
    Two ranks where two GPUs are present; on one GPU a one-rank NCCL group still runs the TP code path
    (messages, captured collectives) and must give the plain runner's tokens."""
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.sampling import SamplingParams

    size = min(2, torch.cuda.device_count())
    got = _spawn_ranks(_graph_rank, size, lambda r, port, results: (r, size, port, results), timeout=400)
    assert got["ok"]["replays"] >= NEW_TOKENS - 1  # every decode step of the batch replayed a graph
    if size > 1:
        assert got["follower"]["replays"] == got["ok"]["replays"]  # the same replay decisions on every rank
        return
    engine = Engine(EngineConfig(model_path="tiny-gqa", device="cuda:0"))
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    plain = [r.output_ids for r in engine.generate([engine.tokenizer.encode(p) for p in PROMPTS], greedy)]
    assert got["ok"]["ids"] == plain
    assert engine.runner.graph_replays == got["ok"]["replays"]
