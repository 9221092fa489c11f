"""Per-head windows in the KV pool: which (layer, kv head) blocks keep only a sink and a recent window.

A head marked local keeps, for every sequence, the pages of its first `sink` tokens and the pages that
hold keys a later query may still read: a key at position p is dropped once p <= next_pos - window
(`next_pos` = one past the largest position in the sequence). Its pages are released (refcount) as the
window slides; global heads keep every page. `SeqKV.slide` (kvcache.py) does the release.

Two sources:
- `architecture`: the model's own sliding-window layers (Gemma 3: 15 of 18 layers, window 512), sink 0.
  Exact: a sliding layer's query at position q reads keys with p > q - window, so no dropped key is ever
  read again and the logits are those of a dense pool.
- `profile`: the heads a head profile classes local (`profiles/<model>.json`), window and sink as given.
  An approximation whose fidelity is measured (bench/pool/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from redknot_rag.config import ModelConfig
from redknot_rag.heads import LOCAL, HeadProfile

POOL_LOCAL_MODES = ("auto", "profile", "architecture", "off")


@dataclass(frozen=True)
class PoolWindows:
    """`local` `[L, Hkv]` bool (host): the blocks that keep only `sink` leading tokens + the last `window`.

    `source`: "architecture" or "profile"; `exact`: dropping never changes the logits (architecture)."""

    local: torch.Tensor
    sink: int
    window: int
    source: str
    exact: bool

    def __post_init__(self) -> None:
        if self.window < 1 or self.sink < 0:
            raise ValueError(f"pool window needs window >= 1 and sink >= 0, got {self.window}, {self.sink}")

    @property
    def num_local(self) -> int:
        return int(self.local.sum())

    @property
    def num_blocks(self) -> int:
        return int(self.local.numel())

    def kept_pages(self, num_tokens: int, page_size: int, chunk: int = 0) -> int:
        """Upper bound on the pages one local block of a `num_tokens`-token sequence holds at any time
        when tokens arrive `chunk` at a time (a prefill chunk or 1 for decode): sink pages + the pages
        spanning window + chunk tokens (+1 for page misalignment at each end)."""
        dense = -(-num_tokens // page_size)
        sink_pages = -(-self.sink // page_size)
        span = -(-(self.window + max(chunk, 1)) // page_size) + 2
        return min(dense, sink_pages + span)

    def pages_for(self, num_tokens: int, page_size: int, chunk: int = 0) -> tuple[int, int]:
        """(global-class pages, local-class pages) a sequence of `num_tokens` needs at most."""
        dense = -(-num_tokens // page_size)
        nl = self.num_local
        return (self.num_blocks - nl) * dense, nl * self.kept_pages(num_tokens, page_size, chunk)

    @classmethod
    def from_architecture(cls, cfg: ModelConfig) -> PoolWindows | None:
        """The model's own sliding-window layers as local blocks, `[L, cfg.num_kv_heads]` (a tensor-parallel
        rank's cfg is its shard); None if it has none."""
        if not cfg.has_sliding_layers or cfg.sliding_window is None:
            return None
        sliding = torch.tensor([cfg.is_sliding(i) for i in range(cfg.num_layers)], dtype=torch.bool)
        local = sliding[:, None].expand(cfg.num_layers, cfg.num_kv_heads)
        return cls(local.contiguous(), 0, int(cfg.sliding_window), "architecture", True)

    @classmethod
    def from_profile(
        cls, profile: HeadProfile, kv_heads: slice | None = None, sink: int = 4, window: int | None = None
    ) -> PoolWindows:
        """The profile's local heads keep `sink` leading tokens + `window` (default: the profile's)."""
        local = profile.class_tensor()[:, kv_heads or slice(None)] == LOCAL
        return cls(local.contiguous(), sink, int(window or profile.window), "profile", False)


def choose_pool_windows(
    mode: str, cfg: ModelConfig, profile: HeadProfile | None, kv_heads: slice | None = None, sink: int = 4
) -> tuple[PoolWindows | None, str]:
    """The windows a runner's pool keeps, and why (one line for logs and /server_info).

    `auto`: the architecture's sliding windows where the model has them (exact); otherwise none — a
    profile's local heads change the logits, and their fidelity on long prompts (bench/pool/) did not meet
    the issue's bar for default-on, so they are opt-in (`profile`). `profile`: the architecture windows if
    any, else the profile's local heads (error without a profile). `architecture`: only the model's own.
    `off`: none."""
    if mode not in POOL_LOCAL_MODES:
        raise ValueError(f"unknown --pool-local-heads {mode!r}; choose from {', '.join(POOL_LOCAL_MODES)}")
    if mode == "off":
        return None, "off (--pool-local-heads off)"
    arch = PoolWindows.from_architecture(cfg)
    if arch is not None:
        return arch, f"architecture: {arch.num_local}/{arch.num_blocks} blocks sliding, window {arch.window} (exact)"
    if mode in ("auto", "architecture"):
        return None, "off: no sliding-window layers; profile windows are opt-in (--pool-local-heads profile)"
    if profile is None:
        raise ValueError("--pool-local-heads profile needs a head profile for this model (redknot profile-heads)")
    win = PoolWindows.from_profile(profile, kv_heads, sink=sink)
    return win, f"profile: {win.num_local}/{win.num_blocks} blocks local, sink {win.sink}, window {win.window}"
