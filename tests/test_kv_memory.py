"""The runner's KV-memory API (`redknot_rag.runner`): the one way anything outside the runner reaches pages.

White-box reads of `pool`/`allocator` here are allowed: this file tests the runner itself. Model: the
shipped `tiny-gqa` config (2 layers, 2 KV heads, random weights), CPU, fp32.
"""

from __future__ import annotations

import pytest
import torch

from redknot_rag.config import EngineConfig
from redknot_rag.kvcache import KVSegment, SeqKV
from redknot_rag.loader import load_model
from redknot_rag.runner import KVRunner


@pytest.fixture(scope="module")
def runner() -> KVRunner:
    cfg = EngineConfig(model_path="tiny-gqa", device="cpu", dtype="float32", cpu_kv_gib=0.005)
    return KVRunner(cfg, load_model("tiny-gqa"))


def _kv(runner: KVRunner, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    mc = runner.model_config
    g = torch.Generator().manual_seed(seed)
    shape = (mc.num_layers, mc.num_kv_heads, t, mc.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_ids_name_sequences_and_segments(runner: KVRunner) -> None:
    a, b = runner.new_seq_kv(), runner.new_seq_kv()
    assert a.seq_id >= 0 and b.seq_id == a.seq_id + 1
    slots = runner.append(a, torch.arange(3))
    assert a.slice(0, 3, slots).seq_id == a.seq_id  # a batch names its sequences by id
    s1 = runner.write_segment(*_kv(runner, 5, 0))
    s2 = runner.allocate_segment(5)
    assert s1.segment_id >= 0 and s2.segment_id == s1.segment_id + 1
    for kv in (a, b):
        runner.release(kv)
    for seg in (s1, s2):
        runner.drop_segment(seg)


def test_write_attach_read_and_page_accounting(runner: KVRunner) -> None:
    free = runner.free_pages
    k, v = _kv(runner, 21, 1)  # 21 tokens: two pages of 16 per (layer, head)
    seg = runner.write_segment(k, v)
    assert free - runner.free_pages == runner.segment_pages(k) == seg.pages.numel()
    kv = runner.new_seq_kv()
    runner.attach(kv, seg, torch.arange(21))
    runner.drop_segment(seg)  # the sequence still holds the pages
    assert runner.free_pages == free - seg.pages.numel()
    got_k, got_v = runner.read_tokens(kv, 0, 21)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    runner.append(kv, torch.arange(21, 24))
    assert runner.private_pages(kv) == runner.model_config.num_kv_blocks  # one private page per block
    assert runner.positions_of(kv, torch.tensor([0, 22])).tolist() == [0, 22]
    runner.release(kv)
    assert runner.free_pages == free
    assert runner.can_allocate(free) and not runner.can_allocate(runner.num_pages + 1)


def test_allocate_then_write_pages(runner: KVRunner) -> None:
    """The hot cache's path: fresh pages first, the copy issued through `write_pages` (a load plan)."""
    k, v = _kv(runner, 9, 2)
    seg = runner.allocate_segment(9)
    slots = seg.slots(runner.page_size)  # [L, Hkv, T]

    def issue(k_slots: torch.Tensor, v_slots: torch.Tensor) -> str:
        k_slots[slots] = k
        v_slots[slots] = v
        return "issued"

    assert runner.write_pages(issue) == "issued"
    got_k, got_v = runner.read_slots(slots)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    runner.drop_segment(seg)


def test_copy_on_write_never_writes_the_shared_segment(runner: KVRunner) -> None:
    k, v = _kv(runner, 8, 3)
    seg = runner.write_segment(k, v)
    kv = runner.new_seq_kv()
    runner.attach(kv, seg, torch.arange(8))
    idx = torch.tensor([2, 5])
    shared = kv.slots[:, :, idx].clone()
    private = runner.override(kv, idx)
    runner.copy_slots(shared, private, k_scale=0.5)
    got_k, got_v = runner.read_tokens(kv, 0, 8)
    want_k = k.clone()
    want_k[:, :, idx] *= 0.5
    assert torch.equal(got_k, want_k) and torch.equal(got_v, v)
    seg_k, _ = runner.read_slots(seg.slots(runner.page_size))
    assert torch.equal(seg_k, k)  # the stored chunk is untouched
    runner.release(kv)
    runner.drop_segment(seg)


def test_tp_wire_names_objects_by_id(runner: KVRunner) -> None:
    """A message carries sequences and segments as ids (a few bytes, whatever their length), refuses
    objects no runner made, and packs consecutive positions as (start, n)."""
    from redknot_rag.tp_wire import Append, Message, OnAllRanks, encode, pack_positions, unpack_positions

    assert pack_positions(torch.arange(7, 12)) == (7, 5)
    odd = torch.tensor([3, 9, 4])
    assert torch.equal(unpack_positions(pack_positions(odd)), odd)

    def size(msg: Message) -> int:
        return len(encode(msg))

    short, long = runner.new_seq_kv(), runner.new_seq_kv()
    runner.append(long, torch.arange(500))
    one = size(Message([Append(short.seq_id, (0, 1))], [], [], OnAllRanks(len, (short,))))
    two = size(Message([Append(long.seq_id, (0, 1))], [], [], OnAllRanks(len, (long,))))
    assert one == two < 300
    bare = SeqKV(2, 2, runner.page_size)
    with pytest.raises(RuntimeError, match="not made by a runner"):
        size(Message([], [], [], OnAllRanks(len, (bare,))))
    empty = KVSegment(torch.zeros(0, 0, 0, dtype=torch.int64), 0)  # by value: a closed prefiller's anchor
    assert size(Message([], [], [], OnAllRanks(len, (empty,)))) > 0
    runner.release(short)
    runner.release(long)
