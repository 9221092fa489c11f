"""Input limits shared by the HTTP API (schemas.py) and the CLI, so both refuse the same input.

A document's KV costs ~23 KB per token with the default model stored in bf16 (30 layers x 3 KV heads x
64 dims x K and V x 2 bytes), about 6 KB per byte of English text. Characters do not bound tokens (a
zero-width character is a token of 3 bytes), so a document is limited in tokens too: 500k tokens bound its
stored KV near 12 GB. A question must fit the context with room to answer; the server also
checks its token count against the model context before any retrieval or KV work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import regex

from redknot_rag.retrieval.parser import SUPPORTED_SUFFIXES

MAX_DOCUMENT_BYTES = 2_000_000  # one document's text (UTF-8), one file, or one line of a .jsonl file
# one document's tokens: what bounds its KV (~11.5 GB in bf16 on the default model), whatever its characters
# (2 MB of English text is ~500k tokens; 1.8 MB of zero-width characters is ~600k)
MAX_DOCUMENT_TOKENS = 500_000
MAX_DOCUMENTS_PER_INGEST = 1_000  # documents in one /ingest body
MAX_PATHS_PER_INGEST = 64  # server-side paths in one /ingest body
MAX_QUESTION_CHARS = 16_000  # /query and /retrieve; the token count is checked against the context too
MAX_RID_CHARS = 256


_VISIBLE = regex.compile(r"[^\s\p{C}]")  # not whitespace, control (NUL), format (zero-width, BOM) or unassigned


def is_blank(text: str) -> bool:
    """Whether `text` has nothing to read: only whitespace, control characters (NUL), zero-width and other
    format characters (BOM) — a question or document of these is as empty as one of spaces."""
    return _VISIBLE.search(text) is None


def require_visible(text: str) -> str:
    """`text`, or ValueError when it is blank (`is_blank`): a pydantic validator of questions and documents."""
    if is_blank(text):
        raise ValueError("has no visible text (only whitespace, control or zero-width characters)")
    return text


class TooLargeError(ValueError):
    """Input over a size limit (the server answers 413)."""


@dataclass(frozen=True)
class InputLimits:
    """The limits one server or CLI run enforces (defaults above; `redknot serve --max-document-bytes`)."""

    max_document_bytes: int = MAX_DOCUMENT_BYTES
    max_question_chars: int = MAX_QUESTION_CHARS

    def check_text(self, doc_id: str, text: str) -> None:
        """ValueError unless `text` is non-blank and at most `max_document_bytes` of UTF-8."""
        if is_blank(text):
            raise ValueError(f"document {doc_id!r}: text is empty (only whitespace, control or zero-width characters)")
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > self.max_document_bytes:
            raise TooLargeError(f"document {doc_id!r}: {n} bytes exceeds the limit of {self.max_document_bytes} bytes")

    def check_paths(self, paths: Iterable[str | Path]) -> None:
        """ValueError for an empty path, and for any file (or .jsonl line) over `max_document_bytes`,
        before anything is parsed. Directories are walked the way the parser walks them."""
        for raw in paths:
            if not str(raw).strip():
                raise ValueError(
                    "empty path: give a file or directory (an empty path would mean the working directory)"
                )
            p = Path(raw)
            files = [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []
            for f in files:
                if f.suffix.lower() not in SUPPORTED_SUFFIXES or not f.is_file():
                    continue
                size = f.stat().st_size
                if size <= self.max_document_bytes:
                    continue
                if f.suffix.lower() != ".jsonl":
                    raise TooLargeError(
                        f"{f}: {size} bytes exceeds the document limit of {self.max_document_bytes} bytes"
                    )
                with f.open("rb") as fh:
                    for i, line in enumerate(fh, 1):
                        if len(line) > self.max_document_bytes:
                            raise TooLargeError(
                                f"{f}:{i}: a {len(line)}-byte line exceeds the document limit of "
                                f"{self.max_document_bytes} bytes"
                            )
