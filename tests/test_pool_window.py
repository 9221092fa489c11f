"""Per-head windows in the KV pool (issue 23): local blocks keep sink + window, pages are released as the
window slides, attention reads only what a block keeps, the pool returns to baseline, Gemma-3 unchanged."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import alternating_profile

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend's test runs its kernels on the CPU

from redknot_rag.kvcache import KVSegment, PageAllocator, SeqKV
from redknot_rag.window import PoolWindows, choose_pool_windows

PS = 4


def _windows(nl: int, nh: int, window: int, sink: int) -> PoolWindows:
    local = torch.tensor([[h % 2 == 0 for h in range(nh)] for _ in range(nl)])  # even heads local
    return PoolWindows(local, sink, window, "profile", False)


def test_local_pages_released_as_window_slides():
    nl, nh, window, sink = 2, 2, 8, 4
    alloc = PageAllocator(1000)
    kv = SeqKV(nl, nh, PS, windows=_windows(nl, nh, window, sink))
    held = []
    for t in range(0, 64):  # decode-like: one token per step
        kv.append(torch.tensor([t]), alloc)
        kv.slide(alloc)
        held.append(alloc.num_used)
        glob, loc = kv.held_pages()
        assert glob + loc == alloc.num_used == kv.private_pages_held()
    # 64 tokens = 16 pages per block: 2 global blocks keep all 16, 2 local keep sink page + window pages
    T = 64
    cut = T - window + 1
    kept_local = sum(1 for p in range(16) if not (p * PS >= sink and (p + 1) * PS <= cut))
    assert alloc.num_used == 2 * 16 + 2 * kept_local and kept_local <= 1 + -(-window // PS) + 1
    assert held[-1] < 4 * 16  # a dense pool would hold 64 pages
    # local blocks see only the kept tokens; global blocks see everything
    vis = kv.visible[:, :, :T]
    assert vis[:, 1].all() and not vis[:, 0, sink : cut - PS].any()
    assert vis[:, 0, :sink].all() and vis[:, 0, -window:].all()
    kv.release(alloc)
    assert alloc.num_used == 0 and (alloc.refcount == 0).all()


def test_shared_segment_pages_stop_being_referenced_not_freed():
    nl, nh, window, sink = 2, 2, 8, 0
    alloc = PageAllocator(1000)
    seg = KVSegment(torch.from_numpy(alloc.allocate(nl * nh * 8)).view(nl, nh, 8), 32, is_shared=True)
    base = alloc.refcount.copy()
    kv = SeqKV(nl, nh, PS, windows=_windows(nl, nh, window, sink))
    kv.attach(seg, torch.arange(32), alloc)
    kv.append(torch.arange(32, 36), alloc)  # T = 36: tokens < 29 are past the window
    dropped = kv.slide(alloc)
    assert dropped > 0
    pages = seg.pages.numpy()
    # the local blocks' early chunk pages are back to the store's one reference; global ones still +1
    assert (alloc.refcount[pages[:, 0, :4]] == 1).all() and (alloc.refcount[pages[:, 1, :]] == 2).all()
    assert (alloc.refcount[pages[:, 0, -1]] == 2).all()  # inside the window
    kv.release(alloc)
    assert (alloc.refcount == base).all()  # only the store's references remain
    alloc.decref(pages, unique=True)
    assert alloc.num_used == 0


def test_reservation_bounds_what_a_sequence_holds():
    nl, nh, window, sink = 2, 2, 8, 4
    win = _windows(nl, nh, window, sink)
    alloc = PageAllocator(10_000)
    kv = SeqKV(nl, nh, PS, windows=win)
    chunk, total = 16, 200
    glob, loc = win.pages_for(total, PS, chunk)
    peak = 0
    for t0 in range(0, total, chunk):
        kv.append(torch.arange(t0, min(total, t0 + chunk)), alloc)
        peak = max(peak, kv.private_pages_held())
        kv.slide(alloc)
    assert peak <= glob + loc < 4 * -(-total // PS)
    kv.release(alloc)
    assert alloc.num_used == 0


def test_choose_pool_windows_modes(loaded_default):
    cfg = loaded_default.config
    win, why = choose_pool_windows("auto", cfg, None)
    assert win is None and "opt-in" in why
    assert choose_pool_windows("off", cfg, None)[0] is None
    with pytest.raises(ValueError, match="profile"):
        choose_pool_windows("profile", cfg, None)
    with pytest.raises(ValueError, match="unknown"):
        choose_pool_windows("sometimes", cfg, None)


# ---- the model: compressed logits == the torch reference masking the same keys -------------------------


@pytest.fixture(scope="module")
def tiny_engine():
    from redknot_rag.config import EngineConfig
    from redknot_rag.loader import load_model
    from redknot_rag.tiny import TINY_GQA

    loaded = load_model(TINY_GQA, dtype=torch.float32, device="cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.01, page_size=PS, max_prefill_tokens=512)
    return _engine_cls()(cfg, loaded=loaded)


def _engine_cls():
    """The Engine class (redknot_rag.engine is becoming a package; its driver module holds the class)."""
    import importlib

    import redknot_rag.engine as eng

    return getattr(eng, "Engine", None) or importlib.import_module("redknot_rag.engine.driver").Engine


def _reference_mask(kv: SeqKV, local: torch.Tensor, window: int, sink: int) -> None:
    """Mask, on a dense sequence, the keys a windowed pool released (pages wholly in [sink, T - window + 1))."""
    t = kv.num_tokens
    cut = t - window + 1
    page = torch.arange(t) // PS
    gone = (page * PS >= sink) & ((page + 1) * PS <= cut)  # [T]
    vis = kv._ensure_visible()
    vis[:, :, :t] &= ~(local[:, :, None] & gone[None, None, :])


def test_compressed_logits_equal_masked_reference(tiny_engine):
    runner = tiny_engine.runner
    win = PoolWindows.from_profile(alternating_profile(runner, window=12), sink=4)
    vocab = runner.model_config.vocab_size
    ids = torch.randint(0, vocab, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    mc = runner.model_config
    comp = SeqKV(mc.num_layers, mc.num_kv_heads, PS, windows=win)
    ref = SeqKV(mc.num_layers, mc.num_kv_heads, PS)
    plain = SeqKV(mc.num_layers, mc.num_kv_heads, PS)
    free0 = runner.allocator.num_free
    outs: dict[str, list[torch.Tensor]] = {"comp": [], "ref": [], "plain": []}
    steps = [(0, 40), (40, 80), *[(t, t + 1) for t in range(80, 150)]]  # chunked prefill, then decode
    for a, b in steps:
        pos = torch.arange(a, b)
        outs["comp"].append(runner.append_forward(comp, ids[a:b], pos, logits=True).logits)
        outs["ref"].append(runner.append_forward(ref, ids[a:b], pos, logits=True).logits)
        outs["plain"].append(runner.append_forward(plain, ids[a:b], pos, logits=True).logits)
        runner.slide(comp)
        _reference_mask(ref, win.local, win.window, win.sink)
    got, want, dense = (torch.cat(outs[k]) for k in ("comp", "ref", "plain"))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (got - dense).abs().max() > 1e-3  # the windows do change what local heads read
    assert sum(comp.held_pages()) < sum(ref.held_pages())  # and the pool holds fewer pages
    for kv in (comp, ref, plain):
        runner.release(kv)
    assert runner.allocator.num_free == free0


def test_pool_returns_to_baseline_after_1000_requests(tiny_engine):
    from redknot_rag.sampling import SamplingParams

    runner = tiny_engine.runner
    saved = runner.pool_windows
    runner.pool_windows = PoolWindows.from_profile(alternating_profile(runner, window=8), sink=4)
    try:
        free0 = runner.allocator.num_free
        gen = torch.Generator().manual_seed(2)
        vocab = runner.model_config.vocab_size
        lens = torch.randint(24, 48, (1000,), generator=gen).tolist()  # > sink + window: every one slides
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
        dropped_before = int((runner.allocator.refcount == 0).sum())
        released0 = runner.pages_released
        reqs = tiny_engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert all(len(r.output_ids) == 2 and r.error is None for r in reqs)
        assert runner.allocator.num_free == free0 == dropped_before
        assert runner.pages_released > released0  # the engine slid the windows as the requests ran
        assert (runner.allocator.refcount >= 0).all()
    finally:
        runner.pool_windows = saved


def test_windows_admit_more_long_sequences(tiny_engine):
    runner = tiny_engine.runner
    saved = runner.pool_windows
    try:
        runner.pool_windows = None
        dense = runner.reservation_pages(20000)
        runner.pool_windows = PoolWindows.from_profile(alternating_profile(runner, window=8), sink=4)
        comp = runner.reservation_pages(20000)
    finally:
        runner.pool_windows = saved
    assert comp < 0.6 * dense  # half the blocks are local: about half the pages
    assert runner.pool.num_pages // comp > runner.pool.num_pages // dense


def test_release_skips_released_pages_under_random_schedules():
    rng = np.random.default_rng(0)
    for trial in range(20):
        nl, nh = 2, 3
        window, sink = int(rng.integers(1, 20)), int(rng.integers(0, 9))
        alloc = PageAllocator(5000)
        seg = KVSegment(torch.from_numpy(alloc.allocate(nl * nh * 5)).view(nl, nh, 5), 18, is_shared=True)
        kv = SeqKV(nl, nh, PS, windows=_windows(nl, nh, window, sink))
        if trial % 2:
            kv.attach(seg, torch.arange(18), alloc)
        t = kv.num_tokens
        for _ in range(int(rng.integers(1, 12))):
            n = int(rng.integers(1, 9))
            kv.append(torch.arange(t, t + n), alloc)
            t += n
            kv.slide(alloc)
        kv.release(alloc)
        alloc.decref(seg.pages.numpy(), unique=True)
        assert alloc.num_used == 0 and (alloc.refcount == 0).all()


# ---- Gemma-3: its sliding layers through the pool windows give the same logits ----------------------


def _gemma_installed() -> bool:
    import importlib.util

    from redknot_rag.loader import GEMMA3_270M_PACKAGE

    pkgs = [GEMMA3_270M_PACKAGE] + [f"{GEMMA3_270M_PACKAGE}_part{i}" for i in range(1, 5)]
    return all(importlib.util.find_spec(p) is not None for p in pkgs)


@pytest.mark.skipif(not _gemma_installed(), reason="Gemma-3-270M GGUF packages are not installed")
def test_gemma3_sliding_layers_release_pages_and_keep_logits():
    from redknot_rag.config import EngineConfig
    from redknot_rag.loader import load_model
    from redknot_rag.runner import KVRunner

    gemma = load_model("gemma3-270m", dtype=torch.float32, device="cpu")
    runner = KVRunner(EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.1, attention_backend="torch"), gemma)
    win = runner.pool_windows
    assert win is not None and win.source == "architecture" and win.exact and win.num_local == 15  # auto: on
    mc = runner.model_config
    ids = torch.randint(0, mc.vocab_size, (650,), generator=torch.Generator().manual_seed(3)).tolist()
    comp = runner.new_seq_kv()
    dense = SeqKV(mc.num_layers, mc.num_kv_heads, runner.page_size)
    free0 = runner.allocator.num_free
    steps = [(a, a + 160) for a in range(0, 640, 160)] + [(t, t + 1) for t in range(640, 644)]  # past 512
    got, want = [], []
    for a, b in steps:
        pos = torch.arange(a, b)
        got.append(runner.append_forward(comp, ids[a:b], pos, logits=True).logits)
        want.append(runner.append_forward(dense, ids[a:b], pos, logits=True).logits)
        runner.slide(comp)
    diff = (torch.cat(got) - torch.cat(want)).abs().max().item()
    assert diff == 0.0, diff  # the sliding layers never read a released key: the same arithmetic
    glob, loc = comp.held_pages()
    dense_pages = -(-644 // runner.page_size)
    assert loc < 15 * dense_pages and glob == 3 * dense_pages
    runner.release(comp)
    runner.release(dense)
    assert runner.allocator.num_free == free0


def test_gpu_bench_tiny_smoke(tmp_path):
    """bench/pool/gpu.py --tiny on the CPU: the compressed pool holds more sequences, each with fewer bytes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "pool_tiny.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "pool" / "gpu.py"
    cmd = [sys.executable, str(script), "--tiny", "--steps", "2", "--batches", "1,2", "--context", "256"]
    subprocess.run([*cmd, "--out", str(out)], check=True, timeout=600, capture_output=True)
    res = json.loads(out.read_text())
    d, c = res["arms"]["dense"], res["arms"]["compressed"]
    assert c["held_at_once"] > d["held_at_once"] >= 2 and res["summary"]["bytes_ratio"] < 0.8
    assert c["decode"]["2"]["fits"] and c["decode"]["2"]["tokens_per_s"] > 0 and c["prefill"]["prefill_s"] > 0


