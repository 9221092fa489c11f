"""The batch builder: a step's plan → one `ForwardBatch` (token ids, positions, per-sequence slices,
the logits rows to compute) and, per request, which rows it reads after the forward.

Pending recompute (`ReusedContext.pending`: context tokens a reuse policy selected) is injected here:
its tokens go first in the request's slice, at their context positions, into copy-on-write slots, and
the prompt tokens of the step follow them. The scheduler may split the pending tokens over several
steps (`PlanItem.num_recompute`); taken in ascending position order, each piece sees the pieces before
it recomputed, exactly as one forward over all of them would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from redknot_rag.batch import ForwardBatch, SeqSlice
from redknot_rag.request import Request
from redknot_rag.runner import KVRunner


@dataclass
class PlanItem:
    """One request's share of a step: `num_recompute` pending context tokens, then `num_tokens` new
    tokens (prompt tokens in prefill, the last sampled token in decode: 1)."""

    req: Request
    num_recompute: int
    num_tokens: int


@dataclass
class RowPlan:
    """What `req` reads from the step's logits `[M, vocab]`: `rows` (indices into them) with the prompt
    token each predicts (`targets`; -1: the row samples the next token); `completes`: this step ends
    the request's prefill (or is a decode step), so its last row samples."""

    req: Request
    rows: list[int]
    targets: list[int]
    completes: bool
    num_tokens: int


@dataclass
class BuiltBatch:
    batch: ForwardBatch
    rows: list[RowPlan]

    @property
    def num_logit_rows(self) -> int:
        return int(self.batch.logit_rows.numel())


def _take_pending(req: Request, k: int) -> torch.Tensor | None:
    """The first `k` pending recompute indices of `req` (ascending), removed from its pending set."""
    reuse = req.reuse
    if reuse is None or reuse.pending is None or k <= 0:
        return None
    pending = reuse.pending
    taken, rest = pending[:k], pending[k:]
    reuse.pending = rest if rest.numel() else None
    return taken


def pending_count(req: Request) -> int:
    """Context tokens of `req` still selected for recompute (0 once its prefill started them all)."""
    reuse = req.reuse
    if reuse is None or reuse.pending is None or req.is_prefill_done:
        return 0
    return int(reuse.pending.numel())


def build_batch(runner: KVRunner, plan: list[PlanItem]) -> BuiltBatch:
    """Reserve the step's KV slots (append, copy-on-write) and lay out the flat batch.

    Token layout: for each item, its recompute tokens then its new tokens; `SeqSlice` covers both.
    """
    ids: list[int] = []
    pos: list[int] = []
    slices: list[SeqSlice] = []
    logit_rows: list[int] = []
    out_rows: list[RowPlan] = []
    for item in plan:
        req, n = item.req, item.num_tokens
        assert req.kv is not None
        q0 = len(ids)
        if req.is_prefill_done:
            toks = [req.output_ids[-1]]
            p0 = req.kv.num_tokens
        else:
            toks = req.prompt_ids[req.num_computed : req.num_computed + n]
            p0 = req.num_computed
        positions = torch.arange(p0, p0 + len(toks), dtype=torch.int64)
        pending = None if req.is_prefill_done else _take_pending(req, item.num_recompute)
        if pending is not None:
            # the selected context tokens first (queries inside the context, copy-on-write slots), then
            # this step's prompt tokens, which see them
            cow = runner.override(req.kv, pending)
            k_pos = runner.positions_of(req.kv, pending)
            ids.extend(req.prompt_ids[i] for i in pending.tolist())
            pos.extend(k_pos.tolist())
            new_slots = torch.cat([cow, runner.append(req.kv, positions)], dim=2) if toks else cow
            slices.append(req.kv.slice(q0, int(pending.numel()) + len(toks), new_slots))
            q0 += int(pending.numel())
        else:
            new_slots = runner.append(req.kv, positions)
            slices.append(req.kv.slice(q0, len(toks), new_slots))
        ids.extend(toks)
        pos.extend(range(p0, p0 + len(toks)))
        rows: list[int] = []
        targets: list[int] = []
        if not req.is_prefill_done and req.return_logprob and req.logprob_start_len >= 0:
            # row i predicts prompt token at (num_computed + i + 1)
            for i in range(len(toks)):
                tgt = req.num_computed + i + 1
                if req.logprob_start_len <= tgt < req.prompt_len:
                    rows.append(q0 + i)
                    targets.append(req.prompt_ids[tgt])
        completes = req.is_prefill_done or (
            req.num_computed + n >= req.prompt_len and pending_count(req) == 0 and len(toks) > 0
        )
        if completes and (q0 + len(toks) - 1) not in rows:
            rows.append(q0 + len(toks) - 1)
            targets.append(-1)
        start = len(logit_rows)
        logit_rows.extend(rows)
        out_rows.append(RowPlan(req, list(range(start, start + len(rows))), targets, completes, n))
    batch = ForwardBatch(
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(pos, dtype=torch.int64),
        slices,
        torch.tensor(logit_rows, dtype=torch.int64),
    )
    return BuiltBatch(batch, out_rows)
