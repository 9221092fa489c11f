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

from redknot_rag.config import ModelConfig


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
    """Refcounted page ids. `can_allocate(n)` / `allocate(n)`; `incref` / `decref` (frees at zero)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refcount = np.zeros(num_pages, dtype=np.int32)
        self._free = list(range(num_pages - 1, -1, -1))  # stack; pops low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> np.ndarray:
        """n fresh page ids (refcount 1), int64 `[n]`."""
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} KV pages, {len(self._free)} free of {self.num_pages}")
        ids = np.array([self._free.pop() for _ in range(n)], dtype=np.int64)
        self.refcount[ids] = 1
        return ids

    def incref(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if np.any(self.refcount[ids] <= 0):
            raise RuntimeError("incref on a free page")
        np.add.at(self.refcount, ids, 1)

    def decref(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        np.add.at(self.refcount, ids, -1)
        if np.any(self.refcount[ids] < 0):
            raise RuntimeError("page refcount went negative (double free)")
        for i in np.unique(ids[self.refcount[ids] == 0]).tolist():
            self._free.append(i)


@dataclass
class KVSegment:
    """A run of tokens whose K/V (every layer, every KV head) sit in pool pages.

    `pages` `[num_layers, num_kv_heads, num_pages]` int64: token t of the segment lives in page
    `pages[l, h, t // page_size]` at offset `t % page_size`. A shared segment is never written.
    """

    pages: torch.Tensor
    num_tokens: int
    is_shared: bool = False

    def slots(self, page_size: int) -> torch.Tensor:
        """Pool slot of every token: `[num_layers, num_kv_heads, num_tokens]` int64."""
        nl, nh, npages = self.pages.shape
        offsets = torch.arange(page_size, dtype=self.pages.dtype)
        slots = self.pages[:, :, :, None] * page_size + offsets  # [L, Hkv, P, page_size], no gather
        return slots.view(nl, nh, npages * page_size)[:, :, : self.num_tokens]


@dataclass
class AttachedSegment:
    """A segment placed in a sequence: where it starts, its tokens' positions and per-head visibility."""

    segment: KVSegment
    seq_start: int
    positions: torch.Tensor  # [num_tokens] int64
    visible: torch.Tensor | None = None  # [num_layers, num_kv_heads, num_tokens] bool; None = all


