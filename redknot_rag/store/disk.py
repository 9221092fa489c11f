"""Disk tier: one block file per chunk under a fingerprint namespace.

    root/v2-<fingerprint digest[:32]>/
        fingerprint.json      the fingerprint fields, for humans
        chunks/ab/<sha256(chunk_key)>.rkv
        tmp/                  in-flight writes: <keyhash>.<host>.<pid>.<rand>.tmp
        quarantine/           files that failed validation, kept for inspection

Invariants (crash safety): a file under chunks/ appears only by os.replace of a fully written and
fsynced temp file from tmp/ (same filesystem), followed by an fsync of its directory; so any
visible chunk file is complete, and a SIGKILL at any point leaves at most a stale temp file,
which the next open removes. Concurrent writers of one chunk each write their own temp file;
the last rename wins, and the content is identical under one fingerprint.

Reads are sized to the device: a chunk's runs are split into `read_piece_bytes` pieces read by
`read_depth` threads (that many reads in flight, where one large pread keeps the device's queue
shallow), optionally with O_DIRECT (`direct_io`: no page-cache copy; aligned buffer and ranges).
A read returns only once none of its pieces is still running, so a failed piece never writes into a
buffer its caller has dropped; an I/O error raises `ChunkReadError` (the file is kept: it is not
known to be bad), a short read `CorruptChunkError`.

Eviction is LRU over whole chunk files under `budget_bytes`, made before a new file is written,
so committed plus in-flight bytes never exceed the budget; an evicted chunk is handed to `demote`
(the next tier down) before its file is removed, so it is moved, not lost.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from redknot_rag.store.blockfile import (
    ChunkHeader,
    CorruptChunkError,
    FingerprintMismatchError,
    ReadPiece,
    encode_chunk,
    payload_span,
    read_header,
    read_payloads,
    read_piece,
    read_sequential,
)
from redknot_rag.store.codec import ChunkMeta, Payload
from redknot_rag.store.fingerprint import FORMAT_VERSION, KVFingerprint, sha256_hex

log = logging.getLogger(__name__)

_STALE_TMP_S = 3600.0  # temp files of another host (or a reused pid) count as stale after this
_HEADER_CACHE = 4096
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of the logical block


@functools.lru_cache(maxsize=1 << 16)
def key_hash(chunk_key: str) -> str:
    return sha256_hex(b"chunk", chunk_key)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChunkReadError(OSError):
    """Reading a chunk file failed (an I/O error, not a bad file): the read fails, the file stays."""


class DeepReader:
    """`blockfile.Reader` with queue depth: every read split into pieces of `piece_bytes`, run by
    `depth` threads (up to `depth` reads in flight). Returns only when every piece has finished,
    then raises the first piece's error, if any."""

    def __init__(self, depth: int, piece_bytes: int) -> None:
        if depth < 1 or piece_bytes < DIRECT_ALIGN or piece_bytes % DIRECT_ALIGN:
            raise ValueError(f"read depth {depth} must be >= 1, piece bytes {piece_bytes} a multiple of {DIRECT_ALIGN}")
        self.depth, self.piece_bytes = depth, piece_bytes
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="kv-pread") if depth > 1 else None

    def __call__(self, fd: int, pieces: Sequence[ReadPiece]) -> None:
        split: list[ReadPiece] = []
        for dst, offset, need in pieces:
            for a in range(0, need, self.piece_bytes):
                b = min(a + self.piece_bytes, dst.nbytes)
                split.append((dst[a:b], offset + a, min(b, need) - a))
        if self._pool is None or len(split) <= 1:
            read_sequential(fd, split)
            return
        futures = [self._pool.submit(read_piece, fd, *p) for p in split]
        wait(futures)  # none still writes into the buffer once we return or raise
        for f in futures:
            if (e := f.exception()) is not None:
                raise e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def aligned(alloc: Alloc | None, nbytes: int, align: int) -> memoryview:
    """A writable buffer of `nbytes` starting at a multiple of `align` (from `alloc(nbytes + align)`)."""
    raw = alloc(nbytes + align) if alloc is not None else memoryview(bytearray(nbytes + align))
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    pad = -address % align
    return raw[pad : pad + nbytes]


