"""Redis tier: encoded blocks shared by several replicas. Needs the `redis` package.

Keys, under `<prefix>:v<format>:<fingerprint digest[:32]>:<sha256(chunk_key)>`:
    `:m`         chunk meta, JSON {chunk_key, num_layers, num_kv_heads, num_tokens, head_dim, dtype,
                 blocks: [[token_start, num_tokens, codec, head_class], ...] (row b = layer·H + head)}
    `:l:<l>`     the blocks of layer l: the heads' CRC-32C u32 (little-endian), then the heads'
                 codec payloads back to back (codec.py; sizes from the meta). One value per
                 (chunk, layer): a chunk is one MGET of num_layers values, and its payloads land
                 back to back in one host buffer (one host -> GPU copy).
A chunk is written in one MULTI/EXEC (layers, then meta), so readers see all of it or none.
Budget and eviction belong to Redis (`maxmemory` + `allkeys-lru`): a layer Redis evicted is a
miss for that layer's blocks. Keys are namespaced by format version and fingerprint, so another
fingerprint (or an older format) never reads them.

Invariant: Redis is never on the critical path for correctness. Any connection or server error
raises `TierUnavailableError` (the store turns it into a miss and a log line), and after one the
tier reports itself unavailable for `retry_after_s` without touching the network.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

from redknot_rag.store.blockfile import CorruptChunkError, block_crc
from redknot_rag.store.codec import BlockMeta, ChunkMeta, Codec, HeadClass, Payload
from redknot_rag.store.disk import key_hash
from redknot_rag.store.fingerprint import FORMAT_VERSION, KVFingerprint
from redknot_rag.store.resp import RespAddress, RespClient, RespReader
from redknot_rag.store.tiers import TierUnavailableError

log = logging.getLogger(__name__)

_CRC = struct.Struct("<I")
_READ_SIZE = 4 << 20  # socket reads of up to 4 MiB: a chunk's reply is tens of MB of layer values
_T = TypeVar("_T")


# (meta, buffer, {layer: (offset of its payloads in the buffer, its heads' CRCs)}, layers of a wrong size)
_Read = tuple[ChunkMeta, memoryview, dict[int, tuple[int, bytes]], list[int]]


def _starts(meta: ChunkMeta, layer: int) -> list[int]:
    """Offsets of a layer's head payloads within its payload bytes, then their total: `[H + 1]`."""
    out = [0]
    for h in range(meta.num_kv_heads):
        out.append(out[-1] + meta.payload_nbytes(layer, h))
    return out


def _buffer(alloc: Callable[[int], memoryview] | None, nbytes: int) -> memoryview:
    return alloc(nbytes) if alloc is not None else memoryview(bytearray(nbytes))


def _meta_json(meta: ChunkMeta) -> str:
    return json.dumps(
        dict(
            chunk_key=meta.chunk_key,
            num_layers=meta.num_layers,
            num_kv_heads=meta.num_kv_heads,
            num_tokens=meta.num_tokens,
            head_dim=meta.head_dim,
            dtype=meta.dtype,
            blocks=[[b.token_start, b.num_tokens, int(b.codec), int(b.head_class)] for b in meta.blocks],
        )
    )