def test_pool_window_stats_per_head_class(tiny_engine):
    runner = tiny_engine.runner
    saved = runner.pool_windows
    runner.pool_windows = PoolWindows.from_profile(alternating_profile(runner, window=8), sink=4)
    try:
        kv = runner.new_seq_kv()
        runner.append_forward(kv, list(range(100)), torch.arange(100))
        runner.slide(kv)
        st = runner.pool_window_stats()
        per_page = runner.pool_bytes // runner.num_pages
        assert st["global_bytes"] == 2 * 25 * per_page  # 2 global blocks x 25 pages
        assert 0 < st["local_bytes"] < st["global_bytes"] and st["saved_bytes"] > 0
        assert st["local_bytes"] + st["saved_bytes"] == st["global_bytes"]  # dense = held + released
        assert runner.info()["pool_windows"]["local_blocks"] == 2
        runner.release(kv)
        assert runner.pool_window_stats()["global_bytes"] == 0
    finally:
        runner.pool_windows = saved


def test_triton_reads_short_tables_and_matches_torch(tiny_engine):
    """The Triton path over a windowed sequence: each local (layer, kv head) row lists only the keys it keeps
    (its table is short), and the logits match the torch reference over the same sequence."""
    pytest.importorskip("triton")
    from redknot_rag.attention.triton_plan import build_plan

    runner = tiny_engine.runner
    win = PoolWindows.from_profile(alternating_profile(runner, window=12), sink=4)
    mc = runner.model_config
    tb = runner.backend_named("triton")
    ids = torch.randint(0, mc.vocab_size, (90,), generator=torch.Generator().manual_seed(4)).tolist()
    a_kv = SeqKV(mc.num_layers, mc.num_kv_heads, PS, windows=win)
    b_kv = SeqKV(mc.num_layers, mc.num_kv_heads, PS, windows=win)
    steps = [(0, 40), (40, 80), *[(t, t + 1) for t in range(80, 84)]]
    for a, b in steps:
        pos = torch.arange(a, b)
        got = runner.append_forward(a_kv, ids[a:b], pos, backend=tb, logits=True).logits
        want = runner.append_forward(b_kv, ids[a:b], pos, logits=True).logits
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
        runner.slide(a_kv)
        runner.slide(b_kv)
    slots = runner.append(a_kv, torch.tensor([84]))
    from redknot_rag.batch import ForwardBatch

    plan = build_plan(
        ForwardBatch(torch.tensor([1]), torch.tensor([84]), [a_kv.slice(0, 1, slots)], torch.tensor([0])),
        mc.num_layers, mc.num_kv_heads, torch.device("cpu"),
    )  # fmt: skip
    rows = (plan.kv_indptr[:, 1:] - plan.kv_indptr[:, :-1]).long()  # [L, Hkv] keys each row reads
    assert (rows[:, 1] == 85).all()  # global heads: every token
    assert (rows[:, 0] < 85 - 40).all()  # local heads: sink page + window pages only
    runner.release(a_kv)
    runner.release(b_kv)


