"""The tensor-parallel wire: what rank 0 sends the other ranks, one `Message` per engine step (a whole
batch), segment write, head gather or all-rank call.

A message carries the page operations rank 0's runner did since the last message (`PageOp`: typed, small,
sequences and segments by explicit id: `SeqKV.seq_id`, `KVSegment.segment_id`), the ids rank 0 no longer
holds, and the action. `encode` pickles it with sequences and segments replaced by their ids wherever they
appear, so no Python object crosses by identity; `decode` resolves the ids to the receiving rank's twins.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from redknot_rag.kvcache import KVSegment, SeqKV

# positions as (start, n) when they are start, start+1, ..., start+n-1 (the usual case), else host int64 [n]
Positions = tuple[int, int] | torch.Tensor


def pack_positions(p: torch.Tensor) -> Positions:
    p = p.cpu()  # callers pass host positions (backends plan on the host): no device sync
    n = int(p.numel())
    start = int(p[0]) if n else 0
    if n <= 1 or torch.equal(p, torch.arange(start, start + n, dtype=p.dtype)):
        return (start, n)
    return p


def unpack_positions(p: Positions) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        return p
    return torch.arange(p[0], p[0] + p[1])


class NewSeq(NamedTuple):
    seq_id: int


class Attach(NamedTuple):
    seq_id: int
    items: list[tuple[int, Positions]]  # (segment_id, positions); per-head visibility is rank-local


class Append(NamedTuple):
    seq_id: int
    positions: Positions


class Override(NamedTuple):
    seq_id: int
    token_index: torch.Tensor  # [n] int64, host


class Truncate(NamedTuple):
    seq_id: int
    num_tokens: int


class Release(NamedTuple):
    seq_id: int


class DropSegment(NamedTuple):
    segment_id: int


PageOp = NewSeq | Attach | Append | Override | Truncate | Release | DropSegment


class SliceMsg(NamedTuple):
    """One sequence of a batch: `new_slots` None when they are its last `q_len` slots (appended tokens)."""

    seq_id: int
    q_start: int
    q_len: int
    num_kv: int
    new_slots: torch.Tensor | None  # [L, Hkv_r, q_len] int64, host


class Forward(NamedTuple):
    """A whole batch: `input_ids`, `positions` `[num_tokens]`; followers need no logits."""

    input_ids: list[int]
    positions: list[int]
    seqs: list[SliceMsg]
    num_layers: int | None


class WriteSegment(NamedTuple):
    """A head-complete segment: K/V `[L, Hkv, T, D]`, visible `[L, Hkv, T]` or None; each rank keeps its heads."""

    segment_id: int
    k: torch.Tensor
    v: torch.Tensor
    visible: torch.Tensor | None


class ReadTokens(NamedTuple):
    """`read_tokens` gathers heads over ranks: every rank joins."""

    seq_id: int
    start: int
    end: int


class OnAllRanks(NamedTuple):
    """`fn(runner, *args)` on every rank (reuse policies); sequences and segments in `args` travel by id."""

    fn: Callable[..., Any]
    args: tuple


class Stop(NamedTuple):
    pass


Action = Forward | WriteSegment | ReadTokens | OnAllRanks | Stop


@dataclasses.dataclass(frozen=True)
class Message:
    """Rank 0 -> followers, one per step (a batch), segment write, gather or all-rank call: the page ops
    since the last message in order, then the ids rank 0 no longer holds, then the action."""

    ops: list[PageOp]
    forget_seqs: list[int]
    forget_segments: list[int]
    action: Action


def seq_id_of(kv: SeqKV) -> int:
    if kv.seq_id < 0:
        raise RuntimeError("a SeqKV not made by a runner (new_seq_kv) cannot cross ranks")
    return kv.seq_id


def segment_id_of(seg: KVSegment) -> int:
    if seg.segment_id < 0:
        raise RuntimeError("a KVSegment not made by a runner (write_segment) cannot cross ranks")
    return seg.segment_id


class _Pickler(pickle.Pickler):
    """Sequences and segments cross by id (`seq_id`, `segment_id`): each rank has its own twin."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, SeqKV):
            return ("seq", seq_id_of(obj))
        if isinstance(obj, KVSegment) and obj.num_tokens:
            return ("segment", segment_id_of(obj))
        return None  # everything else (an empty segment included) by value


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, seqs: dict[int, SeqKV], segments: dict[int, KVSegment]) -> None:
        super().__init__(io.BytesIO(data))
        self.seqs, self.segments = seqs, segments

    def persistent_load(self, pid: Any) -> Any:
        kind, i = pid
        return self.seqs[i] if kind == "seq" else self.segments[i]


def encode(msg: Message) -> bytes:
    """`msg` as bytes; its sequences and segments (anywhere inside, e.g. an all-rank call's arguments) by id."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(msg)
    return buf.getvalue()


def decode(data: bytes, seqs: dict[int, SeqKV], segments: dict[int, KVSegment]) -> Message:
    """`encode`'s inverse on a follower: ids resolve to this rank's twins in `seqs` / `segments`."""
    return _Unpickler(data, seqs, segments).load()
