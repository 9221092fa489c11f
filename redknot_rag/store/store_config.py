"""Store settings: storage dtype, cold-tier codec, head-aware compression, tier budgets; CLI flags."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from redknot_rag.store.codec import CODEC_NAMES, Codec, HeadClass
from redknot_rag.store.fingerprint import dtype_from_name

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DECODE_ON = ("host", "device")  # where quantized blocks are decoded (StoreConfig.decode_on)
DEFAULT_STORE_DTYPE = "bfloat16"  # what `redknot ingest`/`serve` and `rag.factory.ServiceSettings` store


def parse_bytes(text: str) -> int:
    """'256M', '2G', '1.5GiB', '4096' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a byte size: {text!r} (e.g. 4096, 256M, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class HeadCompression:
    """Head-aware storage: `classes[l][h]` is LOCAL (0) or GLOBAL (1), as in `heads.HeadProfile`.

    A local head reads only the anchor sink (not part of any chunk) plus the last `window` context
    tokens, so the store keeps only a chunk's tail `window` tokens for it. Global heads keep all.
    """

    classes: tuple[tuple[int, ...], ...]
    window: int

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"local-head window must be >= 1, got {self.window}")
        widths = {len(row) for row in self.classes}
        if not self.classes or len(widths) != 1 or 0 in widths:
            raise ValueError("head classes must be a non-empty [layers x kv_heads] table")
        if any(c not in (HeadClass.LOCAL, HeadClass.GLOBAL) for row in self.classes for c in row):
            raise ValueError("head classes must be 0 (local) or 1 (global)")

    @classmethod
    def from_mask(cls, classes: torch.Tensor | Sequence[Sequence[int]], window: int) -> HeadCompression:
        """From a `[layers, kv_heads]` class table (tensor or nested lists; 0 local, 1 global)."""
        rows = classes.tolist() if isinstance(classes, torch.Tensor) else classes
        return cls(tuple(tuple(int(c) for c in row) for row in rows), int(window))

    @classmethod
    def from_profile(cls, profile: Any) -> HeadCompression:
        """From a `heads.HeadProfile` (its `classes` and `window`)."""
        return cls.from_mask(profile.classes, profile.window)

    @property
    def num_layers(self) -> int:
        return len(self.classes)

    @property
    def num_kv_heads(self) -> int:
        return len(self.classes[0])

    @property
    def num_local(self) -> int:
        return sum(1 for row in self.classes for c in row if c == HeadClass.LOCAL)

    def head_class(self, layer: int, head: int) -> HeadClass:
        return HeadClass(self.classes[layer][head])

    def token_range(self, layer: int, head: int, num_tokens: int) -> tuple[int, int]:
        """(token_start, num_tokens) the store keeps of a chunk of `num_tokens` for this head."""
        if self.head_class(layer, head) == HeadClass.LOCAL and num_tokens > self.window:
            return num_tokens - self.window, self.window
        return 0, num_tokens


