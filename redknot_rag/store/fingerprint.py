"""What a stored KV block is bound to.

Invariant: KV written under one fingerprint is never served under another. The store namespaces
its files by `digest()` and every file header repeats the digest; a mismatch is a miss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

FORMAT_VERSION = 2  # bump on any change to the block file layout or to what a block means
# v1: every block dense, fingerprint dtype only. v2: per-block token range, codec and head class.

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`; only the dtypes the store can hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"KV store cannot hold dtype {dtype}; supported: {sorted(_DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown KV dtype {name!r}; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def sha256_hex(*parts: bytes | str) -> str:
    """sha256 over length-prefixed parts (so ("ab", "c") != ("a", "bc"))."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def hash_token_ids(ids: list[int] | torch.Tensor) -> str:
    """Hash of a token-id sequence (e.g. the anchor prefix), independent of container type."""
    seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return sha256_hex(b"tokens", ",".join(str(int(i)) for i in seq))


@dataclass(frozen=True)
class KVFingerprint:
    """Everything a chunk's KV depends on besides the chunk's own tokens.

    Each `*_hash` is an opaque hex string computed by whoever owns that artifact (loader: weights,
    tokenizer; engine: anchor prefix token ids; heads: profile). `dtype` is the dtype the KV was
    computed in (the producer's); the storage dtype and codec are recorded per chunk and per block.
    """

    weights_hash: str
    tokenizer_hash: str
    anchor_hash: str
    dtype: str
    head_profile_hash: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        dtype_from_name(self.dtype)  # validate early

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def digest(self) -> str:
        """sha256 hex over a canonical JSON of all fields."""
        return sha256_hex(b"redknot-kv-fingerprint", json.dumps(asdict(self), sort_keys=True))
