"""Token-aware chunking: cut a document into chunks of at most `chunk_tokens` model tokens.

Invariants (tested):
- `chunk.text == doc.text[chunk.char_start:chunk.char_end]` exactly;
- `chunk.num_tokens == len(tokenizer.encode(chunk.text, add_special_tokens=False))
  <= chunk_tokens` — every chunk is re-encoded once to verify, since BPE counts are not
  additive across a cut;
- chunks neither start nor end with whitespace, and they cover every non-whitespace char.

Cut preference: the last paragraph end, else the last sentence end, else the last whitespace
that keeps the chunk at least `min_fill` of its token budget; a word longer than the budget
is cut hard. Consecutive chunks overlap by about `overlap_tokens` tokens, snapped to a word
start.

Cost: the tokenizer only ever sees bounded windows of `chunk_tokens * window_chars_per_token`
chars, so a 100 MB single-line document is linear in its size, and `iter_chunks` yields the
first chunk without touching the rest of the document.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redknot_rag.retrieval.parser import Document


class Tokenizer(Protocol):
    """Any tokenizer with the Hugging Face `encode` signature."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Chunk:
    """A contiguous span `[char_start, char_end)` of one document's text."""

    chunk_id: str
    doc_id: str
    index: int
    text: str
    char_start: int
    char_end: int
    num_tokens: int

    @property
    def num_chars(self) -> int:
        return self.char_end - self.char_start


def make_chunk_id(doc_id: str, index: int, text: str) -> str:
    """Stable id from (doc_id, index, text): it changes when the chunk's content changes, so
    anything keyed by it (stored KV) can never be served for different text."""
    h = hashlib.sha256(f"{doc_id}\x1f{index}\x1f".encode() + text.encode("utf-8"))
    return h.hexdigest()[:32]


_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")  # cut at match.start()
_SENTENCE_RE = re.compile(r"[.!?。！？][\"'”’)\]]*(?=\s)")  # cut at match.end()
_SPACE_RE = re.compile(r"\s+")  # cut at match.start()
_NONSPACE_RE = re.compile(r"\S")


