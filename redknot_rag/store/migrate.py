"""Migrate a format-v1 store (`v1-<digest>/`) into the current format, chunk by chunk.

v1 files (docs/kv-format.md, history): an 88-byte fixed header like v2's with version 1, a block
table of 24-byte rows (offset u64, nbytes u64, zlib crc32 u32, block_tokens u32), the chunk key, a
zlib crc32 of the header, and dense blocks K `[T, D]` then V `[T, D]` in the fingerprint's dtype.
Every block is crc-checked before it is re-stored; a chunk that fails is skipped (and counted),
never migrated.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from redknot_rag.store.fingerprint import KVFingerprint, dtype_from_name
from redknot_rag.store.store_config import StoreConfig

log = logging.getLogger(__name__)

_FIXED = struct.Struct("<8s8I16s32s")  # 88 bytes, as in v2
_ENTRY_V1 = struct.Struct("<QQII")  # 24 bytes
_MAGIC = b"RKNOTKV\x00"


class V1FormatError(ValueError):
    """A v1 file failed validation; it is not migrated."""


@dataclass(frozen=True)
class MigrationReport:
    source: str
    target_digest: str
    chunks: int
    skipped: int
    bytes_before: int
    bytes_after: int


def read_v1_chunk(path: Path) -> tuple[str, str, torch.Tensor, torch.Tensor]:
    """(chunk_key, fingerprint digest hex, K, V `[L, H, T, D]`) of a v1 chunk file, every crc checked."""
    data = path.read_bytes()
    if len(data) < _FIXED.size:
        raise V1FormatError("truncated header")
    magic, version, header_len, L, H, T, D, key_len, _, dname, digest = _FIXED.unpack_from(data)
    if magic != _MAGIC or version != 1:
        raise V1FormatError(f"not a v1 chunk file (magic {magic!r}, version {version})")
    if header_len != _FIXED.size + _ENTRY_V1.size * L * H + key_len + 4 or len(data) < header_len:
        raise V1FormatError("inconsistent header length")
    (crc,) = struct.unpack_from("<I", data, header_len - 4)
    if zlib.crc32(data[: header_len - 4]) != crc:
        raise V1FormatError("header checksum mismatch")
    dtype = dtype_from_name(dname.rstrip(b"\0").decode())
    key = data[header_len - 4 - key_len : header_len - 4].decode()
    block = 2 * T * D * dtype.itemsize
    kv = torch.empty(L * H, 2, T, D, dtype=dtype)  # [L·H, 2, T, D]: K then V per block
    for b in range(L * H):
        off, nbytes, bcrc, tokens = _ENTRY_V1.unpack_from(data, _FIXED.size + b * _ENTRY_V1.size)
        payload = data[off : off + nbytes]
        if nbytes != block or tokens != T or len(payload) != nbytes or zlib.crc32(payload) != bcrc:
            raise V1FormatError(f"block {divmod(b, H)} failed validation")
        kv[b] = torch.frombuffer(bytearray(payload), dtype=dtype).view(2, T, D)
    kv = kv.view(L, H, 2, T, D)
    return key, digest.hex(), kv[:, :, 0].contiguous(), kv[:, :, 1].contiguous()


def v1_fingerprint(ns: Path) -> KVFingerprint:
    """The fingerprint a v1 namespace was written under, re-bound to the current format version."""
    raw = json.loads((ns / "fingerprint.json").read_text())
    names = {f.name for f in fields(KVFingerprint)} - {"format_version"}
    old = KVFingerprint(**{k: raw[k] for k in names if k in raw}, format_version=1)
    if old.digest() != raw.get("digest") or not ns.name.endswith(old.digest()[:32]):
        raise V1FormatError(f"{ns}/fingerprint.json does not match its namespace")
    return KVFingerprint(**{k: raw[k] for k in names if k in raw})


def migrate_v1(ns: Path, root: Path, config: StoreConfig | None = None, delete_old: bool = False) -> MigrationReport:
    """Re-store every valid chunk of v1 namespace `ns` into a current-format store under `root`."""
    from redknot_rag.store.chunk_store import ChunkKVStore

    fp = v1_fingerprint(ns)
    old_digest = json.loads((ns / "fingerprint.json").read_text())["digest"]
    store = ChunkKVStore(root, fp, 0, config=config)
    chunks = skipped = before = 0
    for path in sorted((ns / "chunks").glob("*/*.rkv")):
        before += path.stat().st_size
        try:
            key, digest, k, v = read_v1_chunk(path)
            if digest != old_digest:
                raise V1FormatError("written under another fingerprint")
        except (V1FormatError, ValueError, UnicodeDecodeError) as e:
            log.warning("v1 chunk file %s not migrated: %s", path, e)
            skipped += 1
            continue
        store.put(key, k, v, keep_in_memory=False)
        chunks += 1
        if delete_old:
            os.unlink(path)
    after = store.stats().cold_bytes
    store.close()
    return MigrationReport(str(ns), fp.digest(), chunks, skipped, before, after)
