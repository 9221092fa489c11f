"""A token's own bytes and its text as OpenAI's logprobs show it.

A token may hold part of a character (`日` is two byte-level BPE tokens): decoding it alone gives
U+FFFD, whose bytes are not the token's. Its real bytes come from the tokenizer's piece: byte-level
BPE (GPT-2, SmolLM2, Llama 3, Qwen) maps each byte to one printable character; SentencePiece with
byte fallback (Gemma) writes a lone byte as `<0xNN>` and a space as `▁`. A token whose bytes are not
UTF-8 on their own is shown as OpenAI shows it, `bytes:\\xe6\\x97`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character → byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


@functools.lru_cache(maxsize=1 << 17)
def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes token `token_id` stands for in the text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
    if isinstance(piece, str):
        table = _byte_of_char()
        if "ByteLevel" in decoder and piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)
        if m is not None and "ByteFallback" in decoder:
            return bytes([int(m.group(1), 16)])
        if "▁" in decoder:  # SentencePiece's space marker
            return piece.replace("▁", " ").encode("utf-8")
    return tokenizer.decode([token_id]).encode("utf-8")


def token_text(tokenizer: Any, token_id: int) -> str:
    """The token's text, or `bytes:\\xNN...` when its bytes are not UTF-8 on their own (OpenAI's form)."""
    data = token_bytes(tokenizer, token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def num_chars(data: bytes) -> int:
    """Characters that start in UTF-8 `data` (its bytes that are not continuation bytes): summed over
    consecutive tokens, the character offset of each token in their decoded text."""
    return sum(1 for b in data if b & 0xC0 != 0x80)
