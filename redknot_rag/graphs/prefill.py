"""CUDA graphs for small prefill steps of one sequence (a RAG question after naive relocation, a short
prompt), so that a 64-token forward is not bound by ~20 kernel launches per layer.

One graph per bucket of `n` query tokens (16, 32, 64, 128). A step of `m <= n` new tokens at the tail
of a page-aligned sequence (`is_contiguous_layout`: the condition the decode graphs use) replays
bucket `n`. Rows `m..n-1` are padding: token id 0, K/V written nowhere (slot -1, skipped by
`write_kv_pages`), and their attention is a separate FlashInfer request per kv head over
`max(1, n - m)` keys of pool page 0 (read only). Every op outside attention is row-wise, so the real
rows see exactly the eager step's inputs; their logits equal the eager ones up to bf16 rounding of
differently shaped GEMMs and attention splits.

FlashInfer layout (`num_kv_heads=1` rows, as in the backend): the query rows are (head, token),
q `[n, Hq, D] -> [Hkv * n, g, D]`, and the wrapper has 2 * Hkv requests, (head h, real) then
(head h, padding): `qo_indptr = [0, m, n, n + m, 2n, ...]`. The wrapper runs in CUDA-graph mode
(fixed batch size, indptr buffers it owns); `plan` runs on the host before every replay (it copies
the step's indptrs and the scheduler's work list into device buffers the graph reads), `run` is
captured once per layer with that layer's row of the shared page-index buffer. In graph mode
FlashInfer always splits KV over at most 2 CTAs per SM (`PrefillSplitQOKVIndptr`: the grid is fixed
at capture, `max(2 * num_SMs, q tiles)`), the same split its eager planner picks for 64 queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from redknot_rag.attention.flashinfer_backend import FlashInferBackend, is_contiguous_layout
from redknot_rag.batch import ForwardBatch
from redknot_rag.model import CausalLM

from .decode import PlannedBackend

DEFAULT_PREFILL_TOKENS = (16, 32, 64, 128)


@dataclass(frozen=True)
class PaddedRequests:
    """FlashInfer requests of a bucket: rows (head h, real) then (head h, padding) for h < Hkv.

    `qo_indptr`, `kv_indptr` `[2 Hkv + 1]` int32 host; `last_page_len` `[2 Hkv]` int32 host;
    `indices` `[L, nnz]` int32 on the pages' device (padding requests read page 0)."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    last_page_len: torch.Tensor
    indices: torch.Tensor


