"""Prompt formats: the model's chat template split into the pieces RAG prompts are built from.

A RAG prompt is `[anchor][chunk_1]...[chunk_k][question][generation prompt]`; the anchor (the
template's start + fixed system preamble + the opening of the user turn) is what every chunk is
prefilled behind at ingestion, so stored KV and query prompts share the same left context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question using the documents below. Answer briefly."
_SENTINEL = "\u2063RKSENTINEL\u2063"


@dataclass(frozen=True)
class ChatFormat:
    """Text pieces: `prefix` (up to the user's content) and `suffix` (end of user turn + assistant start)."""

    prefix: str
    suffix: str

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, system: str = DEFAULT_SYSTEM) -> ChatFormat:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{system}\n\n{_SENTINEL}\n"
        pre, _, post = text.partition(_SENTINEL)
        return cls(pre, post)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Tokens of `text` with no special tokens added (templates already carry them)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template applied to `messages`, with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    return encode(tokenizer, text)
