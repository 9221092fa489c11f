"""Per-step batch metadata, built once before the forward and read-only inside it.

Backends read only what is here: plain tensors (on the pool's device) and host layout flags, never
`SeqKV` internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Host facts about a sequence's kv tokens, kept by `SeqKV` at O(1) cost.

    `pos_is_index`: token i has RoPE position i. `page_aligned`: token i sits at offset i % page_size of
    the page holding its `i // page_size`-th page-table entry, for every head (so `kv_slots[..., ::ps] //
    ps` is the page table). `all_visible`: every head sees every token.
    """

    num_tokens: int
    pos_is_index: bool = True
    page_aligned: bool = True
    all_visible: bool = True


@dataclass(frozen=True)
class SeqSlice:
    """The new tokens of one sequence in this step: flat rows `[q_start, q_start + q_len)`.

    The sequence's kv view already holds these tokens (appended or overridden before the forward) at
    `new_slots` `[num_layers, num_kv_heads, q_len]`; each attends to every visible kv token with
    position <= its own. `kv_slots` `[L, Hkv, T]` int64 pool slots, `kv_pos` `[T]` int64 positions,
    `kv_visible` `[L, Hkv, T]` bool or None (all visible): device tensors of the sequence's view.
    """

    q_start: int
    q_len: int
    new_slots: torch.Tensor
    kv_slots: torch.Tensor
    kv_pos: torch.Tensor
    kv_visible: torch.Tensor | None
    layout: KVLayout
    # the sequence's id (`SeqKV.seq_id`, set by the runner; -1: none): names it across tensor-parallel ranks
    seq_id: int = -1

    @property
    def num_kv(self) -> int:
        return int(self.kv_pos.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.q_len == 1


@dataclass
class ForwardBatch:
    """`input_ids`, `positions`: `[num_tokens]` int64 (host); `logit_rows` `[M]`: rows whose logits are needed."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    seqs: list[SeqSlice]
    logit_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def new_slots(self) -> torch.Tensor:
        """Slots of all new tokens in flat order: `[num_layers, num_kv_heads, num_tokens]`."""
        return torch.cat([s.new_slots for s in self.seqs], dim=2)
