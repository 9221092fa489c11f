"""How a chunk's per-head blocks land in the page pool: the plan (byte runs to copy, rows, slots) and its
chunk-by-chunk execution. `segment_cache` (the hot tier) and `layer_load` (layer-major execution of many
plans) both build on it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from redknot_rag.store.device_decode import DecodeLayout, decode_layout
from redknot_rag.store.tiers import ChunkBlocks, EncodedBlock, HostBlock, KVBlock

Blocks = Mapping[tuple[int, int], HostBlock]  # (layer, kv_head) -> block, as ChunkKVStore.get_blocks returns


def blocks_geometry(blocks: Blocks, num_tokens: int) -> tuple[int, int, int, torch.Tensor | None]:
    """(num_layers, num_kv_heads, head_dim, visible `[L, Hkv, T]` bool or None when every head holds
    every token) of a chunk's per-head blocks (computed once per host group: `ChunkBlocks.cache`).

    `visible` is shared by every segment loaded from the same host group and must be read only (a
    segment is immutable: its readers copy it, `SeqKV.attach`, or combine it into a new tensor). Not
    cloning it per load saves a fresh 128 KiB allocation per 8B chunk (mmap + page faults: ~3 ms
    on a loaded host)."""
    cache = blocks.cache if isinstance(blocks, ChunkBlocks) else None
    key = f"geometry:{num_tokens}"
    if cache is not None and key in cache:
        return cache[key]  # type: ignore[return-value]
    out = _geometry(blocks, num_tokens)
    if cache is not None:
        cache[key] = out
    return out


def _geometry(blocks: Blocks, num_tokens: int) -> tuple[int, int, int, torch.Tensor | None]:
    nl = 1 + max(lh[0] for lh in blocks)
    nh = 1 + max(lh[1] for lh in blocks)
    d = next(iter(blocks.values())).head_dim
    if len(blocks) == nl * nh and all(b.token_start == 0 and b.num_tokens == num_tokens for b in blocks.values()):
        return nl, nh, d, None
    layout = tuple(sorted((lh[0], lh[1], b.token_start, b.num_tokens) for lh, b in blocks.items()))
    return nl, nh, d, _visibility(layout, nl, nh, num_tokens).clone()  # a segment's own copy


@functools.lru_cache(maxsize=64)
def _visibility(layout: tuple[tuple[int, int, int, int], ...], nl: int, nh: int, num_tokens: int) -> torch.Tensor:
    """`[L, Hkv, T]` bool: the tokens each (layer, head, token_start, n) block of `layout` holds."""
    visible = torch.zeros(nl, nh, num_tokens, dtype=torch.bool)
    for layer, head, start, count in layout:
        visible[layer, head, start : start + count] = True
    return visible


def assemble_blocks(
    blocks: Blocks, num_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-head blocks → K, V `[L, Hkv, T, D]` on the host (zeros where a head holds no token) and the
    visibility `[L, Hkv, T]` of what each head holds (None: all). Encoded blocks are decoded on the host."""
    nl, nh, d, visible = blocks_geometry(blocks, num_tokens)
    k = torch.zeros(nl, nh, num_tokens, d, dtype=dtype)
    v = torch.zeros_like(k)
    for (layer, head), held in blocks.items():
        b = held.decode() if isinstance(held, EncodedBlock) else held
        span = slice(b.token_start, b.token_start + b.num_tokens)
        k[layer, head, span] = b.k.to(dtype)
        v[layer, head, span] = b.v.to(dtype)
    return k, v, visible


