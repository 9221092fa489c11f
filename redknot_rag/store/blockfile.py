"""The chunk KV file (format v2): one file per chunk, every (layer, kv_head) block readable on its own.

Layout (little-endian; full spec in docs/kv-format.md):

    fixed header   88 B   magic, version, header_len, num_layers, num_kv_heads, num_tokens,
                          head_dim, key_len, reserved, storage dtype (16 B), fingerprint digest (32 B)
    block table    32 B × num_layers·num_kv_heads, row b = layer·num_kv_heads + head:
                          offset u64, nbytes u64, crc32c u32, token_start u32, num_tokens u32,
                          codec u16, head_class u16
    chunk key      key_len B utf-8
    header crc32c  4 B over everything above
    blocks         each at a 64-byte aligned offset: the codec's payload (codec.py)

Invariants: a reader touches only the header and the bytes of the blocks it asks for; every
payload it returns has passed its CRC-32C; anything malformed raises `CorruptChunkError`; a file of
another format version raises `UnsupportedFormatError` (never read as this one).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from crc32c import crc32c

from redknot_rag.store.codec import BlockMeta, ChunkMeta, Codec, HeadClass, Payload, payload_nbytes
from redknot_rag.store.fingerprint import FORMAT_VERSION, dtype_from_name

MAGIC = b"RKNOTKV\x00"
ALIGN = 64
_FIXED = struct.Struct("<8s8I16s32s")  # 88 bytes
_ENTRY = struct.Struct("<QQIIIHH")  # 32 bytes
_CRC = struct.Struct("<I")
_MAX_HEADER = 64 << 20
_WILLNEED_MIN = 1 << 20  # runs this large are announced to the kernel before they are read

if sys.byteorder != "little":  # the payload is raw tensor memory
    raise ImportError("redknot_rag.store needs a little-endian host")


class CorruptChunkError(ValueError):
    """A chunk file failed validation (magic, version, checksum, size). Never served."""


class UnsupportedFormatError(CorruptChunkError):
    """A chunk file of another format version. Refused (re-ingest to rewrite it in this version)."""


class ShortReadError(OSError):
    """A read of a chunk file ended before the bytes its header promises (a truncated file)."""


class FingerprintMismatchError(LookupError):
    """A chunk file was written under another fingerprint. Treated as a miss."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ChunkHeader:
    """Parsed, checksum-verified header. Block b = layer * num_kv_heads + head."""

    meta: ChunkMeta
    fingerprint_digest: str
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    crcs: tuple[int, ...]
    header_len: int

    @property
    def chunk_key(self) -> str:
        return self.meta.chunk_key

    @property
    def num_blocks(self) -> int:
        return len(self.offsets)

    @property
    def file_size(self) -> int:
        return self.offsets[-1] + self.nbytes[-1] if self.num_blocks else _align(self.header_len)

    def block_index(self, layer: int, head: int) -> int:
        return self.meta.index(layer, head)


def block_crc(payload: Payload) -> int:
    """CRC-32C (Castagnoli; SSE4.2/ARMv8 instructions, GIL released for large buffers)."""
    return crc32c(payload)


def encode_chunk(meta: ChunkMeta, fingerprint_digest: str, payloads: Sequence[Payload]) -> Iterator[Payload]:
    """File contents, in order: header, then each block's payload (table order) with padding."""
    L, H = meta.num_layers, meta.num_kv_heads
    if len(payloads) != L * H:
        raise ValueError(f"{len(payloads)} payloads for {L}x{H} blocks")
    dtype = dtype_from_name(meta.dtype)
    for bm, p in zip(meta.blocks, payloads, strict=True):
        if len(p) != payload_nbytes(bm, meta.head_dim, dtype):
            raise ValueError(f"payload of {len(p)} bytes does not match its block meta {bm}")
    key = meta.chunk_key.encode()
    header_len = _FIXED.size + _ENTRY.size * L * H + len(key) + _CRC.size
    offsets, off = [], _align(header_len)
    for p in payloads:
        offsets.append(off)
        off += _align(len(p))
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        header_len,
        L,
        H,
        meta.num_tokens,
        meta.head_dim,
        len(key),
        0,
        meta.dtype.encode().ljust(16, b"\0"),
        bytes.fromhex(fingerprint_digest),
    )
    table = b"".join(
        _ENTRY.pack(o, len(p), block_crc(p), bm.token_start, bm.num_tokens, int(bm.codec), int(bm.head_class))
        for o, p, bm in zip(offsets, payloads, meta.blocks, strict=True)
    )
    head = fixed + table + key
    yield head + _CRC.pack(crc32c(head)) + b"\0" * (_align(header_len) - header_len)
    for i, p in enumerate(payloads):
        yield p
        if i + 1 < len(payloads) and len(p) != _align(len(p)):
            yield b"\0" * (_align(len(p)) - len(p))