def padded_requests(m: int, n: int, pages: torch.Tensor, kv_len: int, page_size: int) -> PaddedRequests:
    """Requests for `m` real queries at the tail of `kv_len` keys on `pages` `[L, Hkv, P]`, padded to
    `n` query rows per kv head. The padding rows `m..n-1` of each head are their own causal request over
    `max(1, n - m)` keys of page 0, so they see >= 1 key each (no empty softmax) and no real key."""
    nl, hkv, p_real = pages.shape
    ps, n_pad = page_size, n - m
    pad_len = max(1, n_pad)
    p_pad = -(-pad_len // ps)
    qo = torch.tensor([m, n_pad] * hkv, dtype=torch.int32)
    kv = torch.tensor([p_real, p_pad] * hkv, dtype=torch.int32)
    lpl = torch.tensor([kv_len - (p_real - 1) * ps, pad_len - (p_pad - 1) * ps] * hkv, dtype=torch.int32)
    qo_indptr = torch.zeros(2 * hkv + 1, dtype=torch.int32)
    kv_indptr = torch.zeros(2 * hkv + 1, dtype=torch.int32)
    qo_indptr[1:], kv_indptr[1:] = qo.cumsum(0), kv.cumsum(0)
    pad = torch.zeros(nl, hkv, p_pad, dtype=torch.int32, device=pages.device)
    indices = torch.cat([pages.to(torch.int32), pad], dim=2).reshape(nl, -1)  # [L, Hkv * (P + P_pad)]
    return PaddedRequests(qo_indptr, kv_indptr, lpl, indices)


@dataclass
class PrefillBucket:
    """Static buffers of one bucket of `n` query tokens; `logits [n, vocab]` float32 after capture."""

    n: int
    input_ids: torch.Tensor  # [n] int64
    logit_rows: torch.Tensor  # [n] int64 (the step's rows first, the rest 0)
    new_slots: torch.Tensor  # [L, Hkv, n] int32 (padding rows -1)
    wrapper: Any  # flashinfer BatchPrefillWithPagedKVCacheWrapper, CUDA-graph mode, 2 * Hkv requests
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class PrefillGraphRunner:
    """Captures `model.forward` for one-sequence prefill steps of up to `max(sizes)` tokens over at
    most `max_kv_tokens` keys per (layer, kv head); `prepare(batch)` plans and fills a bucket (None:
    run eagerly), `replay` runs it. FlashInfer backend only."""

    def __init__(
        self,
        model: CausalLM,
        backend: FlashInferBackend,
        max_kv_tokens: int,
        sizes: tuple[int, ...] = DEFAULT_PREFILL_TOKENS,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        if not isinstance(backend, FlashInferBackend) or backend.emulate:
            raise TypeError("prefill CUDA graphs need the flashinfer backend on a GPU")
        self.model, self.backend, self.max_kv_tokens = model, backend, max_kv_tokens
        self.sizes = tuple(sorted(sizes))
        self.proxy = PlannedBackend(backend)
        self.buckets: dict[int, PrefillBucket] = {}
        self.mempool = torch.cuda.graph_pool_handle()  # CUDA graph memory, shared by every bucket
        cfg, ps = backend.cfg, backend.page_size
        self.max_pages = -(-max_kv_tokens // ps)
        cap = cfg.num_kv_heads * (self.max_pages + -(-self.sizes[-1] // ps))
        # page indices of every layer, rows (head, real | padding); shared by the buckets (one replays at a time)
        self.indices = torch.zeros(cfg.num_layers, cap, dtype=torch.int32, device=backend.device)

    # -- planning (host, before each replay) ---------------------------------------------------
    def _plan(self, b: PrefillBucket, m: int, pages: torch.Tensor, kv_len: int) -> None:
        """Plan bucket `b` for `m` real queries at the tail of `kv_len` keys on `pages` `[L, Hkv, P]`."""
        rq = padded_requests(m, b.n, pages, kv_len, self.backend.page_size)
        self.backend.plan_prefill_graph(
            b.wrapper, self.indices, rq.qo_indptr, rq.kv_indptr, rq.indices, rq.last_page_len
        )

    def _install(self, b: PrefillBucket) -> None:
        self.backend.prepare_prefill_graph(b.wrapper, self.indices, b.new_slots)

    # -- capture ---------------------------------------------------------------------------------
    def _make_bucket(self, n: int) -> PrefillBucket:
        be = self.backend
        cfg, dev, hkv = be.cfg, be.device, be.cfg.num_kv_heads

        w = be.init_prefill_graph(2 * hkv, self.indices)
        b = PrefillBucket(
            n=n,
            input_ids=torch.zeros(n, dtype=torch.int64, device=dev),
            logit_rows=torch.zeros(n, dtype=torch.int64, device=dev),
            new_slots=torch.full((cfg.num_layers, hkv, n), -1, dtype=torch.int32, device=dev),
            wrapper=w,
        )
        # the first plan fixes the wrapper's row count (Hkv * n) and grid: all n rows real, over n keys of page 0
        p = -(-n // be.page_size)
        self._plan(b, n, torch.zeros(cfg.num_layers, hkv, p, dtype=torch.int32, device=dev), n)
        return b

    def capture(self) -> None:
        for n in reversed(self.sizes):
            b = self._make_bucket(n)
            self._install(b)
            batch = ForwardBatch(input_ids=b.input_ids, positions=b.input_ids, seqs=[], logit_rows=b.logit_rows)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up outside the capture (JIT, cuBLAS handles)
                    self.model.forward(batch, self.proxy)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.mempool):
                b.logits = self.model.forward(batch, self.proxy)
            b.graph = g
            self.buckets[n] = b
        torch.cuda.synchronize()

    # -- replay ----------------------------------------------------------------------------------
    def bucket(self, batch: ForwardBatch) -> PrefillBucket | None:
        """The smallest bucket for a one-sequence prefill step it can hold, else None."""
        if len(batch.seqs) != 1:
            return None
        s = batch.seqs[0]
        if s.q_len < 2 or s.num_kv > self.max_kv_tokens:
            return None
        for n in self.sizes:
            if n >= s.q_len and n in self.buckets:
                return self.buckets[n] if batch.logit_rows.shape[0] <= n else None
        return None

    def prepare(self, batch: ForwardBatch) -> PrefillBucket | None:
        """Host planning + copies into the bucket's buffers; None if the step must run eagerly."""
        b = self.bucket(batch)
        be = self.backend
        if b is None or not (be.rope_ok and is_contiguous_layout(batch, be.page_size)):
            return None
        s, ps = batch.seqs[0], be.page_size
        m, rows = s.q_len, batch.logit_rows.shape[0]
        self._plan(b, m, s.kv_slots[:, :, ::ps] // ps, s.num_kv)  # page table [L, Hkv, P] (page-aligned)
        b.input_ids.zero_()
        b.input_ids[:m].copy_(batch.input_ids, non_blocking=True)
        b.logit_rows.zero_()
        b.logit_rows[:rows].copy_(batch.logit_rows, non_blocking=True)
        b.new_slots.fill_(-1)
        b.new_slots[:, :, :m].copy_(s.new_slots.to(torch.int32), non_blocking=True)
        self._install(b)
        return b

    def replay(self, b: PrefillBucket, num_rows: int) -> torch.Tensor:
        """Logits `[num_rows, vocab]` float32 of the step's `logit_rows` (a view of the static buffer)."""
        assert b.graph is not None and b.logits is not None
        b.graph.replay()
        return b.logits[:num_rows]

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[M, vocab]` float32 for a small prefill step (graph replay, or eager fallback)."""
        b = self.prepare(batch)
        if b is None:
            return self.model.forward(batch, self.backend)
        return self.replay(b, batch.logit_rows.shape[0])
