"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole output.

The method of TGI / vLLM / SGLang: decode a short window of token ids twice, the window up to the
last emitted text (`prefix_offset:read_offset`) and the same window with the new tokens
(`prefix_offset:`); the new text is the difference. Decoding from `prefix_offset` (not from the new
token alone) keeps the tokenizer's context: a SentencePiece "▁word" at the start of a decode loses
its space, and a byte-level BPE token may hold half of a multi-byte character. While the new text
ends in U+FFFD (an incomplete UTF-8 sequence split over tokens) nothing is emitted and the window
grows until the character completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"
# a window this long that still ends in U+FFFD is a real replacement character (an invalid byte
# sequence the model produced), not an incomplete one: emit it rather than hold text forever
_MAX_PENDING_TOKENS = 8


@dataclass
class Detokenizer:
    """The text of one request's output ids, grown token by token.

    Invariant: `text` == decode(ids[:read_offset]) as far as the tokenizer's decode is prefix-stable
    (it is for byte-level BPE and SentencePiece decoders), and `ids[prefix_offset:read_offset]` is the
    window that text was last extended from.
    """

    tokenizer: Any
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add one token; the text it completes (may be "" while a character is incomplete)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the output), emitted as is."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        held = len(self.ids) - self.read_offset
        if not final and after.endswith(_REPLACEMENT) and held < _MAX_PENDING_TOKENS:
            return ""  # an incomplete character: wait for the token that completes it
        if len(after) < len(before) or not after.startswith(before):
            # a decoder that is not prefix-stable on this window (rare: cleanup of spaces): restart
            # the window at the new tokens, which loses no text already emitted
            delta = self._decode(self.ids[self.read_offset :])
        else:
            delta = after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
