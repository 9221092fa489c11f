"""Layer-major loading of many chunks' blocks into the page pool, with one event per layer group.

`SegmentCache.get_blocks` copies one chunk at a time, chunk-major: layer 0 of the last chunk lands only
at the very end, so attention can start only after the whole load. `issue_layered` takes the load
plans of every chunk a query needs and issues them layer group by layer group: the first
`layers_per_event` layers of ALL chunks (host -> device copies into one staging buffer, then one
scatter per plan class into the pool), an event, the next group, ... The forward waits on the device
for group g's event before its first layer of the group reads the pool (`KVRunner.await_layers`), so
the copies of later layers run while earlier layers compute.

Invariants:
- Every byte a plan moves is moved exactly once, to the same pool slots as `run_plan` would write
  (the CPU tests compare the two bit for bit); zero slots of sparse plans are zeroed in their layer.
- Events are recorded on `stream` in layer order, so event g also covers every group before it.
- One host index upload for the whole batch (pinned on a CUDA host), asynchronous like the copies:
  the host never waits for the side stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from redknot_rag.store.segment_cache import LoadPlan, page_slots


@dataclass
class _Class:
    """Plans moved and scattered together in every group: dense plans of one (dtype, T, P), or the
    sparse plans of one dtype."""

    dense: bool
    dtype: torch.dtype
    plans: list[LoadPlan] = field(default_factory=list)


def _classes(plans: Sequence[LoadPlan]) -> list[_Class]:
    out: dict[tuple, _Class] = {}
    for p in plans:
        key = (True, p.dtype, p.shape[1:]) if p.dense else (False, p.dtype)
        out.setdefault(key, _Class(p.dense, p.dtype)).plans.append(p)
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


@dataclass(frozen=True)
class _Part:
    """One class's share of one layer group: bytes `[byte_start, byte_end)` of the group's staging buffer
    and, for a sparse class, entries `[index_start, index_start + 3·n + z)` of the batch index
    (n stored tokens: slots, K rows, V rows; then z zero slots); for a dense class the pages
    `[C, layers, Hkv, P]` at `index_start`."""

    cls: _Class
    byte_start: int
    byte_end: int
    index_start: int
    num_tokens: int  # sparse: n; dense: C (plans)
    num_zero: int  # sparse: z; dense: layers in the group


def _plan_group(
    classes: list[_Class], first: int, end: int, pieces: list[torch.Tensor], index_len: int
) -> tuple[list[_Part], list[list[torch.Tensor]], int]:
    """Staging layout and index entries of layers `[first, end)`: the parts, per part the host byte runs
    to copy (in staging order), and the new index length; appends the group's index pieces."""
    parts: list[_Part] = []
    runs: list[list[torch.Tensor]] = []
    pos = 0
    for c in classes:
        elem = c.dtype.itemsize
        start_pos = pos
        cls_runs: list[torch.Tensor] = []
        if c.dense:
            nl, nh, npages, _ = c.plans[0].shape
            pages = torch.stack([p.index.view(nl, nh, npages)[first:end] for p in c.plans])  # [C, Lg, Hkv, P]
            pieces.append(pages.reshape(-1))
            for p in c.plans:
                a, b = p.row_bounds[first] * p.head_dim * elem, p.row_bounds[end] * p.head_dim * elem
                cls_runs += slice_runs(p.runs, a, b)
                pos += b - a
            parts.append(_Part(c, start_pos, pos, index_len, len(c.plans), end - first))
            index_len += pages.numel()
        else:
            tok, krows, vrows, zero = [], [], [], []
            row0 = 0  # rows of this class's earlier plans in the staging buffer
            for p in c.plans:
                n = p.num_stored
                t0, t1 = p.token_bounds[first], p.token_bounds[end]
                z0, z1 = p.zero_bounds[first], p.zero_bounds[end]
                r0, r1 = p.row_bounds[first], p.row_bounds[end]
                shift = row0 - r0  # plan rows -> staging rows of this class
                tok.append(p.index[t0:t1])
                krows.append(p.index[n + t0 : n + t1] + shift)
                vrows.append(p.index[2 * n + t0 : 2 * n + t1] + shift)
                zero.append(p.index[3 * n + z0 : 3 * n + z1])
                cls_runs += slice_runs(p.runs, r0 * p.head_dim * elem, r1 * p.head_dim * elem)
                row0 += r1 - r0
                pos += (r1 - r0) * p.head_dim * elem
            group = [torch.cat(x) for x in (tok, krows, vrows, zero)]
            pieces.extend(group)
            parts.append(_Part(c, start_pos, pos, index_len, int(group[0].numel()), int(group[3].numel())))
            index_len += sum(int(g.numel()) for g in group)
        runs.append(cls_runs)
    return parts, runs, index_len


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
    pages were used for before); the host does not wait for it."""
    if not plans:
        return []
    num_layers = plans[0].num_layers
    if any(p.num_layers != num_layers for p in plans):
        raise ValueError("every plan of a layered load must have the model's layer count")
    classes = _classes(plans)
    groups = layer_groups(num_layers, layers_per_event)
    pieces: list[torch.Tensor] = []
    layout = []
    index_len = 0
    for first, end in groups:
        parts, runs, index_len = _plan_group(classes, first, end, pieces, index_len)
        layout.append((first, end, parts, runs))
    host_index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    dev = k_slots.device
    cuda = dev.type == "cuda"
    if cuda:
        host_index = host_index.pin_memory()
    events: list[torch.cuda.Event | None] = [None] * num_layers
    ctx = torch.cuda.stream(stream) if cuda and stream is not None else contextlib.nullcontext()
    with ctx:
        index = host_index.to(dev, non_blocking=True)
        for first, end, parts, runs in layout:
            total = parts[-1].byte_end if parts else 0
            staging = torch.empty(total, dtype=torch.uint8, device=dev)
            pos = 0
            for cls_runs in runs:
                for r in cls_runs:
                    staging[pos : pos + r.numel()].copy_(r, non_blocking=True)
                    pos += r.numel()
            for part in parts:
                _scatter(part, staging, index, k_slots, v_slots)
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
                for li in range(first, end):
                    events[li] = ev
    return events


def _scatter(
    part: _Part, staging: torch.Tensor, index: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor
) -> None:
    """Write one part's staged rows to their pool slots (the layer group's share of `run_plan`)."""
    c = part.cls
    d = k_slots.shape[-1]
    rows = staging[part.byte_start : part.byte_end].view(c.dtype).view(-1, d).to(k_slots.dtype)  # [2N, D]
    if c.dense:
        nl, nh, npages, T = c.plans[0].shape
        page_size = c.plans[0].page_size
        num = part.num_tokens * part.num_zero * nh  # C · layers · Hkv blocks
        pages = index[part.index_start : part.index_start + num * npages].view(num, 1, npages)
        slots = page_slots(pages, page_size, T).reshape(-1)  # [C·Lg·Hkv·T]
        kv = rows.view(num, 2, T, d)  # per block: K rows then V rows
        k_slots[slots] = kv[:, 0].reshape(-1, d)
        v_slots[slots] = kv[:, 1].reshape(-1, d)
        return
    n, z, i = part.num_tokens, part.num_zero, part.index_start
    slots, k_rows, v_rows = index[i : i + n], index[i + n : i + 2 * n], index[i + 2 * n : i + 3 * n]
    zero = index[i + 3 * n : i + 3 * n + z]
    if n:
        k_slots[slots] = rows[k_rows]
        v_slots[slots] = rows[v_rows]
    if z:
        k_slots[zero] = 0
        v_slots[zero] = 0