def _parse_entry(entry: tuple[int, ...], T: int) -> BlockMeta:
    _, _, _, start, n, codec, head_class = entry
    try:
        bm = BlockMeta(start, n, Codec(codec), HeadClass(head_class))
    except ValueError as e:
        raise CorruptChunkError(f"bad block table entry: {e}") from e
    if n == 0 or start + n > T:
        raise CorruptChunkError(f"block tokens [{start}, {start + n}) outside the chunk's {T} tokens")
    return bm


def read_header(fd: int, expect_digest: str | None = None) -> ChunkHeader:
    """Parse and verify the header of an open chunk file. Reads only header bytes."""
    fixed = os.pread(fd, _FIXED.size, 0)
    if len(fixed) != _FIXED.size:
        raise CorruptChunkError("truncated header")
    magic, version, header_len, L, H, T, D, key_len, _, dname, digest = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise CorruptChunkError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"chunk file format v{version}; this build reads only v{FORMAT_VERSION} "
            "(`redknot store migrate` or re-ingesting rewrites it)"
        )
    if not (_FIXED.size < header_len <= _MAX_HEADER) or header_len != _FIXED.size + _ENTRY.size * L * H + key_len + 4:
        raise CorruptChunkError(f"inconsistent header length {header_len}")
    rest = os.pread(fd, header_len - _FIXED.size, _FIXED.size)
    if len(rest) != header_len - _FIXED.size:
        raise CorruptChunkError("truncated header")
    body, (crc,) = fixed + rest[:-4], _CRC.unpack(rest[-4:])
    if crc32c(body) != crc:
        raise CorruptChunkError("header checksum mismatch")
    try:
        dtype_str = dname.rstrip(b"\0").decode()
        dtype = dtype_from_name(dtype_str)
        chunk_key = body[header_len - 4 - key_len :].decode()
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptChunkError(f"bad header field: {e}") from e
    entries = [_ENTRY.unpack_from(body, _FIXED.size + i * _ENTRY.size) for i in range(L * H)]
    metas = tuple(_parse_entry(e, T) for e in entries)
    if any(e[1] != payload_nbytes(bm, D, dtype) or e[0] < header_len for e, bm in zip(entries, metas, strict=True)):
        raise CorruptChunkError("block table does not match the header geometry")
    meta = ChunkMeta(chunk_key, L, H, T, D, dtype_str, metas)
    hdr = ChunkHeader(
        meta=meta,
        fingerprint_digest=digest.hex(),
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


def payload_span(hdr: ChunkHeader, indices: Sequence[int], align: int = 1) -> int:
    """Bytes `read_payloads` reads for blocks `indices`: each run of adjacent blocks from its first
    block's offset to its last block's end (alignment padding inside a run included), widened to
    multiples of `align` on both ends (direct I/O)."""
    return sum(e - s for s, e in _run_spans(hdr, _runs(indices), align))


def _runs(indices: Sequence[int]) -> list[list[int]]:
    """Sorted distinct block indices, split into runs of consecutive ones."""
    runs: list[list[int]] = []
    for b in sorted(set(indices)):
        if runs and runs[-1][-1] + 1 == b:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _run_spans(hdr: ChunkHeader, runs: list[list[int]], align: int) -> list[tuple[int, int]]:
    """File byte range `[start, end)` of each run, widened to multiples of `align`."""
    out = []
    for run in runs:
        start, end = hdr.offsets[run[0]], hdr.offsets[run[-1]] + hdr.nbytes[run[-1]]
        out.append((start // align * align, -(-end // align) * align))
    return out


# One read: (destination, file offset, bytes that must arrive). A direct read of a run's last aligned
# block may stop at the end of the file, so it needs fewer bytes than the destination holds.
ReadPiece = tuple[memoryview, int, int]
# Performs every piece (any order, any concurrency) and returns only once none is still running.
Reader = Callable[[int, Sequence[ReadPiece]], None]


def read_piece(fd: int, dst: memoryview, offset: int, need: int) -> None:
    """pread into `dst` from `offset` until at least `need` bytes arrived (a read may return less
    than asked: signals, > 2 GiB, the end of the file). Raises `ShortReadError` at the end of the file."""
    got = 0
    while got < need:
        n = os.preadv(fd, [dst[got:]], offset + got)
        if n <= 0:
            raise ShortReadError(f"short read: {got} of {need} bytes at offset {offset}")
        got += n


def read_sequential(fd: int, pieces: Sequence[ReadPiece]) -> None:
    """`Reader` that reads the pieces one after another in the calling thread."""
    for dst, offset, need in pieces:
        read_piece(fd, dst, offset, need)


def read_payloads(
    fd: int,
    hdr: ChunkHeader,
    indices: Sequence[int],
    buf: memoryview | None = None,
    reader: Reader | None = None,
    align: int = 1,
) -> dict[int, memoryview]:
    """Read and crc-check the payloads of blocks `indices`; returns {b: payload}, views into one buffer.

    Each run of adjacent blocks is one read (`reader`: default one pread in this thread; a
    deep-queue reader splits it, `disk.DiskTier`), the GIL released in the reads and in crc32c.
    `buf` (writable bytes, at least `payload_span` long, e.g. pinned host memory) receives the runs
    back to back; None allocates one. `align` > 1 (direct I/O: `buf` must start at an address that
    is a multiple of it): each run's file range is widened to multiples of `align`, so the payloads
    lie `offset % align` bytes into their run's slot of `buf`.
    """
    runs = _runs(indices)
    spans = _run_spans(hdr, runs, align)
    span = sum(e - s for s, e in spans)
    if buf is None:
        buf = memoryview(bytearray(span))
    elif buf.nbytes < span:
        raise ValueError(f"buffer of {buf.nbytes} bytes for {span} bytes of blocks")
    if align == 1:
        for start, end in spans:  # queue every run's pages at once (deep device queue on a cold file), then read
            if end - start >= _WILLNEED_MIN:
                try:
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                except OSError:  # only a hint
                    pass
    pieces: list[ReadPiece] = []
    pos = 0
    for run, (start, end) in zip(runs, spans, strict=True):
        need = hdr.offsets[run[-1]] + hdr.nbytes[run[-1]] - start  # the payload bytes; the rest is alignment
        pieces.append((buf[pos : pos + end - start], start, need))
        pos += end - start
    try:
        (reader or read_sequential)(fd, pieces)
    except ShortReadError as e:
        raise CorruptChunkError(f"chunk {hdr.chunk_key!r}: {e}") from e
    out: dict[int, memoryview] = {}
    pos = 0
    for run, (start, end) in zip(runs, spans, strict=True):
        for b in run:
            at = pos + hdr.offsets[b] - start
            payload = buf[at : at + hdr.nbytes[b]]
            if block_crc(payload) != hdr.crcs[b]:
                layer, head = divmod(b, hdr.meta.num_kv_heads)
                raise CorruptChunkError(
                    f"chunk {hdr.chunk_key!r}: checksum mismatch in block (layer {layer}, head {head})"
                )
            out[b] = payload
        pos += end - start
    return out