@dataclass(frozen=True)
class StoreConfig:
    """How `ChunkKVStore` stores and tiers chunk KV.

    dtype: storage dtype name; None keeps the producer's (the fingerprint's) dtype, lossless.
    cold_codec: "raw", "int8" or "int4" for what disk and Redis hold (host memory holds what they decode
        to); an int4 block that cannot be int4 (head_dim not a multiple of 32, f16 range) is int8.
    heads: head-aware compression (local heads keep their tail window), None stores every token.
    host_bytes / disk_bytes: LRU budgets of the pinned-host and disk tiers (disk None: unbounded).
    redis_url: a shared Redis tier below disk (its budget is the server's maxmemory).
    redis_write_through: `put` also writes Redis (replicas share new chunks at once); otherwise
        Redis receives chunks only when disk evicts them.
    promote_to_disk: a chunk read from Redis is copied to disk too, in the background (the next
        read is local).
    disk_read_depth: disk reads in flight per store (a chunk's runs split into `disk_read_piece_bytes`
        pieces read by that many threads); 1 reads each run with one pread.
    disk_direct_io: read chunk files with O_DIRECT (aligned buffers; no page-cache copy), where the
        filesystem allows it (else buffered, with a log line). The defaults (depth 8, direct) are the
        fastest cold reads bench/store/read_depth.py measured (1.13 GB/s vs 0.87 for one buffered pread
        per chunk, 8 readers; 1.02 vs 0.69, 1 reader); a page-cache-warm file reads faster buffered.
    redis_pipeline: `get_blocks_many` reads a Redis-only store's chunks in one round trip per stream
        (one MGET of every chunk's metas, then per stream one MGET of its chunks' layers), not one per
        chunk; `redis_streams` connections side by side (one connection's reply is read by one thread).
    decode_on: where INT8/INT4 blocks are decoded. "host": when read from a cold tier (the host tier
        holds decoded blocks in the storage dtype); "device": the host tier keeps them encoded
        (`tiers.EncodedBlock`, the cold tiers' bytes) and a GPU pool load copies those bytes and
        decodes them on the device (`store/device_decode.py`); readers that want tensors decode on
        the host (same bits either way).
    """

    dtype: str | None = None
    cold_codec: str = "raw"
    heads: HeadCompression | None = None
    host_bytes: int = 256 << 20
    disk_bytes: int | None = None
    redis_url: str | None = None
    redis_write_through: bool = True
    promote_to_disk: bool = True
    decode_on: str = "host"
    disk_read_depth: int = 8
    disk_read_piece_bytes: int = 1 << 20
    disk_direct_io: bool = True
    redis_pipeline: bool = True
    redis_streams: int = 4

    def __post_init__(self) -> None:
        if self.redis_streams < 1:
            raise ValueError("redis_streams must be >= 1")
        if self.disk_read_depth < 1 or self.disk_read_piece_bytes < 4096 or self.disk_read_piece_bytes % 4096:
            raise ValueError("disk_read_depth must be >= 1 and disk_read_piece_bytes a multiple of 4096")
        if self.decode_on not in DECODE_ON:
            raise ValueError(f"decode_on must be one of {DECODE_ON}, got {self.decode_on!r}")
        if self.dtype is not None:
            dtype_from_name(self.dtype)
        Codec.parse(self.cold_codec)
        if self.host_bytes < 0 or (self.disk_bytes is not None and self.disk_bytes < 0):
            raise ValueError("store byte budgets must be >= 0")

    @property
    def codec(self) -> Codec:
        return Codec.parse(self.cold_codec)


def add_store_args(p: argparse.ArgumentParser) -> None:
    """`--store-*` flags of `redknot serve` and `redknot ingest`."""
    g = p.add_argument_group("chunk KV store")
    g.add_argument("--store-host-bytes", type=parse_bytes, default=256 << 20, help="pinned host tier budget (256M)")
    g.add_argument("--store-disk-bytes", type=parse_bytes, default=None, help="disk tier budget (default unbounded)")
    g.add_argument(
        "--store-dtype",
        choices=["bfloat16", "float16", "float32"],
        default=DEFAULT_STORE_DTYPE,
        help="storage dtype of chunk KV (float32 only when asked)",
    )
    g.add_argument(
        "--store-cold-codec",
        choices=list(CODEC_NAMES),
        default="raw",
        help="encoding on disk and Redis: raw (storage dtype), int8, int4 (docs/kv-format.md)",
    )
    g.add_argument(
        "--store-decode-on",
        choices=list(DECODE_ON),
        default="host",
        help="where int8/int4 blocks are decoded: host (when read) or device (the host tier keeps them encoded)",
    )
    g.add_argument(
        "--store-disk-read-depth", type=int, default=8, help="disk reads in flight (a chunk read in 1 MiB pieces)"
    )
    g.add_argument(
        "--store-disk-direct-io",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read chunk files with O_DIRECT where the filesystem allows it (no page-cache copy)",
    )
    g.add_argument(
        "--store-local-heads",
        choices=["off", "profile"],
        default="off",
        help="'profile': keep only the tail window of heads the model's head profile marks local",
    )


def store_config_from_args(args: argparse.Namespace, head_profile: Any = None) -> StoreConfig:
    """StoreConfig from the flags; `head_profile` (a heads.HeadProfile) is needed for --store-local-heads profile."""
    heads = None
    if getattr(args, "store_local_heads", "off") == "profile":
        if head_profile is None:
            raise ValueError("--store-local-heads profile needs a head profile for this model (redknot profile-heads)")
        heads = HeadCompression.from_profile(head_profile)
    return StoreConfig(
        dtype=args.store_dtype,
        cold_codec=args.store_cold_codec,
        heads=heads,
        host_bytes=args.store_host_bytes,
        disk_bytes=args.store_disk_bytes,
        redis_url=getattr(args, "redis_url", None),
        decode_on=getattr(args, "store_decode_on", "host"),
        disk_read_depth=getattr(args, "store_disk_read_depth", 8),
        disk_direct_io=getattr(args, "store_disk_direct_io", True),
    )