@dataclass
class SeqKV:
    """The KV view of one sequence, in sequence order, for every (layer, kv_head).

    `slots[l, h, i]` is the pool slot of token i for head (l, h); `positions[i]` its RoPE position;
    `visible[l, h, i]` whether head (l, h) attends to it (local heads drop the middle of a context).
    Tokens appended by the engine go to private pages owned by this sequence.
    """

    num_layers: int
    num_kv_heads: int
    page_size: int
    slots: torch.Tensor = field(init=False)
    positions: torch.Tensor = field(init=False)
    visible: torch.Tensor | None = field(init=False, default=None)
    num_tokens: int = field(init=False, default=0)
    segments: list[AttachedSegment] = field(init=False, default_factory=list)
    private_pages: list[np.ndarray] = field(init=False, default_factory=list)  # each [L*Hkv]
    cow_pages: list[np.ndarray] = field(init=False, default_factory=list)  # pages of overridden tokens
    _tail_used: int = field(init=False, default=0)
    _private_start: int = field(init=False, default=0)  # first token in private_pages

    def __post_init__(self) -> None:
        self.slots = torch.zeros(self.num_layers, self.num_kv_heads, 64, dtype=torch.int64)
        self.positions = torch.zeros(64, dtype=torch.int64)

    @property
    def capacity(self) -> int:
        return self.positions.shape[0]

    def _reserve(self, n: int) -> None:
        need = self.num_tokens + n
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        slots = torch.zeros(self.num_layers, self.num_kv_heads, cap, dtype=torch.int64)
        slots[:, :, : self.num_tokens] = self.slots[:, :, : self.num_tokens]
        pos = torch.zeros(cap, dtype=torch.int64)
        pos[: self.num_tokens] = self.positions[: self.num_tokens]
        self.slots, self.positions = slots, pos
        if self.visible is not None:
            vis = torch.ones(self.num_layers, self.num_kv_heads, cap, dtype=torch.bool)
            vis[:, :, : self.num_tokens] = self.visible[:, :, : self.num_tokens]
            self.visible = vis

    def _ensure_visible(self) -> torch.Tensor:
        if self.visible is None:
            self.visible = torch.ones(self.num_layers, self.num_kv_heads, self.capacity, dtype=torch.bool)
        return self.visible

    def attach(
        self,
        segment: KVSegment,
        positions: torch.Tensor,
        allocator: PageAllocator,
        visible: torch.Tensor | None = None,
    ) -> None:
        """Append a shared segment (refcount +1 on its pages). Segments come before private tokens."""
        if self.private_pages:
            raise RuntimeError("attach after private tokens would break the private page layout")
        n = segment.num_tokens
        self._reserve(n)
        allocator.incref(segment.pages.numpy())
        s = self.num_tokens
        self.slots[:, :, s : s + n] = segment.slots(self.page_size)
        self.positions[s : s + n] = positions
        if visible is not None:
            self._ensure_visible()[:, :, s : s + n] = visible
        elif self.visible is not None:
            self.visible[:, :, s : s + n] = True
        self.segments.append(AttachedSegment(segment, s, positions.clone(), visible))
        self.num_tokens += n
        self._tail_used = self.page_size  # next private token starts a fresh page
        self._private_start = self.num_tokens

    def pages_needed(self, n: int) -> int:
        """Pages (over all L*Hkv heads) that appending n private tokens would allocate."""
        room = self.page_size - self._tail_used if self.private_pages else 0
        extra = max(0, n - room)
        return -(-extra // self.page_size) * self.num_layers * self.num_kv_heads

    def append(self, positions: torch.Tensor, allocator: PageAllocator) -> torch.Tensor:
        """Reserve private slots for new tokens; returns their slots `[L, Hkv, n]`."""
        n = positions.shape[0]
        self._reserve(n)
        lh = self.num_layers * self.num_kv_heads
        out = torch.empty(self.num_layers, self.num_kv_heads, n, dtype=torch.int64)
        i = 0
        while i < n:
            if not self.private_pages or self._tail_used >= self.page_size:
                self.private_pages.append(allocator.allocate(lh))
                self._tail_used = 0
            take = min(n - i, self.page_size - self._tail_used)
            page = torch.from_numpy(self.private_pages[-1]).view(self.num_layers, self.num_kv_heads, 1)
            offs = torch.arange(self._tail_used, self._tail_used + take)
            out[:, :, i : i + take] = page * self.page_size + offs  # [L, Hkv, take]
            self._tail_used += take
            i += take
        s = self.num_tokens
        self.slots[:, :, s : s + n] = out
        self.positions[s : s + n] = positions
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
        lh = self.num_layers * self.num_kv_heads
        num_pages = -(-n // self.page_size)
        pages = allocator.allocate(num_pages * lh)
        self.cow_pages.append(pages)
        pages_t = torch.from_numpy(pages).view(num_pages, self.num_layers, self.num_kv_heads)
        t = torch.arange(n)
        out = (pages_t[t // self.page_size] * self.page_size + (t % self.page_size)[:, None, None]).permute(1, 2, 0)
        self.slots[:, :, token_index] = out  # [L, Hkv, n]
        return out

    def truncate(self, n: int, allocator: PageAllocator) -> None:
        """Drop appended private tokens `[n, num_tokens)` (e.g. a probe pass); frees their pages."""
        if n < self._private_start or n > self.num_tokens:
            raise ValueError(f"can only truncate appended tokens (>= {self._private_start}), got {n}")
        keep = -(-(n - self._private_start) // self.page_size)
        while len(self.private_pages) > keep:
            allocator.decref(self.private_pages.pop())
        used = (n - self._private_start) - (keep - 1) * self.page_size
        self._tail_used = used if keep else 0
        self.num_tokens = n

    def release(self, allocator: PageAllocator) -> None:
        """Drop every page reference this sequence holds. Idempotent."""
        for att in self.segments:
            allocator.decref(att.segment.pages.numpy())
        for pages in self.private_pages + self.cow_pages:
            allocator.decref(pages)
        self.segments.clear()
        self.private_pages.clear()
        self.cow_pages.clear()
        self.num_tokens = 0
        self._tail_used = 0


def pool_pages_for(cfg: ModelConfig, num_tokens: int, page_size: int) -> int:
    """Pages one sequence of `num_tokens` private tokens needs (all layers and KV heads)."""
    return -(-num_tokens // page_size) * cfg.num_kv_blocks
