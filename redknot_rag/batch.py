"""Per-step batch metadata, built once before the forward and read-only inside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from redknot_rag.kvcache import SeqKV


@dataclass
class SeqSlice:
    """The new tokens of one sequence in this step: flat rows `[q_start, q_start + q_len)`.

    The sequence's `kv` already holds these tokens (appended before the forward) at `new_slots`
    `[num_layers, num_kv_heads, q_len]`; they attend to every kv token with position <= theirs.
    """

    kv: SeqKV
    q_start: int
    q_len: int
    new_slots: torch.Tensor

    @property
    def is_decode(self) -> bool:
        return self.q_len == 1


@dataclass
class ForwardBatch:
    """`input_ids`, `positions`: `[num_tokens]` int64; `logit_rows` `[M]`: rows whose logits are needed."""

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