def _meta_from_json(raw: bytes, chunk_key: str) -> ChunkMeta:
    try:
        m = json.loads(raw)
        meta = ChunkMeta(
            m["chunk_key"],
            m["num_layers"],
            m["num_kv_heads"],
            m["num_tokens"],
            m["head_dim"],
            m["dtype"],
            tuple(BlockMeta(s, n, Codec(c), HeadClass(h)) for s, n, c, h in m["blocks"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptChunkError(f"redis meta for {chunk_key!r} is malformed: {e}") from e
    if meta.chunk_key != chunk_key:
        raise CorruptChunkError(f"redis meta for {chunk_key!r} names {meta.chunk_key!r}")
    return meta


class RedisTier:
    """ColdTier over a `redis.Redis` client (binary responses, i.e. decode_responses=False)."""

    name = "redis"

    def __init__(
        self,
        client: Any,
        fingerprint: KVFingerprint,
        prefix: str = "rkv",
        retry_after_s: float = 5.0,
        resp: RespClient | None = None,
    ) -> None:
        self.client = client
        self.resp = resp  # raw bulk reads straight into the caller's buffer (None: through redis-py)
        self.base = f"{prefix}:v{FORMAT_VERSION}:{fingerprint.digest()[:32]}"
        self.retry_after_s = retry_after_s
        self.num_evictions = 0  # Redis evicts on its own; not observable per client
        self.num_errors = 0
        self._down_until = 0.0
        self._figures, self._figures_at, self._refreshing = (0, 0), -1e9, False  # (used_memory, chunks)
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, fingerprint: KVFingerprint, timeout_s: float = 2.0, **kw: Any) -> RedisTier:
        """A tier over `redis.Redis.from_url(url)` with socket timeouts, so a hung server is a miss."""
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, socket_read_size=_READ_SIZE
        )
        address = RespAddress.from_url(url)
        if address is not None and "resp" not in kw:
            kw["resp"] = RespClient(address, timeout_s)
        return cls(client, fingerprint, **kw)

    def _key(self, chunk_key: str, suffix: str) -> str:
        return f"{self.base}:{key_hash(chunk_key)}:{suffix}"

    @property
    def is_available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run one client operation; any failure becomes TierUnavailableError.

        Connection-level failures (refused, reset, timeout) also mark the tier unavailable for
        `retry_after_s`; a server error reply (e.g. OOM under `maxmemory` with noeviction) fails
        only this call.
        """
        if not self.is_available:
            raise TierUnavailableError("redis tier marked unavailable after a recent error")
        try:
            return fn()
        except CorruptChunkError:
            raise
        except Exception as e:  # redis.RedisError, OSError, socket timeouts: all mean "not now"
            raise self._unavailable(e) from e

    def _unavailable(self, e: Exception) -> TierUnavailableError:
        """The TierUnavailableError for a failed operation (marks the tier down on a connection error)."""
        import redis

        down = isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError))
        with self._lock:
            first = self.is_available
            if down:
                self._down_until = time.monotonic() + self.retry_after_s
            self.num_errors += 1
        if first:
            log.warning(
                "redis KV tier %s (%s: %s); treating it as a miss%s",
                "unavailable" if down else "refused a command",
                type(e).__name__,
                e,
                f" for {self.retry_after_s:.0f} s" if down else "",
            )
        return TierUnavailableError(str(e))

    # -- ColdTier ---------------------------------------------------------------------------

    def put_chunk(self, meta: ChunkMeta, payloads: Sequence[Payload], durable: bool = True) -> list[str]:
        """Every block plus the meta, in one MULTI/EXEC. Redis does budget eviction (and persistence) itself."""

        H = meta.num_kv_heads
        if len(payloads) != meta.num_layers * H:
            raise ValueError(f"{len(payloads)} payloads for {meta.num_layers}x{H} blocks")

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            for layer in range(meta.num_layers):
                ps = payloads[layer * H : (layer + 1) * H]
                crcs = b"".join(_CRC.pack(block_crc(p)) for p in ps)
                pipe.set(self._key(meta.chunk_key, f"l:{layer}"), b"".join([crcs, *ps]))
            pipe.set(self._key(meta.chunk_key, "m"), _meta_json(meta))
            pipe.execute()

        self._call(write)
        return []

    def meta(self, chunk_key: str) -> ChunkMeta | None:
        raw = self._call(lambda: self.client.get(self._key(chunk_key, "m")))
        return None if raw is None else _meta_from_json(raw, chunk_key)

    def get_payloads(
        self,
        chunk_key: str,
        blocks: Sequence[tuple[int, int]],
        alloc: Callable[[int], memoryview] | None = None,
    ) -> tuple[ChunkMeta, dict[tuple[int, int], Payload]] | None:
        """Meta and the crc-verified payloads of the requested blocks Redis still holds: one MGET of
        the meta and the requested layers' values. The layers' payloads land back to back in one
        buffer (`alloc(nbytes)`, default a bytearray) and are returned as views of it; with a raw
        connection (`resp`) they are read from the socket straight into it."""
        layers, keys = self._layer_keys(chunk_key, blocks)
        got = self._call(lambda: self._read_raw(chunk_key, keys, layers, alloc) if self.resp else
                         self._read_client(chunk_key, keys, layers, alloc))  # fmt: skip
        return self._verified(chunk_key, blocks, got)

    def _layer_keys(self, chunk_key: str, blocks: Sequence[tuple[int, int]]) -> tuple[list[int], list[str]]:
        """The layers of `blocks`, ascending, and the keys one read asks for: the meta, then those layers."""
        layers = sorted({layer for layer, _ in blocks})
        return layers, [self._key(chunk_key, "m")] + [self._key(chunk_key, f"l:{layer}") for layer in layers]

    def _verified(
        self, chunk_key: str, blocks: Sequence[tuple[int, int]], got: _Read | None
    ) -> tuple[ChunkMeta, dict[tuple[int, int], Payload]] | None:
        """The crc-verified payloads of `blocks` out of one chunk's read; a bad layer or block drops the
        chunk and raises CorruptChunkError."""
        if got is None:
            return None
        meta, buf, placed, bad = got
        if bad:
            self._drop_quietly(chunk_key, meta)
            raise CorruptChunkError(f"chunk {chunk_key!r}: redis layers {bad} have the wrong size")
        out: dict[tuple[int, int], Payload] = {}
        starts_of: dict[int, list[int]] = {}
        for layer, head in blocks:
            if layer not in placed:
                continue  # Redis evicted this layer: a miss for its blocks
            pos, crcs = placed[layer]
            starts = starts_of.get(layer) or starts_of.setdefault(layer, _starts(meta, layer))
            payload = buf[pos + starts[head] : pos + starts[head + 1]]
            (crc,) = _CRC.unpack_from(crcs, _CRC.size * head)
            if block_crc(payload) != crc:
                self._drop_quietly(chunk_key, meta)
                raise CorruptChunkError(f"chunk {chunk_key!r}: redis block {(layer, head)} failed its checksum")
            out[(layer, head)] = payload
        return meta, out

    def metas(self, chunk_keys: Sequence[str]) -> list[ChunkMeta | None]:
        """`meta` of every chunk in one round trip (one MGET); a malformed meta is None here (the chunk's
        own read reports it)."""
        values: list[bytes | None] = self._call(lambda: self.client.mget([self._key(k, "m") for k in chunk_keys]))
        out: list[ChunkMeta | None] = []
        for key, raw in zip(chunk_keys, values, strict=True):
            try:
                out.append(None if raw is None else _meta_from_json(raw, key))
            except CorruptChunkError:
                out.append(None)
        return out

    def get_payloads_many(
        self, requests: Sequence[tuple[str, Sequence[tuple[int, int]], Callable[[int], memoryview] | None]]
    ) -> Iterator[tuple[str, tuple[ChunkMeta, dict[tuple[int, int], Payload]] | None | CorruptChunkError]]:
        """`get_payloads(chunk_key, blocks, alloc)` of every request `(chunk_key, blocks, alloc)` in ONE round
        trip: one MGET of every chunk's meta and layers, its reply read chunk by chunk as it arrives and
        yielded in request order as `(chunk_key, answer)`, where a chunk that failed validation yields its
        CorruptChunkError (after it was dropped; the reply stays in step). A connection or server error
        raises TierUnavailableError from the iterator (the chunks not yielded yet have no answer)."""
        if not self.is_available:
            raise TierUnavailableError("redis tier marked unavailable after a recent error")
        plans = [(key, blocks, alloc, *self._layer_keys(key, blocks)) for key, blocks, alloc in requests]
        all_keys = [k for *_, keys in plans for k in keys]
        if not plans:
            return
        done = False
        try:
            if self.resp is not None:
                reader = self.resp.mget(all_keys)
                for key, blocks, alloc, layers, _ in plans:
                    yield key, self._answer(key, blocks, partial(self._parse_raw, reader, key, layers, alloc))
            else:
                values = self.client.mget(all_keys)
                pos = 0
                for key, blocks, alloc, layers, keys in plans:
                    got = values[pos : pos + len(keys)]
                    pos += len(keys)
                    yield key, self._answer(key, blocks, partial(self._parse_client, key, got, layers, alloc))
            done = True
        except (CorruptChunkError, GeneratorExit):
            raise
        except Exception as e:
            raise self._unavailable(e) from e
        finally:
            if not done and self.resp is not None:
                self.resp.drop()  # the reply is not drained: the stream position is unknown

    def _answer(
        self, chunk_key: str, blocks: Sequence[tuple[int, int]], parse: Callable[[], _Read | None]
    ) -> tuple[ChunkMeta, dict[tuple[int, int], Payload]] | None | CorruptChunkError:
        try:
            return self._verified(chunk_key, blocks, parse())
        except CorruptChunkError as e:
            return e

    def _read_client(
        self, chunk_key: str, keys: list[str], layers: list[int], alloc: Callable[[int], memoryview] | None
    ) -> _Read | None:
        """Through redis-py: one MGET, then `_parse_client`."""
        return self._parse_client(chunk_key, self.client.mget(keys), layers, alloc)

    def _parse_client(
        self,
        chunk_key: str,
        values: Sequence[bytes | None],
        layers: list[int],
        alloc: Callable[[int], memoryview] | None,
    ) -> _Read | None:
        """One chunk's MGET values (meta, then `layers`): each layer's payloads copied into the buffer."""
        if values[0] is None:
            return None
        meta = _meta_from_json(values[0], chunk_key)
        buf = _buffer(alloc, sum(_starts(meta, layer)[-1] for layer in layers))
        placed: dict[int, tuple[int, bytes]] = {}
        bad: list[int] = []
        pos = 0
        for layer, raw in zip(layers, values[1:], strict=True):
            if raw is None:
                continue
            head, size = _CRC.size * meta.num_kv_heads, _starts(meta, layer)[-1]
            if len(raw) != head + size:
                bad.append(layer)
                continue
            buf[pos : pos + size] = memoryview(raw)[head:]
            placed[layer] = (pos, bytes(raw[:head]))
            pos += size
        return meta, buf, placed, bad

    def _read_raw(
        self, chunk_key: str, keys: list[str], layers: list[int], alloc: Callable[[int], memoryview] | None
    ) -> _Read | None:
        """Through the raw connection: one MGET, then `_parse_raw`."""
        assert self.resp is not None
        try:
            return self._parse_raw(self.resp.mget(keys), chunk_key, layers, alloc)
        except CorruptChunkError:
            raise  # the reply was read to its end: the connection is in step
        except BaseException:
            self.resp.drop()  # the stream position is unknown (or the reply is not drained)
            raise

    def _parse_raw(
        self, reader: RespReader, chunk_key: str, layers: list[int], alloc: Callable[[int], memoryview] | None
    ) -> _Read | None:
        """One chunk's values off a raw MGET reply (meta, then `layers`), each layer's payloads read from
        the socket into the buffer. Leaves the reply after this chunk's values, a malformed meta too
        (then CorruptChunkError); any other error leaves the stream position unknown."""
        n = reader.header(b"$")
        meta_error: CorruptChunkError | None = None
        meta = None
        if n >= 0:
            try:
                meta = _meta_from_json(reader.bulk_bytes(n), chunk_key)
            except CorruptChunkError as e:
                meta_error = e
        if meta is None:  # absent or malformed: skip its layers
            for _ in layers:
                if (m := reader.header(b"$")) >= 0:
                    reader.skip(m)
            if meta_error is not None:
                raise meta_error
            return None
        buf = _buffer(alloc, sum(_starts(meta, layer)[-1] for layer in layers))
        placed: dict[int, tuple[int, bytes]] = {}
        bad: list[int] = []
        pos = 0
        for layer in layers:
            m = reader.header(b"$")
            if m < 0:
                continue
            head, size = _CRC.size * meta.num_kv_heads, _starts(meta, layer)[-1]
            if m != head + size:
                reader.skip(m)
                bad.append(layer)
                continue
            crcs = bytearray(head)
            reader.read_into(memoryview(crcs))
            reader.read_into(buf[pos : pos + size])
            reader.end_bulk()
            placed[layer] = (pos, bytes(crcs))
            pos += size
        return meta, buf, placed, bad

    def _drop_quietly(self, chunk_key: str, meta: ChunkMeta | None) -> None:
        try:
            self._delete(chunk_key, meta)
        except TierUnavailableError:
            pass

    def _delete(self, chunk_key: str, meta: ChunkMeta | None) -> bool:
        keys = [self._key(chunk_key, "m")]
        if meta is not None:
            keys += [self._key(chunk_key, f"l:{layer}") for layer in range(meta.num_layers)]
        return bool(self._call(lambda: self.client.delete(*keys)))

    def contains_chunk(self, chunk_key: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self._key(chunk_key, "m"))))

    def delete_chunk(self, chunk_key: str) -> bool:
        try:
            meta = self.meta(chunk_key)
        except CorruptChunkError:
            meta = None
        return self._delete(chunk_key, meta)

    def chunk_keys(self) -> Iterator[str]:
        keys = self._call(lambda: list(self.client.scan_iter(match=f"{self.base}:*:m")))
        for i in range(0, len(keys), 512):  # metas in MGET batches
            batch = keys[i : i + 512]
            values: list[bytes | None] = self._call(partial(self.client.mget, batch))
            for raw in values:
                if raw is not None:
                    yield json.loads(raw)["chunk_key"]

    def stored_nbytes(self) -> int:
        """Bytes of this namespace's values (one SCAN + STRLEN pass: for `redknot store stats`, not hot paths)."""

        def total() -> int:
            keys = list(self.client.scan_iter(match=f"{self.base}:*"))
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            return int(sum(pipe.execute())) if keys else 0

        return self._call(total)

    @property
    def nbytes(self) -> int:
        """Memory the Redis server uses (all tenants); 0 until known. Redis owns the budget.

        Like `num_chunks`, a cached figure refreshed in the background (at most every 10 s), so a
        stats call never waits on Redis.
        """
        self._refresh_figures()
        return self._figures[0]

    @property
    def num_chunks(self) -> int:
        """Chunks of this namespace in Redis (a SCAN, refreshed in the background)."""
        self._refresh_figures()
        return self._figures[1]

    def _refresh_figures(self) -> None:
        with self._lock:
            if self._refreshing or time.monotonic() - self._figures_at < 10.0:
                return
            self._refreshing = True
        threading.Thread(target=self._compute_figures, name="kv-redis-stats", daemon=True).start()

    def _compute_figures(self) -> None:
        def compute() -> tuple[int, int]:
            used = int(self.client.info("memory")["used_memory"])
            return used, sum(1 for _ in self.client.scan_iter(match=f"{self.base}:*:m", count=1000))

        try:
            figures = self._call(compute)
        except (TierUnavailableError, KeyError, TypeError, ValueError):
            figures = (0, 0)
        with self._lock:
            self._figures, self._figures_at, self._refreshing = figures, time.monotonic(), False
