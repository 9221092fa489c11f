"""The chunk KV file: one file per chunk, every (layer, kv_head) block readable on its own.

Layout (little-endian; full spec in docs/kv-format.md):

    fixed header   88 B   magic, version, header_len, num_layers, num_kv_heads, num_tokens,
                          head_dim, key_len, reserved, dtype name (16 B), fingerprint digest (32 B)
    block table    24 B × num_layers·num_kv_heads, row b = layer·num_kv_heads + head:
                          offset u64, nbytes u64, crc32 u32, block_tokens u32
    chunk key      key_len B utf-8
    header crc32   4 B over everything above
    blocks         each at a 64-byte aligned offset: K `[T, D]` then V `[T, D]`, row-major

Invariants: a reader touches only the header and the bytes of the blocks it asks for; every
block it returns has passed its crc32; anything malformed raises `CorruptChunkError`.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from redknot_rag.store.fingerprint import FORMAT_VERSION, dtype_from_name, dtype_name

MAGIC = b"RKNOTKV\x00"
ALIGN = 64
_FIXED = struct.Struct("<8s8I16s32s")  # 88 bytes
_ENTRY = struct.Struct("<QQII")  # 24 bytes
_CRC = struct.Struct("<I")
_MAX_HEADER = 64 << 20

if sys.byteorder != "little":  # the payload is raw tensor memory
    raise ImportError("redknot_rag.store needs a little-endian host")


class CorruptChunkError(ValueError):
    """A chunk file failed validation (magic, version, checksum, size). Never served."""


class FingerprintMismatchError(LookupError):
    """A chunk file was written under another fingerprint. Treated as a miss."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ChunkHeader:
    """Parsed, checksum-verified header. Block b = layer * num_kv_heads + head."""

    chunk_key: str
    fingerprint_digest: str
    num_layers: int
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    dtype: str
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    crcs: tuple[int, ...]
    header_len: int

    @property
    def num_blocks(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def block_nbytes(self) -> int:
        """K + V bytes of one block: 2 · T · D · elem_size."""
        return 2 * self.num_tokens * self.head_dim * dtype_from_name(self.dtype).itemsize

    @property
    def file_size(self) -> int:
        return self.offsets[-1] + self.nbytes[-1] if self.num_blocks else _align(self.header_len)

    def block_index(self, layer: int, head: int) -> int:
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
            raise IndexError(f"block ({layer}, {head}) outside [{self.num_layers}, {self.num_kv_heads}]")
        return layer * self.num_kv_heads + head


def _block_bytes(k: torch.Tensor, v: torch.Tensor, layer: int, head: int) -> tuple[memoryview, memoryview]:
    """Raw bytes of K[layer, head] and V[layer, head] (`[T, D]` each, CPU, contiguous)."""
    kb = k[layer, head].contiguous().view(torch.uint8).numpy()  # [T, D·elem]
    vb = v[layer, head].contiguous().view(torch.uint8).numpy()
    return memoryview(kb.data).cast("B"), memoryview(vb.data).cast("B")


def encode_chunk(
    chunk_key: str, fingerprint_digest: str, k: torch.Tensor, v: torch.Tensor
) -> Iterator[bytes | memoryview]:
    """File contents, in order, for K and V `[L, H, T, D]` on CPU. Yields header then blocks."""
    if k.shape != v.shape or k.dim() != 4 or k.dtype != v.dtype:
        raise ValueError(f"K/V must be equal-shaped [L, H, T, D] of one dtype, got {tuple(k.shape)} {tuple(v.shape)}")
    L, H, T, D = k.shape
    dname = dtype_name(k.dtype)
    key = chunk_key.encode()
    header_len = _FIXED.size + _ENTRY.size * L * H + len(key) + _CRC.size
    nbytes = 2 * T * D * k.element_size()
    blocks = [_block_bytes(k, v, l, h) for l in range(L) for h in range(H)]
    offsets = [_align(header_len) + b * _align(nbytes) for b in range(L * H)]
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        header_len,
        L,
        H,
        T,
        D,
        len(key),
        0,
        dname.encode().ljust(16, b"\0"),
        bytes.fromhex(fingerprint_digest),
    )
    crcs = [zlib.crc32(vb, zlib.crc32(kb)) for kb, vb in blocks]  # one crc over K bytes then V bytes
    table = b"".join(_ENTRY.pack(off, nbytes, crc, T) for off, crc in zip(offsets, crcs, strict=True))
    head = fixed + table + key
    yield head + _CRC.pack(zlib.crc32(head)) + b"\0" * (_align(header_len) - header_len)
    pad = b"\0" * (_align(nbytes) - nbytes)
    for i, (kb, vb) in enumerate(blocks):
        yield kb
        yield vb
        if pad and i + 1 < len(blocks):
            yield pad