Demote = Callable[[ChunkMeta, list[Payload]], None]
Alloc = Callable[[int], memoryview]  # nbytes -> a writable buffer of at least that many bytes


def old_format_dirs(root: Path) -> list[Path]:
    """Namespaces under `root` written by another format version (this build never reads them)."""
    if not Path(root).is_dir():
        return []
    return sorted(
        p
        for p in Path(root).iterdir()
        if p.is_dir() and p.name[:1] == "v" and p.name.split("-")[0] != f"v{FORMAT_VERSION}" and "-" in p.name
    )


class DiskTier:
    """Durable chunk files with per-block reads; LRU over whole chunks under `budget_bytes`."""

    name = "disk"

    def __init__(
        self,
        root: Path,
        fingerprint: KVFingerprint,
        budget_bytes: int | None = None,
        demote: Demote | None = None,
        *,
        read_depth: int = 1,
        read_piece_bytes: int = 1 << 20,
        direct_io: bool = False,
    ) -> None:
        self.digest = fingerprint.digest()
        self.reader = DeepReader(read_depth, read_piece_bytes)
        self.direct_io = direct_io  # cleared (with a log line) where the filesystem refuses O_DIRECT
        self.budget_bytes = budget_bytes
        self.demote = demote
        for old in old_format_dirs(Path(root)):
            log.warning(
                "KV store %s holds chunk files of an older format (%s); this build reads only format v%d, "
                "so those chunks are misses: `redknot store migrate` (or re-ingesting) rewrites them",
                root,
                old.name.split("-")[0],
                FORMAT_VERSION,
            )
        self.ns = Path(root) / f"v{FORMAT_VERSION}-{self.digest[:32]}"
        self.chunks_dir, self.tmp_dir, self.quarantine_dir = (self.ns / d for d in ("chunks", "tmp", "quarantine"))
        for d in (self.chunks_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace(".", "_")
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key hash -> file bytes, LRU oldest first
        self._headers: OrderedDict[str, tuple[tuple[int, int], ChunkHeader]] = OrderedDict()
        self.nbytes = 0  # committed files
        self._reserved = 0  # files being written (counted against the budget before they exist)
        self.num_evictions = 0
        self._write_fingerprint(fingerprint)
        self.num_stale_removed = self._clean_tmp()
        self._scan()

    # -- open -------------------------------------------------------------------------------

    def _write_fingerprint(self, fp: KVFingerprint) -> None:
        path = self.ns / "fingerprint.json"
        if path.exists():
            return
        tmp = self.tmp_dir / f"fingerprint.{self._host}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"digest": self.digest, **fp.__dict__}, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _clean_tmp(self) -> int:
        """Remove temp files whose writer is gone (dead local pid, or older than _STALE_TMP_S)."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            parts = entry.name.split(".")
            try:
                local = len(parts) == 5 and parts[1] == self._host
                stale = (local and not _pid_alive(int(parts[2]))) or (
                    time.time() - entry.stat().st_mtime > _STALE_TMP_S
                )
                if stale:
                    os.unlink(entry.path)
                    removed += 1
            except (ValueError, FileNotFoundError):
                continue
        return removed

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for sub in os.scandir(self.chunks_dir):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(".rkv"):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime, entry.name[:-4], st.st_size))
        for _, kh, size in sorted(found):
            self._index[kh] = size
            self.nbytes += size

    # -- paths ------------------------------------------------------------------------------

    def _path(self, kh: str) -> Path:
        return self.chunks_dir / kh[:2] / f"{kh}.rkv"

    def _forget(self, kh: str) -> None:
        """Caller holds the lock."""
        size = self._index.pop(kh, None)
        if size is not None:
            self.nbytes -= size
        self._headers.pop(kh, None)

    def _quarantine(self, kh: str, why: str) -> None:
        try:
            os.replace(self._path(kh), self.quarantine_dir / f"{kh}.rkv")
        except FileNotFoundError:
            pass
        with self._lock:
            self._forget(kh)
        log.warning("KV chunk file %s quarantined: %s", kh, why)

    # -- chunks -----------------------------------------------------------------------------

    def put_chunk(self, meta: ChunkMeta, payloads: Sequence[Payload], durable: bool = True) -> list[str]:
        """Atomically write a chunk's encoded blocks (table order). Returns chunk keys evicted for the budget.

        `durable=False` (a cache fill of a chunk a colder tier holds) skips the fsyncs: the rename is
        still atomic, and a file torn by a power loss fails its checksums and is a miss.
        """
        kh = key_hash(meta.chunk_key)
        tmp = self.tmp_dir / f"{kh}.{self._host}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        final = self._path(kh)
        parts = list(encode_chunk(meta, self.digest, payloads))
        size = sum(len(p) for p in parts)  # the file's size
        with self._lock:
            self._reserved += size
        try:
            evicted = self._enforce_budget(keep=kh)  # room first: the budget holds while we write
            try:
                with open(tmp, "xb") as f:
                    for part in parts:
                        f.write(part)
                    f.flush()
                    if durable:
                        os.fsync(f.fileno())
                if not final.parent.is_dir():
                    final.parent.mkdir(exist_ok=True)
                    _fsync_dir(self.chunks_dir)
                os.replace(tmp, final)  # the commit point
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if durable:
                _fsync_dir(final.parent)
            with self._lock:
                self._forget(kh)
                self._index[kh] = size
                self.nbytes += size
        finally:
            with self._lock:
                self._reserved -= size
        return evicted

    def _enforce_budget(self, keep: str) -> list[str]:
        """Evict LRU chunks until committed + reserved bytes (less `keep`'s file, which is being
        replaced) fit the budget. A chunk larger than the whole budget is still written."""
        if self.budget_bytes is None:
            return []
        evicted: list[str] = []
        while True:
            with self._lock:
                if self.nbytes + self._reserved - self._index.get(keep, 0) <= self.budget_bytes:
                    break
                victim = next((kh for kh in self._index if kh != keep), None)
                if victim is None:
                    break
            name = self._demote(victim)
            self._path(victim).unlink(missing_ok=True)
            with self._lock:
                self._forget(victim)
                self.num_evictions += 1
            if name is not None:
                evicted.append(name)
        return evicted

    def _demote(self, kh: str) -> str | None:
        """Hand an evicted chunk to `demote` (if any); returns its key (None if unreadable)."""
        try:
            got = self._header(kh)
        except (CorruptChunkError, FingerprintMismatchError):
            return None
        if got is None:
            return None
        fd, hdr = got
        try:
            if self.demote is None:
                return hdr.chunk_key
            raw = read_payloads(fd, hdr, range(hdr.num_blocks))
        except CorruptChunkError as e:
            log.warning("evicted KV chunk %s is corrupt, dropped instead of demoted: %s", kh, e)
            return hdr.chunk_key
        finally:
            os.close(fd)
        self.demote(hdr.meta, [raw[b] for b in range(hdr.num_blocks)])
        return hdr.chunk_key

    def _header(self, kh: str) -> tuple[int, ChunkHeader] | None:
        """(open fd, verified header), caller closes the fd; None if absent. Raises on a bad file.

        Header and blocks are read through one fd, so a concurrent replace or unlink of the path
        cannot mix two files' bytes.
        """
        try:
            fd = os.open(self._path(kh), os.O_RDONLY)
        except FileNotFoundError:
            with self._lock:
                self._forget(kh)
            return None
        try:
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_mtime_ns)
            with self._lock:
                cached = self._headers.get(kh)
            if cached is not None and cached[0] == ident:
                return fd, cached[1]
            hdr = read_header(fd, expect_digest=self.digest)
            with self._lock:
                self._headers[kh] = (ident, hdr)
                while len(self._headers) > _HEADER_CACHE:
                    self._headers.popitem(last=False)
            return fd, hdr
        except BaseException:
            os.close(fd)
            raise

    def _open(self, chunk_key: str) -> tuple[int, ChunkHeader] | None:
        """Open and validate; a fingerprint mismatch quarantines and misses, corruption raises."""
        kh = key_hash(chunk_key)
        try:
            got = self._header(kh)
        except FingerprintMismatchError as e:
            self._quarantine(kh, str(e))
            return None
        except CorruptChunkError as e:
            self._quarantine(kh, str(e))
            raise
        if got is not None and got[1].chunk_key != chunk_key:
            os.close(got[0])
            raise CorruptChunkError(f"file for {chunk_key!r} holds chunk {got[1].chunk_key!r}")
        return got

    def meta(self, chunk_key: str) -> ChunkMeta | None:
        got = self._open(chunk_key)
        if got is None:
            return None
        os.close(got[0])
        return got[1].meta

    def get_payloads(
        self, chunk_key: str, blocks: Sequence[tuple[int, int]], alloc: Alloc | None = None
    ) -> tuple[ChunkMeta, dict[tuple[int, int], Payload]] | None:
        """Crc-verified payloads of blocks (layer, head) of one chunk.

        Reads the header and exactly the requested blocks' bytes, each run of adjacent blocks in one
        pread, into one buffer (`alloc(nbytes)`, e.g. pinned host memory; default a bytearray):
        the payloads are memoryviews into it. Raises CorruptChunkError (and quarantines the file)
        if any requested block fails its checksum.
        """
        got = self._open(chunk_key)
        if got is None:
            return None
        fd, hdr = got
        kh = key_hash(chunk_key)
        try:
            idx = {hdr.block_index(layer, head): (layer, head) for layer, head in blocks}
            try:
                raw = self._read(fd, hdr, list(idx), alloc, self.direct_io and self._set_direct(fd, True))
            except OSError as e:  # a filesystem that takes the O_DIRECT flag but not the reads: buffered
                if e.errno != errno.EINVAL or not self.direct_io:
                    raise
                self._set_direct(fd, False, why=e)
                raw = self._read(fd, hdr, list(idx), alloc, False)
        except CorruptChunkError as e:
            self._quarantine(kh, str(e))
            raise
        except OSError as e:
            raise ChunkReadError(f"reading KV chunk {chunk_key!r} ({self._path(kh)}) failed: {e}") from e
        finally:
            os.close(fd)
        with self._lock:
            if kh in self._index:
                self._index.move_to_end(kh)
        return hdr.meta, {idx[b]: p for b, p in raw.items()}

    def _read(
        self, fd: int, hdr: ChunkHeader, indices: list[int], alloc: Alloc | None, direct: bool
    ) -> dict[int, memoryview]:
        align = DIRECT_ALIGN if direct else 1
        span = payload_span(hdr, indices, align)
        buf = aligned(alloc, span, align) if direct else alloc(span) if alloc is not None else None
        return read_payloads(fd, hdr, indices, buf, self.reader, align)

    def _set_direct(self, fd: int, on: bool, why: Exception | None = None) -> bool:
        """Turn O_DIRECT on (or off) for `fd`; where refused (or `why`: a direct read failed), direct I/O
        is off for good, with a log line, and False is returned."""
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
            if why is None:
                return on
        except OSError as e:
            why = e
        if self.direct_io:
            self.direct_io = False
            log.warning("KV store %s: direct I/O refused (%s); reading through the page cache", self.ns, why)
        return False

    def close(self) -> None:
        """Stop the read threads."""
        self.reader.close()

    def contains_chunk(self, chunk_key: str) -> bool:
        kh = key_hash(chunk_key)
        with self._lock:
            if kh in self._index:
                return True
        # another process may have committed it since our scan
        try:
            size = self._path(kh).stat().st_size
        except FileNotFoundError:
            return False
        with self._lock:
            if kh not in self._index:
                self._index[kh] = size
                self.nbytes += size
        return True

    def delete_chunk(self, chunk_key: str) -> bool:
        kh = key_hash(chunk_key)
        try:
            self._path(kh).unlink()
            existed = True
        except FileNotFoundError:
            existed = False
        with self._lock:
            self._forget(kh)
        return existed

    def chunk_keys(self) -> Iterator[str]:
        """Keys of the committed chunks (reads each header; files failing validation are skipped)."""
        with self._lock:
            hashes = list(self._index)
        for kh in hashes:
            try:
                got = self._header(kh)
            except (CorruptChunkError, FingerprintMismatchError):
                continue
            if got is not None:
                os.close(got[0])
                yield got[1].chunk_key

    @property
    def num_chunks(self) -> int:
        return len(self._index)
