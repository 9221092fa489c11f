"""CUDA graphs for the whole decode step (`CausalLM.forward` on a decode-only batch).

One graph per batch-size bucket (1, 2, 4, ... 64). Every tensor the step reads lives in static
buffers: input ids, positions, logit rows, and the backend's metadata (`GraphSlot.state`, made and filled by the
backend's hooks `init_capture_graph` / `prepare_for_capture` / `prepare_for_replay`). Metadata for a
real batch is prepared on the host and copied into the bucket's buffers *outside* the graph; rows
beyond the real batch are padding (no key for triton; one harmless page for flashinfer; their K/V
writes go to slot -1 = skipped). Page tables change length between steps; the buffers hold up to
`max_kv_tokens` keys per layer (or pages, for flashinfer) and a batch that does not fit runs eagerly.

Inside capture and replay the model calls `plan()` on a proxy that does nothing: planning is host
work and happened before replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from redknot_rag.attention import AttentionBackend
from redknot_rag.batch import ForwardBatch
from redknot_rag.model import CausalLM

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class PlannedBackend(AttentionBackend):
    """Delegates `write_kv`/`run` to `inner`; `plan` is a no-op (metadata already installed)."""

    def __init__(self, inner: AttentionBackend) -> None:
        super().__init__(inner.cfg, inner.pool, inner.rotary)
        self.inner = inner

    def plan(self, batch: ForwardBatch) -> None:
        pass

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.inner.write_kv(layer, k, v)

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.inner.run(layer, q)


@dataclass
class GraphSlot:
    """Static buffers of one bucket: `bs` sequences, keys (triton) or pages (flashinfer) per layer."""

    bs: int
    input_ids: torch.Tensor  # [bs] int64
    logit_rows: torch.Tensor  # [bs] int64
    state: Any  # backend-specific static metadata
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [bs, vocab] float32


class DecodeGraphRunner:
    """Captures `model.forward` for decode batches of each bucket size; `forward(batch)` replays.

    `backend` is any backend with the CUDA-graph hooks (triton, flashinfer) over the model's pool.
    `max_kv_tokens` bounds the keys per layer over the whole batch (sum over sequences and kv heads of
    visible tokens) of the largest bucket; smaller buckets hold proportionally fewer (`bucket_tokens`).
    """

    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        max_kv_tokens: int,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.backend, self.max_kv_tokens = model, backend, max_kv_tokens
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.proxy = PlannedBackend(backend)
        self.slots: dict[int, GraphSlot] = {}
        self.mempool = torch.cuda.graph_pool_handle()  # CUDA graph memory, shared by every bucket

    def bucket_tokens(self, bs: int) -> int:
        """Keys per layer bucket `bs` holds: `max_kv_tokens` scaled by bs / largest bucket (static
        buffers grow with the batch, not with the largest batch times every bucket)."""
        return max(1, self.max_kv_tokens * bs // self.batch_sizes[-1])

    # -- capture / replay -----------------------------------------------------------------------
    def _static_batch(self, slot: GraphSlot) -> ForwardBatch:
        ids = slot.input_ids
        return ForwardBatch(input_ids=ids, positions=ids, seqs=[], logit_rows=slot.logit_rows)

    def capture(self) -> None:
        dev = self.backend.device
        for bs in reversed(self.batch_sizes):
            slot = GraphSlot(
                bs=bs,
                input_ids=torch.zeros(bs, dtype=torch.int64, device=dev),
                logit_rows=torch.arange(bs, dtype=torch.int64, device=dev),
                state=self.backend.init_capture_graph(bs, self.bucket_tokens(bs)),
            )
            self.backend.prepare_for_capture(slot.state)
            batch = self._static_batch(slot)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile / JIT outside the capture
                    self.model.forward(batch, self.proxy)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.mempool):
                slot.logits = self.model.forward(batch, self.proxy)
            slot.graph = g
            self.slots[bs] = slot
        torch.cuda.synchronize()

    def bucket(self, batch: ForwardBatch) -> GraphSlot | None:
        if not batch.seqs or not all(s.is_decode for s in batch.seqs):
            return None
        b = len(batch.seqs)
        for bs in self.batch_sizes:
            if bs >= b and bs in self.slots:
                return self.slots[bs]
        return None

    def prepare(self, batch: ForwardBatch) -> GraphSlot | None:
        """Host planning + copies into the bucket's buffers; None if the batch must run eagerly."""
        slot = self.bucket(batch)
        if slot is None or not self.backend.prepare_for_replay(slot.state, batch):
            return None
        b = len(batch.seqs)
        slot.input_ids.zero_()
        slot.input_ids[:b].copy_(batch.input_ids, non_blocking=True)
        return slot

    def replay(self, slot: GraphSlot, num_seqs: int) -> torch.Tensor:
        assert slot.graph is not None and slot.logits is not None
        slot.graph.replay()
        return slot.logits[:num_seqs]

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[B, vocab]` float32 for a decode batch (graph replay, or eager fallback)."""
        slot = self.prepare(batch)
        if slot is None:
            return self.model.forward(batch, self.backend)
        return self.replay(slot, len(batch.seqs))