def read_header(fd: int, expect_digest: str | None = None) -> ChunkHeader:
    """Parse and verify the header of an open chunk file. Reads only header bytes."""
    fixed = os.pread(fd, _FIXED.size, 0)
    if len(fixed) != _FIXED.size:
        raise CorruptChunkError("truncated header")
    magic, version, header_len, L, H, T, D, key_len, _, dname, digest = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise CorruptChunkError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptChunkError(f"format version {version}, this reader knows {FORMAT_VERSION}")
    if not (_FIXED.size < header_len <= _MAX_HEADER) or header_len != _FIXED.size + _ENTRY.size * L * H + key_len + 4:
        raise CorruptChunkError(f"inconsistent header length {header_len}")
    rest = os.pread(fd, header_len - _FIXED.size, _FIXED.size)
    if len(rest) != header_len - _FIXED.size:
        raise CorruptChunkError("truncated header")
    body, (crc,) = fixed + rest[:-4], _CRC.unpack(rest[-4:])
    if zlib.crc32(body) != crc:
        raise CorruptChunkError("header checksum mismatch")
    try:
        dtype = dname.rstrip(b"\0").decode()
        elem = dtype_from_name(dtype).itemsize
        chunk_key = body[header_len - 4 - key_len :].decode()
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptChunkError(f"bad header field: {e}") from e
    entries = [_ENTRY.unpack_from(body, _FIXED.size + i * _ENTRY.size) for i in range(L * H)]
    if any(n != 2 * T * D * elem or bt != T or off < header_len for off, n, _, bt in entries):
        raise CorruptChunkError("block table does not match the header geometry")
    hdr = ChunkHeader(
        chunk_key=chunk_key,
        fingerprint_digest=digest.hex(),
        num_layers=L,
        num_kv_heads=H,
        num_tokens=T,
        head_dim=D,
        dtype=dtype,
        offsets=tuple(e[0] for e in entries),
        nbytes=tuple(e[1] for e in entries),
        crcs=tuple(e[2] for e in entries),
        header_len=header_len,
    )
    if os.fstat(fd).st_size < hdr.file_size:
        raise CorruptChunkError(f"file truncated: {os.fstat(fd).st_size} < {hdr.file_size} bytes")
    if expect_digest is not None and hdr.fingerprint_digest != expect_digest:
        raise FingerprintMismatchError(
            f"chunk {chunk_key!r} was written under fingerprint {hdr.fingerprint_digest[:12]}"
        )
    return hdr


def read_blocks(fd: int, hdr: ChunkHeader, indices: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Read and crc-check blocks `indices`; returns {b: (K, V)} `[T, D]` each on CPU.

    Adjacent blocks are fetched with one preadv into per-block buffers (no copy, no foreign bytes).
    """
    dtype, T, D = dtype_from_name(hdr.dtype), hdr.num_tokens, hdr.head_dim
    order = sorted(set(indices))
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and order[j] == order[j - 1] + 1:
            j += 1
        run = order[i:j]
        bufs: list[bytearray] = []
        blocks: list[bytearray] = []
        for b in run:
            blocks.append(bytearray(hdr.nbytes[b]))
            bufs.append(blocks[-1])
            gap = hdr.offsets[b + 1] - hdr.offsets[b] - hdr.nbytes[b] if b + 1 < hdr.num_blocks else 0
            if b != run[-1] and gap:
                bufs.append(bytearray(gap))  # alignment padding between adjacent blocks
        want = sum(len(x) for x in bufs)
        if os.preadv(fd, bufs, hdr.offsets[run[0]]) != want:
            raise CorruptChunkError(f"chunk {hdr.chunk_key!r}: short read of blocks {run[0]}..{run[-1]}")
        for b, buf in zip(run, blocks, strict=True):
            if zlib.crc32(buf) != hdr.crcs[b]:
                L_, H_ = divmod(b, hdr.num_kv_heads)
                raise CorruptChunkError(f"chunk {hdr.chunk_key!r}: checksum mismatch in block (layer {L_}, head {H_})")
            kv = torch.frombuffer(buf, dtype=dtype).view(2, T, D)  # [2, T, D]: K then V
            out[b] = (kv[0], kv[1])
        i = j
    return out
