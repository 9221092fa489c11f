"""FlashInfer for local-head visibility (`redknot_rag/attention/flashinfer_heads.py`) against the torch reference.

Sequences assembled with a head profile: local (layer, kv head) rows see the anchor sink + the last `window`
context tokens + the question, global rows see everything; which heads are local differs per layer. The
question's tail queries run per row: global rows as tail-causal paged requests (in-kernel RoPE), local rows
over their gathered visible keys (ragged, causal, K rotated at true positions). On the CPU the FlashInfer
calls are emulated in torch (`emulate_prefill`, `emulate_ragged`), fp32, tolerance 1e-4 on O(1) outputs;
the GPU test runs the real kernels in bf16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_fixtures import layer_errors, random_pool, reuse_seq, tiny_config  # noqa: E402

from redknot_rag.attention import TorchBackend  # noqa: E402
from redknot_rag.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from redknot_rag.batch import ForwardBatch  # noqa: E402
from redknot_rag.kvcache import PageAllocator, SeqKV  # noqa: E402
from redknot_rag.rope import Rotary  # noqa: E402

cpu_emulation = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation; the gpu test covers a GPU host")

# [L=3, Hkv=2] local rows: layer 0 head 1, layer 1 both heads, layer 2 none (mixed local/global layers)
MIXED = torch.tensor([[False, True], [True, True], [False, False]])


def make_batch(cfg, pool, alloc, specs: list[dict]) -> ForwardBatch:
    seqs, pos = [], []
    q0 = 0
    for sp in specs:
        s, qp = reuse_seq(cfg, pool, alloc, q_start=q0, **sp)
        seqs.append(s)
        pos.append(qp)
        q0 += s.q_len
    return ForwardBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (q0,)),
        positions=torch.cat(pos),
        seqs=seqs,
        logit_rows=torch.tensor([s.q_start + s.q_len - 1 for s in seqs]),
    )


def compare(
    cfg, pool, batch: ForwardBatch, emulate: bool, atol: float, local_decode: bool = True, part_a: str = "rotated"
) -> tuple[FlashInferBackend, float]:
    dev, dt = pool.device, pool.dtype
    rot = Rotary(cfg, dev)
    ref = TorchBackend(cfg, pool, rot)
    be = FlashInferBackend(cfg, pool, rot, emulate=emulate)
    be.inside = "split"  # the FlashInfer mapping under test (not the Triton tiles of inside="tiles")
    be.block = 8 if emulate else 64
    be.local_decode = local_decode
    be.local_inside = True  # the split path under test (the default sends such batches to Triton)
    be.part_a = part_a
    be.plan(batch)
    ref.plan(batch)
    errs = layer_errors(cfg, be, ref, batch.num_tokens, dev, dt)
    assert max(errs) < atol, (be.path, errs)
    return be, max(errs)


def _setup():
    cfg = tiny_config(head_dim=32, group=2, num_kv_heads=2, num_layers=3)
    pool = random_pool(cfg, 4000, 4, torch.float32, "cpu")
    return cfg, pool, PageAllocator(4000)


def seq(segments, question, sink=8, window=6, local=MIXED, recompute=()):
    return dict(segments=segments, question=question, sink=sink, window=window, local=local, recompute=recompute)


@cpu_emulation
@pytest.mark.parametrize(
    "specs,groups",
    [
        ([seq([8, 21, 13], 5)], 3),  # mixed layers: 1, 2 and 0 local heads (three row shapes)
        ([seq([8, 20, 12], 4)], 3),  # page-aligned: global rows over whole pages
        ([seq([8, 21, 13], 1)], 3),  # question of 1 token
        ([seq([8, 21, 13], 5, window=200)], 1),  # window longer than the context: every row global
        ([seq([8, 21, 13], 5, window=0)], 3),  # window 0: local rows see the sink + the question
        ([seq([8, 21, 13], 3, sink=0)], 3),  # no sink: the window + the question
        ([seq([8, 21, 13], 5), seq([8, 16], 3, window=9), seq([8, 30], 7, local=None)], 3),  # several slices
        ([seq([8, 21, 13], 5, local=torch.tensor([[True, False], [False, True], [True, False]]))], 1),
    ],
)
def test_local_heads_tail_on_flashinfer(specs, groups):
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, specs)
    be, _ = compare(cfg, pool, batch, emulate=True, atol=1e-4)
    p = be.plan_fi
    assert p is not None and p.heads is not None and p.causal is None
    assert len(p.heads.groups) == groups  # a plan per row shape, not per layer
    has_local = any(g.loc_qo_indptr is not None for g in p.heads.groups)
    assert be.path == ("flashinfer+local-ragged" if has_local else "flashinfer")


@cpu_emulation
def test_local_rows_list_only_their_visible_keys():
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, [seq([8, 21, 13], 5)])
    be = FlashInferBackend(cfg, pool, Rotary(cfg, "cpu"), emulate=True)
    be.plan(batch)
    p = be.plan_fi
    assert p is not None and p.heads is not None
    grp = p.heads.groups[p.heads.group_of[1]]  # layer 1: both heads local
    rows = grp.rows[1]
    assert grp.glob_qo_indptr is None and grp.loc_kv_indptr is not None
    # sink 8 + window 6 of the 42-token context + the 5 question tokens, per head
    assert grp.loc_kv_indptr.tolist() == [0, 19, 38]
    want = torch.cat([torch.arange(8), torch.arange(36, 47)])
    assert torch.equal(rows.loc_pos[:19], want) and torch.equal(rows.loc_pos[19:], want)
    assert torch.equal(rows.loc_slots[:19], batch.seqs[0].kv_slots[1, 0, want])


@cpu_emulation
def test_fresh_and_fully_visible_slices_beside_local_heads():
    """A fresh prompt (SDPA) and a fully visible reuse slice with recomputed tokens (part A/B) in the batch of
    a local-head question: each path serves its slices."""
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, [seq([8, 21, 13], 5), seq([8, 21], 4, local=None, recompute=(9, 10, 20))])
    kv = SeqKV(cfg.num_layers, cfg.num_kv_heads, pool.page_size, "cpu")  # a fresh 12-token prompt
    fresh = kv.slice(batch.num_tokens, 12, kv.append(torch.arange(12), alloc))
    batch = ForwardBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (batch.num_tokens + 12,)),
        positions=torch.cat([batch.positions, torch.arange(12)]),
        seqs=[*batch.seqs, fresh],
        logit_rows=torch.cat([batch.logit_rows, torch.tensor([batch.num_tokens + 11])]),
    )
    be, _ = compare(cfg, pool, batch, emulate=True, atol=1e-4)
    assert be.path == "sdpa+flashinfer+local-ragged+triton-inside"


@cpu_emulation
def test_decode_only_batches_with_local_heads_stay_on_triton_by_default():
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, [seq([8, 21, 13], 1), seq([8, 16], 1, local=None)])
    assert compare(cfg, pool, batch, emulate=True, atol=1e-4, local_decode=False)[0].path == "triton"
    batch = make_batch(cfg, pool, alloc, [seq([8, 21, 13], 1), seq([8, 16], 2, local=None)])  # a prefill in it
    assert compare(cfg, pool, batch, emulate=True, atol=1e-4, local_decode=False)[0].path == "flashinfer+local-ragged"


@cpu_emulation
def test_too_many_local_slices_fall_back_to_triton():
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, [seq([8, 13], 2) for _ in range(3)])
    rot = Rotary(cfg, "cpu")
    be = FlashInferBackend(cfg, pool, rot, emulate=True)
    be.max_local_slices = 2
    be.plan(batch)
    assert be.path == "triton"
    be.max_local_slices = 3
    be.plan(batch)
    assert be.path == "flashinfer+local-ragged"


@cpu_emulation
@pytest.mark.parametrize(
    "specs",
    [
        [seq([8, 21, 13], 5, recompute=(9, 10, 30))],  # recompute + question: inside and tail queries
        [seq([8, 21, 13], 0, recompute=(9, 10, 30, 38, 40))],  # recompute only, some in the window
        [seq([8, 21, 13], 3, recompute=(2, 17, 39, 40, 41), window=0)],  # window 0, a recomputed anchor token
        [seq([8, 21, 13], 4, recompute=(12, 35)), seq([8, 16], 3, window=9), seq([8, 30], 2, local=None,
                                                                                  recompute=(15, 16))],
    ],
)  # fmt: skip
@pytest.mark.parametrize("part_a", ["rotated", "pre-rotated-q"])
def test_local_heads_with_inside_queries(specs, part_a):
    """Recompute (queries inside the context) on slices with local heads: global rows on part A/B and the
    tail path, local rows (every query) on Triton over their visible keys; with `local_inside` off, all Triton."""
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, specs)
    be, _ = compare(cfg, pool, batch, emulate=True, atol=1e-4, part_a=part_a)
    assert "triton-local-inside" in be.path and be.path.startswith("flashinfer")
    # rotated part A skips heads local in every part-A slice (a fully visible slice with recompute needs all)
    all_heads = part_a != "rotated" or any(sp["local"] is None and sp["recompute"] for sp in specs)
    assert (be._pre_heads is None) == all_heads
    be.local_inside = False
    be.plan(batch)
    assert be.path == "triton"


@cpu_emulation
def test_local_row_blind_to_its_tail_falls_back_to_triton():
    cfg, pool, alloc = _setup()
    batch = make_batch(cfg, pool, alloc, [seq([8, 21, 13], 5)])
    vis = batch.seqs[0].kv_visible
    assert vis is not None
    vis[0, 1, -2] = False  # a local row that does not see a question token: tail alignment would be wrong
    be, _ = compare(cfg, pool, batch, emulate=True, atol=1e-4)
    assert be.path == "triton"


# ----------------------------------------------------------------------------------------------- GPU
# Real FlashInfer (bf16, page 16, head_dim 128: the JIT variants the fully visible paths already build) against
# the torch reference (which rotates in bf16): |diff| < 3e-2 on O(1) outputs, as tests/test_fi_plan.py.

BF16_ATOL = 3e-2
GPU_MIXED = torch.tensor([[False, True], [True, True], [False, False], [True, False]])  # 4 layers


@pytest.mark.gpu
@pytest.mark.parametrize(
    "specs,groups",
    [
        ([seq([32, 512, 300, 512], 64, sink=32, window=64, local=GPU_MIXED)], 3),  # slot units
        ([seq([32, 512, 512], 64, sink=32, window=64, local=GPU_MIXED)], 3),  # page units (aligned)
        ([seq([32, 512, 500], 1, sink=32, window=64, local=GPU_MIXED)], 3),  # question of 1 token
        ([seq([32, 100], 16, sink=32, window=4096, local=GPU_MIXED)], 1),  # window > context: all global
        (
            [seq([32, 512, 300], 64, sink=32, window=64, local=GPU_MIXED),
             seq([32, 700], 20, sink=32, window=100, local=GPU_MIXED), seq([32, 400], 33, local=None)],
            3,
        ),  # several slices, one fully visible
        ([seq([32, 512, 300, 512], 64, sink=32, window=64, local=GPU_MIXED,
              recompute=(5, 40, 41, 42, 600, 601, 900, 1300, 1320))], 3),  # recompute + question, one forward
        ([seq([32, 512, 512], 0, sink=32, window=64, local=GPU_MIXED, recompute=tuple(range(32, 48)))], 1),
        (
            [seq([32, 512, 300], 64, sink=32, window=64, local=GPU_MIXED, recompute=(100, 101, 700, 840)),
             seq([32, 700], 20, local=None, recompute=(40, 300))],
            3,
        ),  # recompute on a local-head and a fully visible slice
    ],
)  # fmt: skip
def test_gpu_local_heads_tail_on_flashinfer(specs, groups):
    cfg = tiny_config(head_dim=128, group=4, num_kv_heads=2, num_layers=4)
    pool = random_pool(cfg, 8000, 16, torch.bfloat16, "cuda")
    alloc = PageAllocator(8000)
    batch = make_batch(cfg, pool, alloc, specs)
    be, err = compare(cfg, pool, batch, emulate=False, atol=BF16_ATOL)
    print(be.path, "max |diff|", err)
    p = be.plan_fi
    assert p is not None and p.heads is not None and len(p.heads.groups) == groups
    assert be.path.startswith("flashinfer")
    assert ("triton-local-inside" in be.path) == any(sp["recompute"] and sp["local"] is not None for sp in specs)
