"""Layer-major loading of many chunks' blocks into the page pool, with one event per layer group.

`SegmentCache.get_blocks` copies one chunk at a time, chunk-major: layer 0 of the last chunk lands only
at the very end, so attention can start only after the whole load. `issue_layered` takes the load
plans of every chunk a query needs and issues them layer group by layer group: the first
`layers_per_event` layers of ALL chunks (host -> device copies into one staging buffer, then one
scatter per plan class into the pool), an event, the next group, ... The forward waits on the device
for group g's event before its first layer of the group reads the pool (`KVRunner.await_layers`), so
the copies of later layers run while earlier layers compute.

Invariants:
- Every byte a plan moves is moved exactly once, to the same pool slots as `run_plan` would write:
  both stage bytes, turn them into rows (`LoadPlan.rows`: a view, or the device decode of encoded
  blocks) and scatter them with `load_plan.scatter_rows`, the one scatter; zero slots of sparse plans
  are zeroed in their layer (tests/test_store_device_decode.py checks both against a per-token
  reference).
- Events are recorded on `stream` in layer order, so event g also covers every group before it.
- One host index upload for the whole batch (pinned on a CUDA host), asynchronous like the copies:
  the host never waits for the side stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from redknot_rag.store.load_plan import LoadPlan, page_slots, scatter_rows, stage_runs


@dataclass
class _Class:
    """Plans moved and scattered together in every group: dense plans of one (dtype, L, Hkv, P, T), or
    sparse plans of one dtype and template (so one set of template indices serves all of them); encoded
    plans also of one decode layout (their payloads decode in one batch per (codec, n))."""

    plans: list[LoadPlan] = field(default_factory=list)
    pages_at: int = 0  # where the class's pages `[C, L·Hkv·P]` start in the batch index


def _classes(plans: Sequence[LoadPlan]) -> list[_Class]:
    out: dict[tuple, _Class] = {}
    for p in plans:
        key = (p.dense, p.dtype, p.shape, id(p.template), id(p.decode))
        out.setdefault(key, _Class()).plans.append(p)
    return list(out.values())


def slice_runs(runs: Sequence[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """Views of bytes `[start, end)` of the concatenation of `runs` (uint8 `[n]` each)."""
    out: list[torch.Tensor] = []
    pos = 0
    for r in runs:
        n = r.numel()
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            out.append(r[a - pos : b - pos])
        pos += n
        if pos >= end:
            break
    return out


def layer_groups(num_layers: int, layers_per_event: int) -> list[tuple[int, int]]:
    """`[(first, end)]` layer ranges of `layers_per_event` layers (the last may be shorter)."""
    if layers_per_event < 1:
        raise ValueError(f"layers_per_event must be >= 1, got {layers_per_event}")
    return [(a, min(a + layers_per_event, num_layers)) for a in range(0, num_layers, layers_per_event)]


def issue_layered(
    plans: Sequence[LoadPlan],
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    layers_per_event: int = 4,
    stream: torch.cuda.Stream | None = None,
) -> list[torch.cuda.Event | None]:
    """Move every plan's blocks into the pool (`k_slots`, `v_slots` `[num_slots, D]`) layer group by
    layer group; returns one entry per layer: the event recorded after that layer's group (None on a
    CPU pool, where everything is written synchronously).

    On a CUDA pool the work is queued on `stream` (which must already wait for whatever the pool's
    pages were used for before); the host does not wait for it. Host work per group is one copy per
    plan run piece; the slots are computed on the device from the pages (one upload for the batch)."""
    if not plans:
        return []
    num_layers = plans[0].num_layers
    if any(p.num_layers != num_layers for p in plans):
        raise ValueError("every plan of a layered load must have the model's layer count")
    classes = _classes(plans)
    pieces: list[torch.Tensor] = []
    at = 0
    for c in classes:
        c.pages_at = at
        pieces.extend(p.index for p in c.plans)
        at += sum(int(p.index.numel()) for p in c.plans)
    dev = k_slots.device
    cuda = dev.type == "cuda"
    host_index = torch.cat(pieces)
    if cuda:
        host_index = host_index.pin_memory()
    events: list[torch.cuda.Event | None] = [None] * num_layers
    ctx = torch.cuda.stream(stream) if cuda and stream is not None else contextlib.nullcontext()
    with ctx:
        index = host_index.to(dev, non_blocking=True)
        pages_of, dense_slots = [], []  # per class: pages `[C, L·Hkv, P]`; dense: slots `[C, L·Hkv·T]`
        for c in classes:
            nl, nh, npages, T = c.plans[0].shape
            C = len(c.plans)
            pages = index[c.pages_at : c.pages_at + C * nl * nh * npages].view(C, nl * nh, npages)
            pages_of.append(pages)
            # once per batch, not per layer group: a few device ops less per group on the issuing thread
            dense = c.plans[0].dense
            dense_slots.append(page_slots(pages, c.plans[0].page_size, T).reshape(C, -1) if dense else None)
        for first, end in layer_groups(num_layers, layers_per_event):
            spans = []  # per class: its byte range in the staging buffer
            runs: list[torch.Tensor] = []
            pos = 0
            for c in classes:
                start = pos
                for p in c.plans:
                    a, b = p.byte_bounds[first], p.byte_bounds[end]
                    runs += slice_runs(p.runs, a, b)
                    pos += b - a
                spans.append((start, pos))
            staging = stage_runs(runs, dev)
            for c, (a, b), pages, slots in zip(classes, spans, pages_of, dense_slots, strict=True):
                p0, C = c.plans[0], len(c.plans)
                rows = p0.rows(staging[a:b], C, first, end).to(k_slots.dtype)  # [C · group rows, D]
                scatter_rows(p0, C, first, end, rows, pages, k_slots, v_slots, slots)
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
                for li in range(first, end):
                    events[li] = ev
    return events