def byte_runs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The bytes of `tensors`, in order, as few uint8 `[n]` views: consecutive tensors of one storage
    that lie back to back (a chunk's blocks read into one host buffer) merge into one view, so
    copying the runs moves the same bytes in a few large copies. Views share the tensors'
    storage (pinned stays pinned; the copy engine's events are recorded on it)."""
    runs: list[torch.Tensor] = []
    first: torch.Tensor | None = None  # the run's first tensor
    lo = hi = start = end = 0  # the first tensor's storage [lo, hi) and the run's byte range
    for t in tensors:
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.data_ptr()
        size = t.nbytes
        # back to back AND inside the run's storage: one allocation (checked by address range, which
        # is cheaper than asking every tensor for its storage)
        if first is not None and ptr == end and end + size <= hi:
            end += size
            continue
        if first is not None:
            runs.append(_bytes_view(first, start, end))
        st = t.untyped_storage()
        first, lo, start, end = t, st.data_ptr(), ptr, ptr + size
        hi = lo + st.nbytes()
    if first is not None:
        runs.append(_bytes_view(first, start, end))
    return runs


def _bytes_view(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """uint8 view of addresses [start, end) inside `t`'s storage."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(st, start - st.data_ptr(), (end - start,), (1,))


def page_slots(pages: torch.Tensor, page_size: int, num_tokens: int) -> torch.Tensor:
    """Pool slot of every token of a segment of `pages` `[L, Hkv, P]`: `[L, Hkv, num_tokens]`, on
    `pages`' device (as `KVSegment.slots`)."""
    nl, nh, npages = pages.shape
    offsets = torch.arange(page_size, dtype=pages.dtype, device=pages.device)
    slots = pages[:, :, :, None] * page_size + offsets  # [L, Hkv, P, page_size]
    return slots.view(nl, nh, npages * page_size)[:, :, :num_tokens]


@dataclass(frozen=True)
class SparseTemplate:
    """What places a sparse plan's rows, minus the pages: per stored token (N, blocks in plan order) its
    block `blk` (flat layer·Hkv + head), page within the block and offset in the page, its K row (its V
    row: + `n_of_token`); per zero slot (tokens no head stores, in (layer, head, token) order) the same
    block / page / offset. Chunks stored alike (same heads, windows and host order) share one, so a
    chunk's plan only adds its pages; its copy to a device is made once (`on`)."""

    blk: torch.Tensor
    page: torch.Tensor
    offset: torch.Tensor
    k_rows: torch.Tensor
    n_of_token: torch.Tensor
    zero_blk: torch.Tensor
    zero_page: torch.Tensor
    zero_offset: torch.Tensor
    row_bounds: tuple[int, ...]  # [L + 1] first row of each layer (then the end)
    token_bounds: tuple[int, ...]  # [L + 1] first stored token of each layer
    zero_bounds: tuple[int, ...]  # [L + 1] first zero slot of each layer
    _copies: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def on(self, device: torch.device) -> SparseTemplate:
        """This template with its tensors on `device` (made once per device, then reused)."""
        if device.type == "cpu":
            return self
        key = str(device)
        if key not in self._copies:
            moved = {f: getattr(self, f).to(device) for f in _TEMPLATE_TENSORS}
            self._copies[key] = dataclasses.replace(self, **moved, _copies={})
        return self._copies[key]

    def slots(
        self, pages: torch.Tensor, page_size: int, tokens: slice, zeros: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots of stored tokens `tokens` and zero slots `zeros` of chunks with pages `[C, L·Hkv, P]`
        (on this template's device): `[C, n]`, `[C, z]`."""
        tok = pages[:, self.blk[tokens], self.page[tokens]] * page_size + self.offset[tokens]
        zero = pages[:, self.zero_blk[zeros], self.zero_page[zeros]] * page_size + self.zero_offset[zeros]
        return tok, zero


_TEMPLATE_TENSORS = ("blk", "page", "offset", "k_rows", "n_of_token", "zero_blk", "zero_page", "zero_offset")


@dataclass(frozen=True)
class LoadPlan:
    """How a chunk's blocks reach the pool: copy `runs` back to back into one device buffer and read
    it as rows `[2·N, D]` of `dtype` (per block: its n K rows, then its n V rows; N = stored tokens;
    blocks in (layer, head) order when dense or encoded, else layer by layer in host memory order) or,
    with `decode` (encoded blocks), decode it there into those rows (`store.device_decode`). `index` is
    the segment's pages `[L·Hkv·P]` (int64: one small upload); the slots are computed on the device:

    dense (every block whole): rows `[L·Hkv, 2, T, D]` go to the pages' slots.
    else: `template` places each stored token's K and V row and lists the slots of tokens no head
        stores, which are zeroed (nothing stale stays readable).

    Layer-major invariant (what `store.layer_load` splits on): bytes, rows, stored tokens and zero
    slots are ordered by layer, so layer l owns bytes `[byte_bounds[l], byte_bounds[l+1])` of the runs
    (decoded blocks: rows · D · elem), rows `[row_bounds[l], row_bounds[l+1])`, stored tokens
    `[token_bounds[l], token_bounds[l+1])` and zero slots `[zero_bounds[l], zero_bounds[l+1])`.
    """

    runs: list[torch.Tensor]
    dtype: torch.dtype
    head_dim: int
    num_stored: int  # N
    index: torch.Tensor
    dense: bool
    shape: tuple[int, int, int, int]  # (L, Hkv, P, T)
    page_size: int
    row_bounds: tuple[int, ...]  # [L + 1]
    token_bounds: tuple[int, ...]  # [L + 1] (dense: Hkv·T·l)
    zero_bounds: tuple[int, ...]  # [L + 1] (dense: all 0)
    byte_bounds: tuple[int, ...]  # [L + 1]
    template: SparseTemplate | None = None  # sparse plans
    decode: DecodeLayout | None = None  # encoded plans: runs hold INT8/INT4 payloads

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    def rows(self, staged: torch.Tensor, num_plans: int, first: int, end: int) -> torch.Tensor:
        """Layers `[first, end)` of `num_plans` plans of this plan's class (same dtype, layout and codec),
        staged chunk after chunk as uint8 on the device -> their rows `[num_plans · group rows, D]` of
        `dtype`, chunk after chunk: a view for decoded blocks, the device decode for encoded ones."""
        if self.decode is not None:
            return self.decode.rows(staged, num_plans, first, end)
        return staged.view(self.dtype).view(-1, self.head_dim)


def load_plan(
    blocks: Blocks, pages: torch.Tensor, page_size: int, num_tokens: int, visible: torch.Tensor | None
) -> LoadPlan:
    """The plan for a chunk's blocks into the segment of `pages` `[L, Hkv, P]` (host), `visible` its
    visibility (None: every block whole). O(blocks) Python steps, no per-token ones."""
    nl, nh, npages = pages.shape
    shape = (nl, nh, npages, num_tokens)
    kind = _kind(blocks)
    if kind == "encoded":
        return _encoded_plan(blocks, pages, page_size, num_tokens, visible)
    if kind == "mixed":  # decode the encoded ones on the host
        blocks = {lh: b.decode() if isinstance(b, EncodedBlock) else b for lh, b in blocks.items()}
    first = next(iter(blocks.values()))
    assert isinstance(first, KVBlock)
    dtype, d = first.k.dtype, first.head_dim
    index = pages.reshape(-1).long()
    if visible is None:  # every (layer, head) block whole: rows in (layer, head) order
        runs = _runs(blocks, "runs:layer-head", lambda: sorted(blocks))
        per_layer = nh * num_tokens
        return LoadPlan(
            runs, dtype, d, nl * per_layer, index, True, shape, page_size,
            row_bounds=tuple(2 * per_layer * li for li in range(nl + 1)),
            token_bounds=tuple(per_layer * li for li in range(nl + 1)),
            zero_bounds=(0,) * (nl + 1),
            byte_bounds=tuple(2 * per_layer * li * d * dtype.itemsize for li in range(nl + 1)),
        )  # fmt: skip
    # rows layer by layer, in host memory order within a layer (a decoded chunk lies in (layer, head)
    # order), so the runs merge where the host buffer allows and every layer is a contiguous row range
    cache: dict[str, object] = blocks.cache if isinstance(blocks, ChunkBlocks) else {}
    if "layout:layer-address" not in cache:
        order = sorted(blocks, key=lambda lh: (lh[0], blocks[lh].tensors[0].data_ptr()))
        cache["layout:layer-address"] = tuple(
            (lh[0], lh[1], blocks[lh].token_start, blocks[lh].num_tokens) for lh in order
        )
    layout: tuple[tuple[int, int, int, int], ...] = cache["layout:layer-address"]  # type: ignore[assignment]
    runs = _runs(blocks, "runs:layer-address", lambda: [(li, h) for li, h, _, _ in layout])
    tpl = sparse_template(layout, nl, nh, num_tokens, page_size)
    elem = d * dtype.itemsize
    return LoadPlan(
        runs, dtype, d, int(tpl.blk.numel()), index, False, shape, page_size,
        row_bounds=tpl.row_bounds, token_bounds=tpl.token_bounds, zero_bounds=tpl.zero_bounds,
        byte_bounds=tuple(r * elem for r in tpl.row_bounds), template=tpl,
    )  # fmt: skip


def _kind(blocks: Blocks) -> str:
    """ "encoded" (every block an `EncodedBlock`), "decoded" (none) or "mixed"; once per host group."""
    cache = blocks.cache if isinstance(blocks, ChunkBlocks) else None
    if cache is not None and "kind" in cache:
        return cache["kind"]  # type: ignore[return-value]
    encoded = sum(isinstance(b, EncodedBlock) for b in blocks.values())
    kind = "encoded" if encoded == len(blocks) else "decoded" if encoded == 0 else "mixed"
    if cache is not None:
        cache["kind"] = kind
    return kind


def _encoded_plan(
    blocks: Blocks, pages: torch.Tensor, page_size: int, num_tokens: int, visible: torch.Tensor | None
) -> LoadPlan:
    """The plan of a chunk whose blocks are all `EncodedBlock`s: the payloads are copied in (layer, head)
    order and decoded on the device into rows in that order (dense when every block is whole)."""
    nl, nh, npages = pages.shape
    cache: dict[str, object] = blocks.cache if isinstance(blocks, ChunkBlocks) else {}
    if "layout:encoded" not in cache:
        enc = {lh: cast(EncodedBlock, b) for lh, b in blocks.items()}
        order = sorted(enc)
        first = enc[order[0]]
        codecs = tuple((li, h, enc[li, h].meta.codec, enc[li, h].num_tokens) for li, h in order)
        layout = tuple((li, h, enc[li, h].token_start, enc[li, h].num_tokens) for li, h in order)
        dec = decode_layout(codecs, nl, first.head_dim, first.src_dtype, first.dtype)
        cache["layout:encoded"] = (layout, dec)
        cache["runs:encoded"] = byte_runs([enc[lh].payload for lh in order])
    layout, dec = cache["layout:encoded"]  # type: ignore[misc]
    runs: list[torch.Tensor] = cache["runs:encoded"]  # type: ignore[assignment]
    shape = (nl, nh, npages, num_tokens)
    index = pages.reshape(-1).long()
    if visible is None:
        per_layer = nh * num_tokens
        return LoadPlan(
            runs, dec.dtype, dec.head_dim, nl * per_layer, index, True, shape, page_size,
            row_bounds=dec.row_bounds, token_bounds=tuple(per_layer * li for li in range(nl + 1)),
            zero_bounds=(0,) * (nl + 1), byte_bounds=dec.byte_bounds, decode=dec,
        )  # fmt: skip
    tpl = sparse_template(layout, nl, nh, num_tokens, page_size)
    assert tpl.row_bounds == dec.row_bounds
    return LoadPlan(
        runs, dec.dtype, dec.head_dim, int(tpl.blk.numel()), index, False, shape, page_size,
        row_bounds=tpl.row_bounds, token_bounds=tpl.token_bounds, zero_bounds=tpl.zero_bounds,
        byte_bounds=dec.byte_bounds, template=tpl, decode=dec,
    )  # fmt: skip


def _runs(blocks: Blocks, key: str, order: Callable[[], list[tuple[int, int]]]) -> list[torch.Tensor]:
    """`byte_runs` of the blocks' K and V in `order()`, computed once per host group (`ChunkBlocks`)."""
    cache = blocks.cache if isinstance(blocks, ChunkBlocks) else None
    if cache is not None and key in cache:
        return cache[key]  # type: ignore[return-value]
    lh = order()
    kv = [cast(KVBlock, blocks[b]) for b in lh]
    runs = byte_runs([t for b in kv for t in (b.k, b.v)])
    if cache is not None:
        cache[key] = runs
    return runs


@functools.lru_cache(maxsize=64)
def sparse_template(
    layout: tuple[tuple[int, int, int, int], ...], nl: int, nh: int, num_tokens: int, page_size: int
) -> SparseTemplate:
    """The template of blocks `layout` ((layer, head, token_start, n) in plan order, layers ascending)."""
    meta = torch.tensor(layout, dtype=torch.int64)  # [B, 4]
    n = meta[:, 3]
    bi = torch.repeat_interleave(torch.arange(len(layout)), n)  # [N]: the block of each stored token
    first_row = torch.cumsum(n, 0) - n  # [B]: stored tokens before the block
    within = torch.arange(bi.numel()) - first_row[bi]  # [N]: token index within its block
    pos = meta[bi, 2] + within  # [N] token of the chunk
    visible = _visibility(tuple(sorted(layout)), nl, nh, num_tokens)
    zl, zh, zt = (~visible).nonzero(as_tuple=True)  # [Z] each, (layer, head, token) order
    layer_tokens = torch.zeros(nl, dtype=torch.int64).index_add_(0, meta[:, 0], n)  # [L] stored per layer
    tok_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(layer_tokens, 0)])  # [L + 1]
    zeros = (~visible).reshape(nl, -1).sum(1)  # [L]
    zero_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(zeros, 0)])  # [L + 1]
    return SparseTemplate(
        blk=meta[bi, 0] * nh + meta[bi, 1],
        page=pos // page_size,
        offset=pos % page_size,
        k_rows=2 * first_row[bi] + within,  # the block's K rows come first, then its n V rows
        n_of_token=n[bi],
        zero_blk=zl * nh + zh,
        zero_page=zt // page_size,
        zero_offset=zt % page_size,
        row_bounds=tuple((2 * tok_bounds).tolist()),
        token_bounds=tuple(tok_bounds.tolist()),
        zero_bounds=tuple(zero_bounds.tolist()),
    )


def run_plan(plan: LoadPlan, k_slots: torch.Tensor, v_slots: torch.Tensor, index: torch.Tensor) -> None:
    """Execute `plan` into the pool (`k_slots`, `v_slots` `[num_slots, D]`), on the current stream;
    `index` is `plan.index` already on the pool's device. Copies are asynchronous from pinned runs.
    The one-plan, all-layers case of `store.layer_load` (same staging, rows and scatter)."""
    staged = stage_runs(plan.runs, k_slots.device)
    nl, nh, npages, _ = plan.shape
    rows = plan.rows(staged, 1, 0, nl).to(k_slots.dtype)  # [2N, D]
    scatter_rows(plan, 1, 0, nl, rows, index.view(1, nl * nh, npages), k_slots, v_slots)


def stage_runs(runs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """`runs` (uint8 `[n]` each) copied back to back into one fresh uint8 buffer on `device`, on the
    current stream (asynchronous from pinned memory)."""
    staged = torch.empty(sum(r.numel() for r in runs), dtype=torch.uint8, device=device)
    pos = 0
    for r in runs:
        staged[pos : pos + r.numel()].copy_(r, non_blocking=True)
        pos += r.numel()
    return staged


def scatter_rows(
    plan: LoadPlan,
    num_plans: int,
    first: int,
    end: int,
    rows: torch.Tensor,
    pages: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    dense_slots: torch.Tensor | None = None,
) -> None:
    """Write the rows of layers `[first, end)` of `num_plans` plans of `plan`'s class (same dense/sparse
    layout, template and shape), `rows` `[C · group rows, D]` chunk after chunk in the pool's dtype, to
    their pool slots (`k_slots`, `v_slots` `[num_slots, D]`); `pages` `[C, L·Hkv, P]` the plans' pages on
    the pool's device. Slots are computed on the device (dense plans: `dense_slots`, the class's
    `[C, L·Hkv·T]` slots computed once for every layer group, when given); a sparse plan's zero slots
    of those layers are zeroed. The only scatter of a load plan (`run_plan` and `store.layer_load` both
    end here)."""
    nl, nh, npages, T = plan.shape
    C, d, ps = num_plans, k_slots.shape[-1], plan.page_size
    if plan.dense:
        if dense_slots is not None:
            slots = dense_slots[:, first * nh * T : end * nh * T].reshape(-1)  # [C·Lg·Hkv·T]
        else:
            blocks = pages[:, first * nh : end * nh].reshape(-1, 1, npages)  # [C·Lg·Hkv, 1, P]
            slots = page_slots(blocks, ps, T).reshape(-1)  # [C·Lg·Hkv·T]
        kv = rows.view(-1, 2, T, d)  # per block: K rows then V rows
        k_slots[slots] = kv[:, 0].reshape(-1, d)
        v_slots[slots] = kv[:, 1].reshape(-1, d)
        return
    assert plan.template is not None
    tpl = plan.template.on(k_slots.device)
    t0, t1 = tpl.token_bounds[first], tpl.token_bounds[end]
    z0, z1 = tpl.zero_bounds[first], tpl.zero_bounds[end]
    r0, r1 = tpl.row_bounds[first], tpl.row_bounds[end]
    tok, zero = tpl.slots(pages, ps, slice(t0, t1), slice(z0, z1))  # [C, n], [C, z]
    shift = (torch.arange(C, device=rows.device) * (r1 - r0))[:, None] - r0  # plan rows -> rows of `rows`
    k_rows = tpl.k_rows[t0:t1][None, :] + shift  # [C, n]
    k_slots[tok.reshape(-1)] = rows[k_rows.reshape(-1)]
    v_slots[tok.reshape(-1)] = rows[(k_rows + tpl.n_of_token[t0:t1]).reshape(-1)]
    if zero.numel():
        k_slots.index_fill_(0, zero.reshape(-1), 0)  # a scalar fill (`[idx] = 0` copies a host 0: a sync)
        v_slots.index_fill_(0, zero.reshape(-1), 0)