class Chunker:
    """Split documents into token-bounded, overlapping chunks.

    Args:
        tokenizer: object with `encode(text, add_special_tokens=False) -> list[int]`; when it
            is also callable with `return_offsets_mapping=True` (HF fast tokenizers) cuts
            cost ~2 encodes per chunk, else a binary search (~log2(window) encodes).
        chunk_tokens: hard upper bound on tokens per chunk.
        overlap_tokens: target overlap between consecutive chunks (0 disables it).
        min_fill: a paragraph/sentence cut is taken only if it keeps at least this share
            of the chars that would fit.
        window_chars_per_token: chars examined per budget token; bounds tokenizer work.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chunk_tokens: int = 256,
        overlap_tokens: int = 32,
        min_fill: float = 0.5,
        window_chars_per_token: int = 12,
    ) -> None:
        if chunk_tokens < 8:
            raise ValueError(f"chunk_tokens must be >= 8, got {chunk_tokens}")
        if not 0 <= overlap_tokens <= chunk_tokens // 2:
            raise ValueError(f"overlap_tokens must be in [0, chunk_tokens // 2], got {overlap_tokens}")
        if not 0.0 <= min_fill < 1.0:
            raise ValueError(f"min_fill must be in [0, 1), got {min_fill}")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.min_fill = min_fill
        self.window_chars = chunk_tokens * window_chars_per_token
        self._has_offsets: bool | None = None

    # -- public ------------------------------------------------------------------------

    def chunk(self, doc: Document) -> list[Chunk]:
        return list(self.iter_chunks(doc.doc_id, doc.text))

    def chunk_many(self, docs: Sequence[Document]) -> list[Chunk]:
        return [c for d in docs for c in self.iter_chunks(d.doc_id, d.text)]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def iter_chunks(self, doc_id: str, text: str) -> Iterator[Chunk]:
        """Yield the chunks of `text` lazily, in order."""
        n = len(text)
        start = _skip_space(text, 0)
        prev_end = start  # every chunk must end past the previous one (guarantees progress)
        index = 0
        while start < n:
            end, num_tokens, offsets = self._cut(text, start, min_end=prev_end + 1)
            if end <= prev_end:  # the overlap left no room to advance: restart at prev_end
                start = _skip_space(text, prev_end)
                if start >= n:
                    break
                continue
            piece = text[start:end]
            yield Chunk(make_chunk_id(doc_id, index, piece), doc_id, index, piece, start, end, num_tokens)
            index += 1
            prev_end = end
            if _skip_space(text, end) >= n:
                break
            start = self._overlap_start(text, start, end, num_tokens, offsets)

    # -- cutting -----------------------------------------------------------------------

    def _cut(self, text: str, start: int, min_end: int) -> tuple[int, int, list[tuple[int, int]] | None]:
        """(end, num_tokens, token offsets relative to start or None) of the chunk at start."""
        budget = self.chunk_tokens
        while True:
            window_end = min(len(text), start + self.window_chars)
            fit = self._fit(text, start, window_end, budget)
            end = fit if fit == len(text) else self._boundary(text, start, fit, min_end)
            end = _rstrip_end(text, start, end)
            num_tokens, offsets = self._encode(text[start:end])
            if num_tokens <= self.chunk_tokens or end - start <= 1:
                return end, num_tokens, offsets
            budget -= max(1, num_tokens - self.chunk_tokens)  # BPE merged across the cut

    def _fit(self, text: str, start: int, window_end: int, budget: int) -> int:
        """Largest p in (start, window_end] with tokens(text[start:p]) <= budget (>= start+1)."""
        window = text[start:window_end]
        num_tokens, offsets = self._encode(window)
        if num_tokens <= budget:
            return window_end
        if offsets is not None:
            return start + max(1, offsets[budget][0])
        lo, hi = 1, len(window) - 1  # invariant: tokens(window[:hi+1]) > budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count_tokens(window[:mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return start + lo

    def _boundary(self, text: str, start: int, fit: int, min_end: int) -> int:
        """Best cut in [min_end, fit]: paragraph end > sentence end > whitespace > hard cut."""
        seg = text[start : min(len(text), fit + 8)]  # a few chars past fit for the lookaheads
        rel_fit, rel_min = fit - start, max(1, min_end - start)
        rel_fill = max(rel_min, int(self.min_fill * rel_fit))
        for pattern, use_end, lower in (
            (_PARAGRAPH_RE, False, rel_fill),
            (_SENTENCE_RE, True, rel_fill),
            (_SPACE_RE, False, rel_min),
        ):
            best = -1
            for m in pattern.finditer(seg, lower - 1 if not use_end else 0):
                p = m.end() if use_end else m.start()
                if p > rel_fit:
                    break
                if p >= lower:
                    best = p
            if best > 0:
                return start + best
        return fit

    def _overlap_start(
        self, text: str, start: int, end: int, num_tokens: int, offsets: list[tuple[int, int]] | None
    ) -> int:
        if self.overlap_tokens == 0 or num_tokens <= self.overlap_tokens:
            return _skip_space(text, end)
        keep = num_tokens - self.overlap_tokens
        if offsets is not None:
            p = start + offsets[keep][0]
        else:
            p = start + (end - start) * keep // num_tokens
        # Snap forward to the next word start so the overlap never begins mid-word.
        if p > start and not text[p - 1].isspace():
            m = _SPACE_RE.search(text, p, end)
            p = m.end() if m else end
        return _skip_space(text, max(p, start + 1))

    def _encode(self, text: str) -> tuple[int, list[tuple[int, int]] | None]:
        if self._has_offsets is not False:
            offsets = self._try_offsets(text)
            if offsets is not None:
                return len(offsets), offsets
        return self.count_tokens(text), None

    def _try_offsets(self, text: str) -> list[tuple[int, int]] | None:
        tok: Any = self.tokenizer
        if self._has_offsets is None:
            try:
                enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
                offsets = [tuple(o) for o in enc["offset_mapping"]]
                self._has_offsets = len(offsets) == self.count_tokens(text)
            except Exception:  # slow tokenizers and plain encoders have no offsets
                self._has_offsets = False
            return offsets if self._has_offsets else None
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]


def _skip_space(text: str, pos: int) -> int:
    m = _NONSPACE_RE.search(text, pos)
    return m.start() if m else len(text)


def _rstrip_end(text: str, start: int, end: int) -> int:
    while end > start + 1 and text[end - 1].isspace():
        end -= 1
    return end