def test_reused_context_through_the_engine_releases_shared_references(tiny_engine):
    """A request whose context is an attached stored segment (the /query reuse path, with a pending
    recompute): its local blocks drop their references to the segment's early pages as the engine runs;
    the store's reference keeps them; everything returns to baseline."""
    from redknot_rag.request import ReusedContext
    from redknot_rag.sampling import SamplingParams

    runner = tiny_engine.runner
    saved = runner.pool_windows
    runner.pool_windows = PoolWindows.from_profile(alternating_profile(runner, window=8), sink=4)
    try:
        mc = runner.model_config
        free0 = runner.free_pages
        n = 64
        g = torch.Generator().manual_seed(5)
        k = torch.randn(mc.num_layers, mc.num_kv_heads, n, mc.head_dim, generator=g)
        seg = runner.write_segment(k, torch.randn(k.shape, generator=g))
        kv = runner.new_seq_kv()
        runner.attach(kv, seg, torch.arange(n))
        prompt = torch.randint(0, mc.vocab_size, (n + 12,), generator=g).tolist()
        req = tiny_engine.make_request(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        req.reuse = ReusedContext(kv, n, n, 2, "test", pending=torch.tensor([3, 40]))
        released0 = runner.pages_released
        tiny_engine.submit(req)
        while not req.is_finished:
            tiny_engine.step()
        assert req.error is None and len(req.output_ids) == 6
        assert runner.pages_released > released0
        pages = seg.pages.numpy()
        assert (runner.allocator.refcount[pages] == 1).all()  # only the store's reference is left
        runner.drop_segment(seg)
        assert runner.free_pages == free0
    finally:
        runner.pool_windows = saved
