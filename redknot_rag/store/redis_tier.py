"""Redis cold tier: blocks shared by several replicas. Needs the `redis` package.

Keys, under `<prefix>:<fingerprint digest[:32]>:<sha256(chunk_key)>`:
    `:m`        chunk meta, JSON {chunk_key, num_layers, num_kv_heads, num_tokens, head_dim, dtype}
    `:b:<l>:<h>` block value: crc32 u32 (little-endian) + K bytes + V bytes (`[T, D]` each)
A chunk is written in one MULTI/EXEC (blocks, then meta), so readers see all of it or none.
Budget and eviction belong to Redis (`maxmemory` + `allkeys-lru`): a block Redis evicted makes
its chunk a miss. Keys are namespaced by fingerprint, so another fingerprint never reads them.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from redknot_rag.store.blockfile import CorruptChunkError
from redknot_rag.store.disk import key_hash
from redknot_rag.store.fingerprint import KVFingerprint, dtype_from_name, dtype_name
from redknot_rag.store.tiers import BlockKey, ChunkShape, KVBlock

_CRC = struct.Struct("<I")


class RedisTier:
    """ColdTier over a `redis.Redis` client (binary responses, i.e. decode_responses=False)."""

    def __init__(self, client: Any, fingerprint: KVFingerprint, prefix: str = "rkv") -> None:
        self.client = client
        self.base = f"{prefix}:{fingerprint.digest()[:32]}"
        self.num_evictions = 0

    def _key(self, chunk_key: str, suffix: str) -> str:
        return f"{self.base}:{key_hash(chunk_key)}:{suffix}"

    def put_chunk(self, chunk_key: str, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        """K, V `[L, H, T, D]` on CPU, written atomically. Redis does budget eviction itself."""
        L, H, T, D = k.shape
        pipe = self.client.pipeline(transaction=True)
        for layer in range(L):
            for head in range(H):
                payload = (
                    k[layer, head].contiguous().view(torch.uint8).numpy().tobytes()
                    + v[layer, head].contiguous().view(torch.uint8).numpy().tobytes()
                )
                pipe.set(self._key(chunk_key, f"b:{layer}:{head}"), _CRC.pack(zlib.crc32(payload)) + payload)
        meta = dict(
            chunk_key=chunk_key,
            num_layers=L,
            num_kv_heads=H,
            num_tokens=T,
            head_dim=D,
            dtype=dtype_name(k.dtype),
        )
        pipe.set(self._key(chunk_key, "m"), json.dumps(meta))
        pipe.execute()
        return []

    def shape(self, chunk_key: str) -> ChunkShape | None:
        raw = self.client.get(self._key(chunk_key, "m"))
        if raw is None:
            return None
        m = json.loads(raw)
        if m["chunk_key"] != chunk_key:
            raise CorruptChunkError(f"redis meta for {chunk_key!r} names {m['chunk_key']!r}")
        return ChunkShape(m["num_layers"], m["num_kv_heads"], m["num_tokens"], m["head_dim"], m["dtype"])

    def get_blocks(self, chunk_key: str, blocks: Sequence[tuple[int, int]]) -> dict[tuple[int, int], KVBlock] | None:
        shape = self.shape(chunk_key)
        if shape is None:
            return None
        dtype, T, D = dtype_from_name(shape.dtype), shape.num_tokens, shape.head_dim
        values = self.client.mget([self._key(chunk_key, f"b:{l}:{h}") for l, h in blocks])
        out: dict[tuple[int, int], KVBlock] = {}
        for b, raw in zip(blocks, values, strict=True):
            if raw is None:
                return None  # Redis evicted part of the chunk: a miss
            (crc,) = _CRC.unpack_from(raw)
            payload = bytearray(raw[_CRC.size :])
            if zlib.crc32(payload) != crc or len(payload) != 2 * T * D * dtype.itemsize:
                self.delete_chunk(chunk_key)
                raise CorruptChunkError(f"chunk {chunk_key!r}: redis block {b} failed its checksum")
            kv = torch.frombuffer(payload, dtype=dtype).view(2, T, D)  # K then V
            out[b] = KVBlock(kv[0], kv[1])
        return out

    def contains_chunk(self, chunk_key: str) -> bool:
        return bool(self.client.exists(self._key(chunk_key, "m")))

    def delete_chunk(self, chunk_key: str) -> bool:
        try:
            shape = self.shape(chunk_key)
        except CorruptChunkError:
            shape = None
        keys = [self._key(chunk_key, "m")]
        if shape is not None:
            keys += [
                self._key(chunk_key, f"b:{l}:{h}") for l in range(shape.num_layers) for h in range(shape.num_kv_heads)
            ]
        return bool(self.client.delete(*keys))

    def chunk_keys(self) -> Iterator[str]:
        for key in self.client.scan_iter(match=f"{self.base}:*:m"):
            raw = self.client.get(key)
            if raw is not None:
                yield json.loads(raw)["chunk_key"]

    @property
    def nbytes(self) -> int:
        """Not tracked: Redis owns the budget (`INFO memory`)."""
        return 0

    @property
    def num_chunks(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=f"{self.base}:*:m"))

    # -- BlockTier --------------------------------------------------------------------------

    def get(self, key: BlockKey) -> KVBlock | None:
        got = self.get_blocks(key.chunk_key, [(key.layer, key.head)])
        return None if got is None else got[(key.layer, key.head)]

    def put(self, key: BlockKey, block: KVBlock) -> None:
        """Replace one block of a stored chunk (blocks are separate keys here, so no rewrite)."""
        shape = self.shape(key.chunk_key)
        if shape is None:
            raise KeyError(f"{key.chunk_key!r} is not stored (use put_chunk)")
        payload = (
            block.k.cpu().contiguous().view(torch.uint8).numpy().tobytes()
            + block.v.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        )
        self.client.set(self._key(key.chunk_key, f"b:{key.layer}:{key.head}"), _CRC.pack(zlib.crc32(payload)) + payload)

    def contains(self, key: BlockKey) -> bool:
        return bool(self.client.exists(self._key(key.chunk_key, f"b:{key.layer}:{key.head}")))

    def delete(self, key: BlockKey) -> bool:
        """Dropping one block makes its chunk a miss until rewritten, as a Redis eviction would."""
        return bool(self.client.delete(self._key(key.chunk_key, f"b:{key.layer}:{key.head}")))
