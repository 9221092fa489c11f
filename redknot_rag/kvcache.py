"""Head-granular paged KV memory.

Invariants:
- A page holds `page_size` tokens of ONE KV head of ONE layer: K and V, `[page_size, head_dim]` each.
  One pool per device holds all layers' pages; page ids are global.
- K in the pool is pre-RoPE; attention rotates it from explicit token positions when it reads.
- A page is free iff its refcount is 0. Shared (stored-chunk) pages are read-only: a request writes
  only into pages it allocated itself (refcount 1, private).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from redknot_rag.batch import KVLayout, SeqSlice
from redknot_rag.config import ModelConfig
from redknot_rag.window import PoolWindows


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than asked for."""


class KVPool:
    """K and V page storage: `k`, `v` are `[num_pages, page_size, head_dim]`."""

    def __init__(
        self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        if num_pages <= 0:
            raise ValueError(f"KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.k = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)

    @property
    def k_slots(self) -> torch.Tensor:
        """`[num_pages * page_size, head_dim]` view: slot = page * page_size + offset."""
        return self.k.view(-1, self.head_dim)

    @property
    def v_slots(self) -> torch.Tensor:
        return self.v.view(-1, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.page_size * self.head_dim * self.k.element_size()

    @property
    def num_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @staticmethod
    def pages_for_budget(budget_bytes: int, page_size: int, head_dim: int, dtype: torch.dtype) -> int:
        per_page = 2 * page_size * head_dim * torch.empty(0, dtype=dtype).element_size()
        return max(1, int(budget_bytes // per_page))


class PageAllocator:
    """Refcounted page ids. `can_allocate(n)` / `allocate(n)`; `incref` / `decref` (frees at zero).

    The free list is a numpy stack (no per-page Python work): allocating the 0.5M pages of a 32K-token
    prefill of an 8B model is one slice, not 0.5M list pops.
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refcount = np.zeros(num_pages, dtype=np.int32)
        self._free = np.arange(num_pages - 1, -1, -1, dtype=np.int64)  # stack; top = end; pops low ids first
        self._num_free = num_pages

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_pages - self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int) -> np.ndarray:
        """n fresh page ids (refcount 1), int64 `[n]`."""
        if n > self._num_free:
            raise OutOfPagesError(f"need {n} KV pages, {self._num_free} free of {self.num_pages}")
        top = self._num_free
        ids = self._free[top - n : top][::-1].copy()
        self._num_free -= n
        self.refcount[ids] = 1
        return ids

    def incref(self, ids: np.ndarray, unique: bool = False) -> None:
        """+1 on every listed page. `unique=True` promises no id repeats (a segment's own pages):
        a plain fancy-index add, ~20x faster than `np.add.at` (relocating 64 chunks of an 8B model
        increfs 0.5M pages)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if np.any(self.refcount[ids] <= 0):
            raise RuntimeError("incref on a free page")
        if unique:
            self.refcount[ids] += 1
        else:
            np.add.at(self.refcount, ids, 1)

    def decref(self, ids: np.ndarray, unique: bool = False) -> None:
        """-1 on every listed page; pages reaching 0 are freed. `unique` as for `incref`."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if unique:
            self.refcount[ids] -= 1
        else:
            np.add.at(self.refcount, ids, -1)
        if np.any(self.refcount[ids] < 0):
            np.add.at(self.refcount, ids, 1)  # leave the counts as they were
            raise RuntimeError("page refcount went negative (double free)")
        freed = ids[self.refcount[ids] == 0]
        if not unique:
            freed = np.unique(freed)[::-1]  # pushed high first: low ids pop first
        self._free[self._num_free : self._num_free + freed.shape[0]] = freed
        self._num_free += freed.shape[0]


@dataclass
class KVSegment:
    """A run of tokens whose K/V (every layer, every KV head) sit in pool pages.

    `pages` `[num_layers, num_kv_heads, num_pages]` int64 (host): token t of the segment lives in page
    `pages[l, h, t // page_size]` at offset `t % page_size`. A shared segment is never written.
    Its slot table is built once per device and cached (`device_slots`): attaching is a concatenation.
    """

    pages: torch.Tensor
    num_tokens: int
    is_shared: bool = False
    # [L, Hkv, num_tokens] bool: the tokens each head's stored KV holds (a local head's store keeps only the
    # chunk's tail window; its other pages hold zeros and must never be read). None: every token, every head.
    visible: torch.Tensor | None = None
    # set by the runner that allocated it (`KVRunner.allocate_segment`): names it on every tensor-parallel rank
    segment_id: int = -1
    _slots_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def slots(self, page_size: int) -> torch.Tensor:
        """Pool slot of every token: `[num_layers, num_kv_heads, num_tokens]` int64 (host)."""
        nl, nh, npages = self.pages.shape
        offsets = torch.arange(page_size, dtype=self.pages.dtype)
        slots = self.pages[:, :, :, None] * page_size + offsets  # [L, Hkv, P, page_size], no gather
        return slots.view(nl, nh, npages * page_size)[:, :, : self.num_tokens]

    def device_slots(self, page_size: int, device: torch.device) -> torch.Tensor:
        """`slots(page_size)` on `device`, built once and cached: `[L, Hkv, num_tokens]` int64."""
        key = (page_size, str(device))
        out = self._slots_cache.get(key)
        if out is None:
            pages = self.pages.to(device, non_blocking=True)
            nl, nh, npages = pages.shape
            offsets = torch.arange(page_size, dtype=torch.int64, device=device)
            out = (pages[:, :, :, None] * page_size + offsets).view(nl, nh, npages * page_size)
            out = out[:, :, : self.num_tokens].contiguous()
            self._slots_cache[key] = out
        return out


@dataclass
class AttachedSegment:
    """A segment placed in a sequence: where it starts, its first position, per-head visibility."""

    segment: KVSegment
    seq_start: int
    positions: torch.Tensor  # [num_tokens] int64 (device)
    visible: torch.Tensor | None = None  # [num_layers, num_kv_heads, num_tokens] bool; None = all
    # pool windows: this sequence dropped its references to pages [released_lo, released_hi) of the
    # local blocks (`SeqKV.windows`); the segment's other holders keep them
    released_lo: int = 0
    released_hi: int = 0


@dataclass
class SeqKV:
    """The KV view of one sequence, in sequence order, for every (layer, kv_head), kept on `device`.

    `slots[l, h, i]` is the pool slot of token i for head (l, h); `positions[i]` its RoPE position;
    `visible[l, h, i]` whether head (l, h) attends to it (local heads drop the middle of a context).
    All three are device tensors (capacity grows by doubling); attaching a segment concatenates its
    cached device slot table, appending computes slots on the device from the new page ids: no
    per-token host work. Tokens appended by the engine go to private pages owned by this sequence.

    Pool windows (`windows`, see window.py): `slide()` after a forward drops this sequence's references
    to the pages of local (layer, kv_head) blocks whose every token fell out of the window (past the sink),
    and marks those tokens invisible for those blocks, so every backend reads only what a block keeps.
    Invariant: per group of pages (an attached segment, the private pages) the released pages of the
    local blocks are one range `[released_lo, released_hi)`; `release` and `truncate` skip them.

    Host layout flags (O(1) checks for the attention backends, see `layout`):
    - `pos_is_index`: positions[i] == i for every token (every attach/append used consecutive positions);
    - `page_aligned`: token i sits at page-offset i % page_size of the page table's i // page_size-th
      page for every head (segments and private tokens start on page boundaries; no override).
    """

    num_layers: int
    num_kv_heads: int
    page_size: int
    device: torch.device = torch.device("cpu")  # a str is accepted and converted
    windows: PoolWindows | None = None
    seq_id: int = -1  # set by the runner that made it (`KVRunner.new_seq_kv`); goes into every `SeqSlice`
    slots: torch.Tensor = field(init=False)
    positions: torch.Tensor = field(init=False)
    visible: torch.Tensor | None = field(init=False, default=None)
    num_tokens: int = field(init=False, default=0)
    segments: list[AttachedSegment] = field(init=False, default_factory=list)
    private_pages: list[np.ndarray] = field(init=False, default_factory=list)  # each [L*Hkv]
    cow_pages: list[np.ndarray] = field(init=False, default_factory=list)  # pages of overridden tokens
    pos_is_index: bool = field(init=False, default=True)
    page_aligned: bool = field(init=False, default=True)
    _tail_used: int = field(init=False, default=0)
    _private_start: int = field(init=False, default=0)  # first token in private_pages
    _tail_page: torch.Tensor | None = field(init=False, default=None)  # [L, Hkv] device: last private page
    _priv_released: tuple[int, int] = field(init=False, default=(0, 0))  # private pages [lo, hi) released
    _cut: int = field(init=False, default=0)  # tokens [sink, _cut) are past every local block's window

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)  # callers may pass "cuda"
        if self.windows is not None:
            if tuple(self.windows.local.shape) != (self.num_layers, self.num_kv_heads):
                raise ValueError(
                    f"pool windows are {tuple(self.windows.local.shape)}, kv is {self.num_layers}x{self.num_kv_heads}"
                )
            self._local_flat = self.windows.local.reshape(-1).numpy().astype(bool)  # [L*Hkv] host
            self._local_dev = self.windows.local.to(self.device)  # [L, Hkv]
        self.slots = torch.zeros(self.num_layers, self.num_kv_heads, 64, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(64, dtype=torch.int64, device=self.device)

    @property
    def capacity(self) -> int:
        return self.positions.shape[0]

    def _reserve(self, n: int) -> None:
        need = self.num_tokens + n
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        t, dev = self.num_tokens, self.device
        slots = torch.zeros(self.num_layers, self.num_kv_heads, cap, dtype=torch.int64, device=dev)
        slots[:, :, :t] = self.slots[:, :, :t]
        pos = torch.zeros(cap, dtype=torch.int64, device=dev)
        pos[:t] = self.positions[:t]
        self.slots, self.positions = slots, pos
        if self.visible is not None:
            vis = torch.ones(self.num_layers, self.num_kv_heads, cap, dtype=torch.bool, device=dev)
            vis[:, :, :t] = self.visible[:, :, :t]
            self.visible = vis

    def _ensure_visible(self) -> torch.Tensor:
        if self.visible is None:
            self.visible = torch.ones(
                self.num_layers, self.num_kv_heads, self.capacity, dtype=torch.bool, device=self.device
            )
        return self.visible

    def _note_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Track `pos_is_index` for positions of tokens [num_tokens, num_tokens + n); returns them on device."""
        n = positions.shape[0]
        if self.pos_is_index and n:
            if positions.device.type == "cpu":
                same = torch.equal(positions, torch.arange(self.num_tokens, self.num_tokens + n))
            else:  # device positions: one sync (rare; callers pass host aranges)
                want = torch.arange(self.num_tokens, self.num_tokens + n, device=positions.device)
                same = bool((positions == want).all())
            self.pos_is_index = same
        return positions.to(self.device, torch.int64, non_blocking=True)

    def attach(
        self,
        segment: KVSegment,
        positions: torch.Tensor,
        allocator: PageAllocator,
        visible: torch.Tensor | None = None,
    ) -> None:
        """Append a shared segment (refcount +1 on its pages). Segments come before private tokens."""
        self.attach_many([(segment, positions, visible)], allocator)

    def attach_many(
        self,
        items: list[tuple[KVSegment, torch.Tensor, torch.Tensor | None]],
        allocator: PageAllocator,
    ) -> None:
        """Append shared segments `(segment, positions [n], visible [L, Hkv, n] | None)` in order: one
        device concatenation of their cached slot tables."""
        if self.private_pages:
            raise RuntimeError("attach after private tokens would break the private page layout")
        if not items:
            return
        for seg, positions, _ in items:
            if positions.shape[0] != seg.num_tokens:
                raise ValueError(f"segment has {seg.num_tokens} tokens but {positions.shape[0]} positions")
        self._reserve(sum(seg.num_tokens for seg, _, _ in items))
        for seg, _, _ in items:
            allocator.incref(seg.pages.numpy(), unique=True)  # a segment's pages are distinct
        s0 = s = self.num_tokens
        tables, poss = [], []
        for seg, positions, visible in items:
            n = seg.num_tokens
            if s % self.page_size:
                self.page_aligned = False
            pos = self._note_positions(positions)
            tables.append(seg.device_slots(self.page_size, self.device))
            poss.append(pos)
            if visible is not None:
                self._ensure_visible()[:, :, s : s + n] = visible.to(self.device, non_blocking=True)
            elif self.visible is not None:
                self.visible[:, :, s : s + n] = True
            self.segments.append(AttachedSegment(seg, s, pos, visible))
            s += n
            self.num_tokens = s  # _note_positions reads it
        self.slots[:, :, s0:s] = tables[0] if len(tables) == 1 else torch.cat(tables, dim=2)
        self.positions[s0:s] = poss[0] if len(poss) == 1 else torch.cat(poss)
        self._tail_used = self.page_size  # next private token starts a fresh page
        self._private_start = self.num_tokens

    def pages_needed(self, n: int) -> int:
        """Pages (over all L*Hkv heads) that appending n private tokens would allocate."""
        room = self.page_size - self._tail_used if self.private_pages else 0
        extra = max(0, n - room)
        return -(-extra // self.page_size) * self.num_layers * self.num_kv_heads

    def append(self, positions: torch.Tensor, allocator: PageAllocator) -> torch.Tensor:
        """Reserve private slots for new tokens; returns their slots `[L, Hkv, n]` (device int64)."""
        n = positions.shape[0]
        if n == 0:
            return torch.zeros(self.num_layers, self.num_kv_heads, 0, dtype=torch.int64, device=self.device)
        self._reserve(n)
        nl, nh, ps = self.num_layers, self.num_kv_heads, self.page_size
        if not self.private_pages and self.num_tokens % ps:
            self.page_aligned = False
        room = ps - self._tail_used if self.private_pages else 0
        head = min(room, n)  # tokens that go to the current tail page
        num_new = -(-(n - head) // ps)
        parts = []
        if head:
            assert self._tail_page is not None
            offs = torch.arange(self._tail_used, self._tail_used + head, device=self.device)
            parts.append(self._tail_page[:, :, None] * ps + offs)  # [L, Hkv, head]
        if num_new:
            ids = allocator.allocate(num_new * nl * nh).reshape(num_new, nl * nh)
            self.private_pages.extend(ids)
            pages = torch.from_numpy(ids).to(self.device, non_blocking=True).view(num_new, nl, nh)
            pages = pages.permute(1, 2, 0)  # [L, Hkv, P]
            slots = pages[:, :, :, None] * ps + torch.arange(ps, device=self.device)  # [L, Hkv, P, ps]
            parts.append(slots.reshape(nl, nh, num_new * ps)[:, :, : n - head])
            self._tail_page = pages[:, :, -1].contiguous()
            self._tail_used = (n - head) - (num_new - 1) * ps
        else:
            self._tail_used += head
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        s = self.num_tokens
        pos = self._note_positions(positions)
        self.slots[:, :, s : s + n] = out
        self.positions[s : s + n] = pos
        if self.visible is not None:
            self.visible[:, :, s : s + n] = True
        self.num_tokens += n
        return out

    def override(self, token_index: torch.Tensor, allocator: PageAllocator) -> torch.Tensor:
        """Copy-on-write: give tokens `token_index` `[n]` fresh private slots (for recomputed KV).

        Shared segment pages are never written; the sequence's view is redirected instead.
        Returns the new slots `[L, Hkv, n]` (the caller writes them, e.g. by a recompute forward).
        """
        n = int(token_index.shape[0])
        nl, nh, ps = self.num_layers, self.num_kv_heads, self.page_size
        num_pages = -(-n // ps)
        pages = allocator.allocate(num_pages * nl * nh)
        self.cow_pages.append(pages)
        self.page_aligned = False
        pages_t = torch.from_numpy(pages).to(self.device, non_blocking=True).view(num_pages, nl, nh)
        slots = pages_t.permute(1, 2, 0)[:, :, :, None] * ps + torch.arange(ps, device=self.device)
        out = slots.reshape(nl, nh, num_pages * ps)[:, :, :n]  # [L, Hkv, n]
        self.slots[:, :, token_index.to(self.device)] = out
        return out

    def truncate(self, n: int, allocator: PageAllocator) -> None:
        """Drop appended private tokens `[n, num_tokens)` (e.g. a probe pass); frees their pages."""
        if n < self._private_start or n > self.num_tokens:
            raise ValueError(f"can only truncate appended tokens (>= {self._private_start}), got {n}")
        keep = -(-(n - self._private_start) // self.page_size)
        if keep < self._priv_released[1]:
            raise ValueError(f"cannot truncate to {n}: pool windows released pages of the tokens before it")
        if len(self.private_pages) > keep:
            allocator.decref(np.concatenate(self.private_pages[keep:]), unique=True)
            del self.private_pages[keep:]
        used = (n - self._private_start) - (keep - 1) * self.page_size
        self._tail_used = used if keep else 0
        if keep:
            last = torch.from_numpy(self.private_pages[-1]).to(self.device, non_blocking=True)
            self._tail_page = last.view(self.num_layers, self.num_kv_heads)
        else:
            self._tail_page = None
        self.num_tokens = n

    def release(self, allocator: PageAllocator) -> None:
        """Drop every page reference this sequence holds. Idempotent."""
        # each group lists distinct pages (a segment's, the private ones, the copied ones); the same
        # segment attached twice is two groups, so counts stay right
        for att in self.segments:
            pages = att.segment.pages.numpy()  # [L, Hkv, P]
            if att.released_hi > att.released_lo:
                held = np.ones(pages.shape, dtype=bool)
                held[self.windows.local.numpy(), att.released_lo : att.released_hi] = False  # type: ignore[union-attr]
                pages = pages[held]
            allocator.decref(pages, unique=True)
        own = self.private_pages + self.cow_pages
        if own:
            lo, hi = self._priv_released
            if hi > lo:
                priv = np.stack(self.private_pages)  # [J, L*Hkv]
                held = np.ones(priv.shape, dtype=bool)
                held[lo:hi, self._local_flat] = False
                own = [priv[held], *self.cow_pages]
            allocator.decref(np.concatenate(own), unique=True)
        self.segments.clear()
        self.private_pages.clear()
        self.cow_pages.clear()
        self.num_tokens = 0
        self._tail_used = 0
        self._tail_page = None
        self._priv_released = (0, 0)
        self._cut = 0
        self.pos_is_index = True
        self.page_aligned = True

    # ---- pool windows ---------------------------------------------------------------------
    def window_cut(self) -> int:
        """First token index a local block must keep past the sink: every token before it has position
        <= next_pos - window (next_pos = largest position + 1), so no later query's window reaches it.
        One device sync unless positions are the indices."""
        assert self.windows is not None
        t, w = self.num_tokens, self.windows.window
        if t == 0:
            return 0
        if self.pos_is_index:
            return max(0, min(t, t - w + 1))
        pos = self.positions[:t]
        late = pos > pos.max() + 1 - w  # [T] tokens some later query may still read
        return int(late.int().argmax()) if bool(late.any()) else t

    @staticmethod
    def _page_range(s0: int, n: int, ps: int, sink: int, cut: int, full_only: bool) -> tuple[int, int]:
        """Pages `[lo, hi)` of a group (tokens `[s0, s0 + n)`, page p = tokens from s0 + p*ps) whose every
        token lies in `[sink, cut)`. `full_only`: a partly filled last page is never counted (it is
        still being appended to)."""
        npages = n // ps if full_only else -(-n // ps)
        lo = max(0, -(-(sink - s0) // ps))
        end = s0 + n
        hi = npages if cut >= end and not full_only else min(npages, max(0, (cut - s0) // ps))
        return lo, max(lo, hi)

    def slide(self, allocator: PageAllocator) -> int:
        """Release the local blocks' pages that fell out of the window; returns how many page references
        were dropped. A no-op without `windows`. Called after a forward (never inside one)."""
        win = self.windows
        if win is None or not win.num_local or self.num_tokens == 0:
            return 0
        cut = self.window_cut()
        if cut <= self._cut:
            return 0
        self._cut = cut
        ps, sink = self.page_size, win.sink
        local_np = win.local.numpy()
        dropped: list[np.ndarray] = []
        spans: list[tuple[int, int]] = []  # token ranges newly hidden from local blocks
        for att in self.segments:
            s0, n = att.seq_start, att.segment.num_tokens
            if s0 >= cut:
                break
            lo, hi = self._page_range(s0, n, ps, sink, cut, full_only=False)
            start = max(lo, att.released_hi)  # lo depends only on (s0, sink): the same every slide
            if hi <= start:
                continue
            dropped.append(att.segment.pages[:, :, start:hi].numpy()[local_np].ravel())
            spans.append((s0 + start * ps, min(s0 + hi * ps, s0 + n)))
            att.released_lo, att.released_hi = lo, hi
        if self.private_pages:
            s0, n = self._private_start, self.num_tokens - self._private_start
            lo, hi = self._page_range(s0, n, ps, sink, cut, full_only=True)
            start = max(lo, self._priv_released[1])
            if hi > start:
                dropped.append(np.stack(self.private_pages[start:hi])[:, self._local_flat].ravel())
                spans.append((s0 + start * ps, s0 + hi * ps))
                self._priv_released = (lo, hi)
        if not dropped:
            return 0
        vis = self._ensure_visible()
        keep = ~self._local_dev[:, :, None]  # [L, Hkv, 1]
        for a, b in spans:
            vis[:, :, a:b] &= keep
        ids = np.concatenate(dropped)
        allocator.decref(ids, unique=True)
        return int(ids.shape[0])

    def held_pages(self) -> tuple[int, int]:
        """(global-class, local-class) page references this sequence holds now (private, copied and
        attached segment pages; a shared page counts once per holder). Without windows all are global."""
        nb = self.num_layers * self.num_kv_heads
        nloc = self.windows.num_local if self.windows is not None else 0
        glob = loc = 0
        groups = [(att.segment.pages.shape[2], att.released_hi - att.released_lo) for att in self.segments]
        groups.append((len(self.private_pages), self._priv_released[1] - self._priv_released[0]))
        for npages, released in groups:
            glob += (nb - nloc) * npages
            loc += nloc * npages - nloc * max(0, released)
        cow = sum(int(p.shape[0]) for p in self.cow_pages)
        return glob + cow * (nb - nloc) // nb, loc + cow * nloc // nb

    def released_pages(self) -> int:
        """Page references of local blocks this sequence dropped to its windows (what a dense pool would
        still hold for it, beside `held_pages`)."""
        nloc = self.windows.num_local if self.windows is not None else 0
        ranges = [att.released_hi - att.released_lo for att in self.segments]
        return nloc * (sum(ranges) + self._priv_released[1] - self._priv_released[0])

    def private_pages_held(self) -> int:
        """Private page references held (every block), after window releases: what the scheduler's
        reservation of this sequence has used so far."""
        nloc = self.windows.num_local if self.windows is not None else 0
        lo, hi = self._priv_released
        return len(self.private_pages) * self.num_layers * self.num_kv_heads - nloc * max(0, hi - lo)

    def layout(self) -> KVLayout:
        """Host facts about the current token layout (see the class docstring)."""
        return KVLayout(
            num_tokens=self.num_tokens,
            pos_is_index=self.pos_is_index,
            page_aligned=self.page_aligned,
            all_visible=self.visible is None,
        )

    def slice(self, q_start: int, q_len: int, new_slots: torch.Tensor) -> SeqSlice:
        """This step's view for the attention backend: plain device tensors over tokens [0, num_tokens)."""
        t = self.num_tokens
        return SeqSlice(
            q_start=q_start,
            q_len=q_len,
            new_slots=new_slots,
            kv_slots=self.slots[:, :, :t],
            kv_pos=self.positions[:t],
            kv_visible=None if self.visible is None else self.visible[:, :, :t],
            layout=self.layout(),
            seq_id=self.seq_id,
        )


def pool_pages_for(cfg: ModelConfig, num_tokens: int, page_size: int) -> int:
    """Pages one sequence of `num_tokens` private tokens needs (all layers and KV heads)."""
    return -(-num_tokens // page_size) * cfg.num_kv_blocks
