"""Chunk prefill behind the anchor: how every stored chunk's KV is computed (at ingestion or on a miss).

Every chunk is prefilled behind the anchor (the fixed prompt start every query shares), so its stored KV
saw the same left context as the start of a query prompt. K is pre-RoPE, so one stored chunk serves any
offset. Runs on the runner's thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.kvcache import KVSegment, SeqKV
from redknot_rag.runner import KVRunner


class ChunkPrefiller:
    """Holds the anchor's pool segment (one reference, until `close`) and prefills chunks behind it."""

    def __init__(self, runner: KVRunner, anchor_ids: Sequence[int]) -> None:
        self.runner = runner
        self.anchor_ids = ids = list(anchor_ids)
        kv = runner.new_seq_kv()
        try:
            runner.append_forward(kv, ids, torch.arange(len(ids)))
            k, v = runner.read_tokens(kv, 0, len(ids))
        finally:
            runner.release(kv)
        self.anchor: KVSegment = runner.write_segment(k, v)

    def attach_anchor(self, kv: SeqKV) -> None:
        self.runner.attach(kv, self.anchor, torch.arange(len(self.anchor_ids)))

    def prefill(self, chunks: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One batched forward over `[anchor][chunk_i]` for each chunk → K/V `[L, Hkv, T_i, D]` each."""
        r = self.runner
        a = len(self.anchor_ids)
        kvs: list[SeqKV] = []
        slices: list[SeqSlice] = []
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        try:
            for c in chunks:
                kv = r.new_seq_kv()
                kvs.append(kv)
                self.attach_anchor(kv)
                p = torch.arange(a, a + len(c))
                slices.append(kv.slice(len(ids), len(c), r.append(kv, p)))
                ids.extend(c)
                pos.append(p)
            r.forward(ForwardBatch(torch.tensor(ids), torch.cat(pos), slices, torch.zeros(0, dtype=torch.int64)))
            return [r.read_tokens(kv, a, a + len(c)) for kv, c in zip(kvs, chunks)]
        finally:
            for kv in kvs:
                r.release(kv)

    def close(self) -> None:
        """Drop the anchor segment's reference (idempotent)."""
        if self.anchor.num_tokens:
            self.runner.drop_segment(self.anchor)
            self.anchor = KVSegment(torch.zeros(0, 0, 0, dtype=torch.int64), 0)
