"""The prompt contract every stored chunk's KV depends on, in one place.

A RAG prompt is `[anchor][chunk_1 sep]...[chunk_k sep][question][generation prompt]`:
- the anchor is the chat template up to the user's content, with the fixed system preamble; every chunk
  is prefilled behind it at ingestion, so stored KV and query prompts share the same left context;
- each chunk's tokens are its stripped text then the separator `"\\n\\n"`, tokenized mid-text (BPE merges
  a trailing separator differently at the end of a string);
- the question follows as `Question: ...` plus the template's closing part.

A chunk's one identity is `chunk_key` (sha256 of its token ids); the document DB records it per chunk
row, and the KV store and the pool cache are keyed by it. Changing anything here changes stored KV:
the fingerprint (`make_fingerprint`) binds stored KV to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redknot_rag.chat import DEFAULT_SYSTEM, ChatFormat, encode
from redknot_rag.store import KVFingerprint, hash_token_ids, sha256_hex
from redknot_rag.store.fingerprint import dtype_name

CHUNK_SEPARATOR = "\n\n"
QUESTION_TEMPLATE = "Question: {question}"
MATCH_BLOCK = 16  # tokens hashed to find stored chunks inside arbitrary prompts


def chunk_key(token_ids: Sequence[int]) -> str:
    """Content address of a chunk's KV: its token ids (same tokens, same KV under one fingerprint)."""
    return hash_token_ids(list(token_ids))


def tokenizer_hash(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_hex(repr(vocab), repr(sorted(getattr(tokenizer, "all_special_tokens", []))))


@dataclass(frozen=True)
class PromptLayout:
    """Token-level pieces of RAG prompts for one tokenizer and system preamble."""

    anchor_ids: tuple[int, ...]
    separator_ids: tuple[int, ...]
    format: ChatFormat
    system_prompt: str
    tokenizer: Any = field(repr=False, compare=False)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, system_prompt: str = DEFAULT_SYSTEM) -> PromptLayout:
        fmt = ChatFormat.from_tokenizer(tokenizer, system_prompt)
        a, b = encode(tokenizer, "a"), encode(tokenizer, "b")
        mid = encode(tokenizer, "a" + CHUNK_SEPARATOR + "b")
        sep = mid[len(a) : len(mid) - len(b)]
        return cls(tuple(encode(tokenizer, fmt.prefix)), tuple(sep), fmt, system_prompt, tokenizer)

    @property
    def num_anchor(self) -> int:
        return len(self.anchor_ids)

    def chunk_ids(self, text: str) -> list[int]:
        """A chunk's tokens exactly as they appear inside a prompt."""
        return encode(self.tokenizer, text.strip()) + list(self.separator_ids)

    def question_ids(self, question: str) -> list[int]:
        """The tail of a RAG prompt: the question and the template's closing part."""
        return encode(self.tokenizer, QUESTION_TEMPLATE.format(question=question) + self.format.suffix)

    def context_text(self, texts: Iterable[str]) -> str:
        """Chunk texts exactly as prompts carry them (what automatic reuse recognizes)."""
        return "".join(t.strip() + CHUNK_SEPARATOR for t in texts)

    def prompt_ids(self, chunk_ids: Sequence[Sequence[int]], tail_ids: Sequence[int]) -> list[int]:
        out = list(self.anchor_ids)
        for c in chunk_ids:
            out.extend(c)
        out.extend(tail_ids)
        return out

    def chunk_spans(self, chunk_ids: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """[start, end) of each chunk in the assembled prompt."""
        spans, s = [], self.num_anchor
        for c in chunk_ids:
            spans.append((s, s + len(c)))
            s += len(c)
        return spans


def make_fingerprint(layout: PromptLayout, weights_hash: str, dtype: Any) -> KVFingerprint:
    """Binds stored KV to weights + tokenizer + anchor + dtype. Stored KV holds every head in full, so the
    head profile (which only decides what is read) is not part of it."""
    return KVFingerprint(
        weights_hash=weights_hash,
        tokenizer_hash=tokenizer_hash(layout.tokenizer),
        anchor_hash=hash_token_ids(list(layout.anchor_ids)),
        dtype=dtype_name(dtype),
    )


class ChunkMatcher:
    """Finds stored chunks inside arbitrary prompts by hashing their first `MATCH_BLOCK` tokens.

    Each indexed chunk carries the namespaces that hold it, so a caller bound to some namespaces never
    matches (and so never learns about) another tenant's text.
    """

    def __init__(self, layout: PromptLayout) -> None:
        self.layout = layout
        self._blocks: dict[tuple[int, ...], dict[tuple[int, ...], set[str]]] = {}

    def add(self, ids: Sequence[int], namespace: str) -> None:
        if len(ids) >= MATCH_BLOCK:
            self._blocks.setdefault(tuple(ids[:MATCH_BLOCK]), {}).setdefault(tuple(ids), set()).add(namespace)

    def remove(self, ids: Sequence[int], namespace: str) -> None:
        cands = self._blocks.get(tuple(ids[:MATCH_BLOCK]), {})
        owners = cands.get(tuple(ids))
        if owners is not None:
            owners.discard(namespace)
            if not owners:
                del cands[tuple(ids)]

    def match(self, prompt_ids: Sequence[int], namespaces: set[str] | None = None) -> tuple[list[list[int]], int]:
        """Stored chunks that follow the anchor at the start of `prompt_ids`: (chunk ids, end index).

        `namespaces` limits the match to chunks held by one of them (None: any namespace). The last token
        of the prompt is never inside a match (the engine must prefill at least one token).
        """
        a = self.layout.num_anchor
        if tuple(prompt_ids[:a]) != self.layout.anchor_ids:
            return [], 0
        found: list[list[int]] = []
        p = a
        while True:
            cands = self._blocks.get(tuple(prompt_ids[p : p + MATCH_BLOCK]), {})
            hit = None
            for ids, owners in sorted(cands.items(), key=lambda kv: len(kv[0]), reverse=True):
                if (namespaces is None or owners & namespaces) and tuple(prompt_ids[p : p + len(ids)]) == ids:
                    hit = list(ids)
                    break
            if hit is None or p + len(hit) >= len(prompt_ids):
                break
            found.append(hit)
            p += len(hit)
        return found, p
