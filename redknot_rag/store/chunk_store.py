"""ChunkKVStore: stored chunk KV, head-decomposed, over host memory -> disk -> Redis.

Invariants:
- Every block the store returns was written under this store's fingerprint and passed its
  checksum; a mismatch or a corrupt block is a miss (the bad copy is dropped), never a reuse.
- A chunk is stored iff some cold tier (disk, Redis) holds it. Host memory caches blocks of
  stored chunks (write-through on `put`), so evicting from host never loses a block; a chunk disk
  evicts is demoted to Redis (when there is one), and only the coldest tier's eviction drops it.
- A block read from a colder tier is promoted (into host memory; a chunk read from Redis is also
  copied to disk by a background thread, without fsync: a torn copy fails its checksums). Host
  memory holds exactly what the cold tiers decode to (or, `decode_on="device"`, a quantized chunk's
  verified payloads, which decode to the same bits), so a block is the same bits from every tier.
- Placement is per (chunk, layer, kv_head) block. A local head's block holds only the chunk's tail
  window (`StoreConfig.heads`); `get` (whole-token tensors) treats such a block as a miss,
  `get_blocks` returns it with its token range.
- Tier errors (Redis down) degrade to misses and a log line, never to an exception for a reader.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, overload

import torch

from redknot_rag.store.blockfile import CorruptChunkError
from redknot_rag.store.codec import (
    BlockMeta,
    ChunkMeta,
    Codec,
    CodecUnsupportedError,
    HeadClass,
    Payload,
    decode_block,
    decode_int4_batch,
    encode_block,
)
from redknot_rag.store.disk import DiskTier
from redknot_rag.store.fingerprint import KVFingerprint, dtype_from_name
from redknot_rag.store.prefetch import Prefetch, Prefetcher
from redknot_rag.store.stats import Counters, StoreStats, TierStats, save_stats
from redknot_rag.store.store_config import HeadCompression, StoreConfig
from redknot_rag.store.threads import one_intra_op_thread
from redknot_rag.store.tiers import (
    BlockKey,
    ChunkBlocks,
    ChunkShape,
    ColdTier,
    EncodedBlock,
    HostBlock,
    KVBlock,
    MemoryTier,
    TierUnavailableError,
)

log = logging.getLogger(__name__)

_META_CACHE = 1 << 16
_STATS_EVERY_S = 10.0
_DEFAULT = object()  # put(heads=...) not given: use the config's

Block = tuple[int, int]  # (layer, kv_head)


@dataclass(frozen=True)
class ChunkKV:
    """Requested blocks of one chunk: `k`, `v` `[L', H', T, D]` for `layers` × `heads`, pre-RoPE K."""

    k: torch.Tensor
    v: torch.Tensor
    num_tokens: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]


class ChunkKVStore:
    """Chunk KV store: `put` K, V `[L, H, T, D]`; read any subset of (layer, head) blocks.

    `memory_budget_bytes` / `disk_budget_bytes` override `config.host_bytes` / `config.disk_bytes`.
    `device` is where the host tier keeps blocks ("cpu" is pinned when CUDA is present). `cold`
    replaces the default `DiskTier(root, ...)` as the first cold tier (e.g. a RedisTier only);
    `redis` (or `config.redis_url`) adds a shared Redis tier below disk.
    """

    def __init__(
        self,
        root: Path | str,
        fingerprint: KVFingerprint,
        memory_budget_bytes: int | None = None,
        disk_budget_bytes: int | None = None,
        device: torch.device | str = "cpu",
        cold: ColdTier | None = None,
        *,
        config: StoreConfig | None = None,
        redis: ColdTier | None = None,
    ) -> None:
        cfg = config or StoreConfig()
        if memory_budget_bytes is not None:
            cfg = dataclasses.replace(cfg, host_bytes=memory_budget_bytes)
        if disk_budget_bytes is not None:
            cfg = dataclasses.replace(cfg, disk_bytes=disk_budget_bytes)
        self.config = cfg
        self.fingerprint = fingerprint
        self.dtype = dtype_from_name(cfg.dtype or fingerprint.dtype)  # storage dtype
        self.out_dtype = fingerprint.torch_dtype  # what `get` returns: the producer's dtype
        self.codec = cfg.codec
        self.device = torch.device(device)
        self.memory = MemoryTier(cfg.host_bytes, self.device)
        if redis is None and cfg.redis_url:
            from redknot_rag.store.redis_tier import RedisTier

            redis = RedisTier.from_url(cfg.redis_url, fingerprint)
        below: list[ColdTier] = [redis] if redis is not None and redis is not cold else []
        first: ColdTier = (
            cold
            if cold is not None
            else DiskTier(
                Path(root),
                fingerprint,
                cfg.disk_bytes,
                demote=self._demote if below else None,
                read_depth=cfg.disk_read_depth,
                read_piece_bytes=cfg.disk_read_piece_bytes,
                direct_io=cfg.disk_direct_io,
            )
        )
        self.tiers: list[ColdTier] = [first, *below]
        self.cold = first
        self._lock = threading.Lock()
        self._classes: dict[str, Counter[HeadClass]] = {}  # chunk -> blocks per head class (of `_metas`)
        self._metas: OrderedDict[str, ChunkMeta] = OrderedDict()  # recently used chunks, bounded
        self._counts = Counters()
        self._prefetcher: Prefetcher | None = None
        self._filler: ThreadPoolExecutor | None = None  # background Redis -> disk copies
        self._fills: set[str] = set()  # chunks being copied
        self._stats_saved_at = time.monotonic()
        self._stats_path = first.ns / "stats.json" if isinstance(first, DiskTier) else None

    # -- write ------------------------------------------------------------------------------

    def put(
        self,
        chunk_key: str,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        keep_in_memory: bool = True,
        heads: HeadCompression | None | object = _DEFAULT,
    ) -> int:
        """Commit a chunk: K, V `[L, H, T, D]` in the fingerprint's dtype (K pre-RoPE). Returns the bytes
        of KV written (the blocks as stored: storage dtype, codec, local-head windows; 0 if not written).

        Stored in the storage dtype and cold codec; `heads` (default: the config's) keeps only the
        tail window of local heads. Durable when this returns (unless the only cold tier is an
        unreachable Redis: then a log line, and the chunk is a miss later). `keep_in_memory=False`
        (bulk ingest) leaves the host tier as is.
        """
        if k.shape != v.shape or k.dim() != 4 or k.numel() == 0:
            raise ValueError(f"K, V must be equal non-empty [L, H, T, D], got {tuple(k.shape)}, {tuple(v.shape)}")
        if k.dtype != self.out_dtype or v.dtype != self.out_dtype:
            raise ValueError(f"store fingerprint is {self.fingerprint.dtype}, got K {k.dtype}, V {v.dtype}")
        hc = self.config.heads if heads is _DEFAULT else heads
        L, H, T, D = k.shape
        if hc is not None:
            assert isinstance(hc, HeadCompression)
            if (hc.num_layers, hc.num_kv_heads) != (L, H):
                raise ValueError(f"head classes are {hc.num_layers}x{hc.num_kv_heads}, the chunk has {L}x{H} heads")
        k, v = k.detach().cpu(), v.detach().cpu()
        metas: list[BlockMeta] = []
        payloads: list[Payload] = []
        for layer in range(L):
            for head in range(H):
                start, n = hc.token_range(layer, head, T) if isinstance(hc, HeadCompression) else (0, T)
                cls = hc.head_class(layer, head) if isinstance(hc, HeadCompression) else HeadClass.UNCLASSIFIED
                kb, vb = k[layer, head, start:], v[layer, head, start:]  # [n, D]
                if self.codec == Codec.RAW:
                    kb, vb = kb.to(self.dtype).contiguous(), vb.to(self.dtype).contiguous()
                # INT8/INT4 quantize from the producer's precision; host keeps what the cold tiers decode to
                codec = self.codec
                try:
                    payload = encode_block(kb, vb, codec)
                except CodecUnsupportedError:  # INT4 cannot hold this block (head_dim, f16 range): INT8
                    codec = Codec.INT8
                    payload = encode_block(kb, vb, codec)
                bm = BlockMeta(start, n, codec, cls)
                metas.append(bm)
                payloads.append(payload)
                self._counts.add(f"stored.{cls.label}", len(payload))
        meta = ChunkMeta(chunk_key, L, H, T, D, _dtype_str(self.dtype), tuple(metas))
        self._drop_memory(chunk_key)  # the old blocks (if any) are superseded
        if not self._write(0, meta, payloads):
            return 0
        if self.config.redis_write_through:
            for i in range(1, len(self.tiers)):
                self._write(i, meta, payloads)
        self._remember(meta)
        if keep_in_memory:
            decoded = self._decode(meta, dict(zip(meta.every_block(), payloads, strict=True)), _Landing(False))
            self._promote(chunk_key, meta, decoded)
        self._maybe_save_stats()
        return sum(len(p) for p in payloads)

    def _write(self, i: int, meta: ChunkMeta, payloads: Sequence[Payload], durable: bool = True) -> bool:
        """put_chunk into tier i; False (and a log line) if the tier is unreachable."""
        try:
            evicted = self.tiers[i].put_chunk(meta, payloads, durable=durable)
        except TierUnavailableError as e:
            self._counts.add("tier_errors")
            log.warning("KV chunk %r not written to the %s tier: %s", meta.chunk_key, self.tiers[i].name, e)
            return False
        if i + 1 == len(self.tiers):  # the coldest tier dropped these: they are gone
            for key in evicted:
                self._drop_memory(key)
            self._counts.add("dropped", len(evicted))
        return True

    def _demote(self, meta: ChunkMeta, payloads: list[Payload]) -> None:
        """Disk evicted a chunk: move it to the tiers below unless they hold it (write-through)."""
        for i in range(1, len(self.tiers)):
            try:
                if self.tiers[i].contains_chunk(meta.chunk_key):
                    continue
            except TierUnavailableError:
                self._counts.add("tier_errors")
                continue
            if self._write(i, meta, payloads):
                self._counts.add("demotions")

    def delete(self, chunk_key: str) -> bool:
        """Remove a chunk from every tier; True if a cold tier held it."""
        self._drop_memory(chunk_key)
        existed = False
        for tier in self.tiers:
            try:
                existed |= tier.delete_chunk(chunk_key)
            except TierUnavailableError:
                self._counts.add("tier_errors")
        return existed

    def evict(
        self,
        chunk_key: str | None = None,
        layer: int | None = None,
        heads: Sequence[int] | None = None,
        target_bytes: int | None = None,
    ) -> int:
        """Drop blocks from the host tier only (they stay in the cold tiers); returns bytes freed.

        With `chunk_key`: that chunk's blocks (optionally one layer / some heads). With
        `target_bytes`: LRU blocks until the host tier holds at most that many bytes.
        Neither: everything.
        """
        if chunk_key is None and target_bytes is None:
            target_bytes = 0
        keys = None
        if chunk_key is not None:
            keys = [
                b
                for b in self.memory.chunk_blocks(chunk_key)
                if (layer is None or b.layer == layer) and (heads is None or b.head in heads)
            ]
        return self.memory.evict(keys, target_bytes)

    def _remember(self, meta: ChunkMeta) -> None:
        with self._lock:
            self._metas[meta.chunk_key] = meta
            self._metas.move_to_end(meta.chunk_key)
            self._classes.pop(meta.chunk_key, None)  # recounted from this meta when needed
            while len(self._metas) > _META_CACHE:
                old, _ = self._metas.popitem(last=False)
                self._classes.pop(old, None)

    def _drop_memory(self, chunk_key: str) -> None:
        self.memory.delete_chunk(chunk_key)
        with self._lock:
            self._metas.pop(chunk_key, None)
            self._classes.pop(chunk_key, None)

    # -- read -------------------------------------------------------------------------------

    def contains(self, chunk_key: str) -> bool:
        """Whether a chunk is committed under this fingerprint in some cold tier (no checksum pass)."""
        for tier in self.tiers:
            try:
                if tier.contains_chunk(chunk_key):
                    return True
            except TierUnavailableError:
                self._counts.add("tier_errors")
        return False

    def keys(self) -> Iterator[str]:
        """Keys of the stored chunks (each once), coldest tiers last."""
        seen: set[str] = set()
        for tier in self.tiers:
            try:
                for key in tier.chunk_keys():
                    if key not in seen:
                        seen.add(key)
                        yield key
            except TierUnavailableError:
                self._counts.add("tier_errors")

    def meta(self, chunk_key: str) -> ChunkMeta | None:
        """Geometry and per-block metadata of a stored chunk (None if no tier has it)."""
        with self._lock:
            meta = self._metas.get(chunk_key)
        if meta is not None:
            return meta
        for tier in self.tiers:
            try:
                meta = tier.meta(chunk_key)
            except CorruptChunkError as e:
                self._corrupt(chunk_key, tier, e)
                continue
            except TierUnavailableError:
                self._counts.add("tier_errors")
                continue
            if meta is not None:
                self._remember(meta)
                return meta
        return None

    def shape(self, chunk_key: str) -> ChunkShape | None:
        meta = self.meta(chunk_key)
        return None if meta is None else meta.shape

    @overload
    def get_blocks(
        self,
        chunk_key: str,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        *,
        encoded: Literal[False] = False,
    ) -> Mapping[Block, KVBlock] | None: ...
    @overload
    def get_blocks(
        self, chunk_key: str, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, *, encoded: bool
    ) -> Mapping[Block, HostBlock] | None: ...
    def get_blocks(
        self,
        chunk_key: str,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        *,
        encoded: bool = False,
    ) -> Mapping[Block, HostBlock] | None:
        """Blocks `layers` × `heads` (all if None): {(layer, head): KVBlock}, K, V `[n, D]` in the
        storage dtype on the host tier's device, with each block's token range (a local head's
        block holds only the tail window). None on a miss (absent, other fingerprint, corrupt, or a
        block no tier can serve): the caller recomputes.

        `encoded=True`: blocks the host tier keeps encoded (`decode_on="device"`) come back as they are
        (`EncodedBlock`, for a load that decodes on the device); otherwise they are decoded here.
        This is what a pool tier above the store (GPU segment cache) calls on its miss.
        """
        return self._get_blocks(chunk_key, layers, heads, encoded)

    def _get_blocks(
        self,
        chunk_key: str,
        layers: Sequence[int] | None,
        heads: Sequence[int] | None,
        encoded: bool,
        batched: _Batched | None = None,
    ) -> Mapping[Block, HostBlock] | None:
        if layers is None and heads is None:
            whole = self._host_whole(chunk_key)
            if whole is not None:
                self._counts.add("hits")
                self._maybe_save_stats()
                return whole if encoded else self._host_decoded(chunk_key, whole)
        got = self._read(chunk_key, layers, heads, batched)
        self._counts.add("hits" if got is not None else "misses")
        self._maybe_save_stats()
        if got is None:
            return None
        return got[1] if encoded else self._host_decoded(chunk_key, got[1])

    def _host_decoded(self, chunk_key: str, blocks: dict[Block, HostBlock]) -> dict[Block, KVBlock]:
        """`blocks` with every `EncodedBlock` decoded on the host (one batch per (codec, n), the same bits
        as a host-decode store's); `blocks` itself when none is encoded."""
        enc = {b: blk for b, blk in blocks.items() if isinstance(blk, EncodedBlock)}
        if not enc:
            return cast(dict[Block, KVBlock], blocks)
        meta = self.meta(chunk_key)
        if meta is None or meta.head_dim != next(iter(enc.values())).head_dim:  # evicted since: block by block
            decoded = {b: blk.decode() for b, blk in enc.items()}
        else:
            views: dict[Block, torch.Tensor | None] = {b: blk.payload for b, blk in enc.items()}
            decoded = self._decode_quantized(meta, {b: b"" for b in enc}, views)
        out: dict[Block, KVBlock] = {}
        for b, blk in blocks.items():
            out[b] = decoded[b] if isinstance(blk, EncodedBlock) else blk
        return out

    def _host_whole(self, chunk_key: str) -> ChunkBlocks | None:
        """A chunk the host tier holds whole in one group, counted as `_read` counts a host hit of every
        block (O(1) bookkeeping per chunk: the GPU load path reads 64 chunks per query)."""
        with self._lock:
            meta = self._metas.get(chunk_key)
        if meta is None:
            return None
        blocks = self.memory.chunk_group(chunk_key, meta.num_layers * meta.num_kv_heads)
        if blocks is None:
            return None
        classes = self._classes.get(chunk_key)
        if classes is None:
            classes = self._classes[chunk_key] = Counter(b.head_class for b in meta.blocks)
        self._counts.add("block_lookups", len(blocks))
        self._add_counts({f"lookups.{c.label}": n for c, n in classes.items()})
        self._add_counts({f"hits.host.{c.label}": n for c, n in classes.items()})
        return blocks

    def get(self, chunk_key: str, layer: int | None = None, heads: Sequence[int] | None = None) -> ChunkKV | None:
        """Blocks of `layer` (all if None) × `heads` (all if None) as `[L', H', T, D]` on `device`,
        in the fingerprint's dtype. None on miss, and when a requested block holds only a window.
        """
        got = self._read(chunk_key, None if layer is None else [layer], heads)
        if got is None:
            self._counts.add("misses")
            return None
        meta, held = got
        T, D = meta.num_tokens, meta.head_dim
        if any(b.token_start != 0 or b.num_tokens != T for b in held.values()):
            self._counts.add("partial_misses")
            self._counts.add("misses")
            return None
        blocks = self._host_decoded(chunk_key, held)
        want = list(blocks)  # layer-major, in request order
        layers = tuple(dict.fromkeys(b[0] for b in want))
        hs = tuple(dict.fromkeys(b[1] for b in want))
        k = torch.stack([blocks[b].k.to(self.device, self.out_dtype) for b in want]).view(len(layers), len(hs), T, D)
        v = torch.stack([blocks[b].v.to(self.device, self.out_dtype) for b in want]).view(len(layers), len(hs), T, D)
        self._counts.add("hits")
        self._maybe_save_stats()
        return ChunkKV(k, v, T, layers, hs)

    def get_block(self, chunk_key: str, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K, V `[T, D]` of one (layer, kv_head) block; reads only that block on a host miss."""
        got = self.get(chunk_key, layer, [head])
        return None if got is None else (got.k[0, 0], got.v[0, 0])

    def prefetch(
        self,
        chunk_keys: Sequence[str],
        layers: Sequence[int] | None = None,
        heads: Callable[[str, int], Sequence[int] | None] | None = None,
    ) -> Prefetch:
        """Start loading blocks on a background thread, layer-major: all chunks' layer 0, then layer 1...

        `heads(chunk_key, layer)` picks the heads to load (None: all), so a layer never waits for a
        block it does not read. Returns a handle with one future per (chunk, layer) resolving to
        `get_blocks`' answer for that layer. Loaded blocks also land in the host tier.
        """
        if self._prefetcher is None:
            with self._lock:
                if self._prefetcher is None:
                    self._prefetcher = Prefetcher(self)
        return self._prefetcher.submit(chunk_keys, layers, heads)

    def _read(
        self,
        chunk_key: str,
        layers: Sequence[int] | None,
        heads: Sequence[int] | None,
        batched: _Batched | None = None,
    ) -> tuple[ChunkMeta, dict[Block, HostBlock]] | None:
        """Host tier first, then each cold tier for what is still missing; promotes what it reads.
        `batched`: the first cold tier's answer comes from a read of many chunks (`_read_batch`)."""
        meta = self.meta(chunk_key)
        if meta is None:
            return None
        ls = tuple(range(meta.num_layers)) if layers is None else tuple(layers)
        hs = tuple(range(meta.num_kv_heads)) if heads is None else tuple(heads)
        for li in ls:
            if not 0 <= li < meta.num_layers:
                raise IndexError(f"layer {li} outside [0, {meta.num_layers})")
        for h in hs:
            if not 0 <= h < meta.num_kv_heads:
                raise IndexError(f"kv head {h} outside [0, {meta.num_kv_heads})")
        want = [(li, h) for li in ls for h in hs]
        H = meta.num_kv_heads
        lookups = Counter(meta.blocks[li * H + h].head_class for li, h in want)
        held = self.memory.get_many([BlockKey(chunk_key, li, h) for li, h in want])
        blocks: dict[Block, HostBlock] = {b: got for b, got in zip(want, held, strict=True) if got is not None}
        host_hits = Counter(got.head_class for got in blocks.values())
        self._counts.add("block_lookups", len(want))
        self._add_counts({f"lookups.{c.label}": n for c, n in lookups.items()})
        self._add_counts({f"hits.host.{c.label}": n for c, n in host_hits.items()})
        missing = [b for b in want if b not in blocks]
        num_absent = 0  # tiers that answered "no such chunk"
        for i, tier in enumerate(self.tiers):
            if not missing:
                break
            try:
                if i == 0 and batched is not None:
                    landing, found = batched.landing, batched.answer(missing)
                else:
                    landing = _Landing(self.memory.pin)
                    found = tier.get_payloads(chunk_key, missing, alloc=landing)
            except CorruptChunkError as e:
                self._corrupt(chunk_key, tier, e)
                continue
            except TierUnavailableError:
                self._counts.add("tier_errors")
                continue
            if found is None:
                num_absent += 1
                continue
            tmeta, payloads = found
            if (tmeta.num_layers, tmeta.num_kv_heads, tmeta.num_tokens, tmeta.head_dim) != (
                meta.num_layers,
                meta.num_kv_heads,
                meta.num_tokens,
                meta.head_dim,
            ):
                log.error("KV chunk %r has another geometry in the %s tier; not used", chunk_key, tier.name)
                continue
            decoded = self._decode(tmeta, payloads, landing)
            blocks.update(self._promote(chunk_key, tmeta, decoded))  # promotion into host memory
            tier_hits = Counter(tmeta.blocks[li * H + h].head_class for li, h in payloads)
            self._add_counts({f"hits.{tier.name}.{c.label}": n for c, n in tier_hits.items()})
            self._counts.add("promotions", len(payloads))
            if i > 0 and payloads and self.config.promote_to_disk:
                self._schedule_fill(chunk_key, i)
            missing = [b for b in want if b not in blocks]
        if missing:
            self._counts.add("block_misses", len(missing))
            if num_absent == len(self.tiers):  # deleted or evicted everywhere (maybe by another process)
                self._drop_memory(chunk_key)
            return None
        return meta, {b: blocks[b] for b in want}

    def _add_counts(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self._counts.add(name, n)

    def _decode(self, meta: ChunkMeta, payloads: dict[Block, Payload], landing: _Landing) -> Mapping[Block, HostBlock]:
        """Crc-verified payloads -> blocks in the storage dtype, all in one host buffer (pinned on a
        CUDA host), so the pool loads the chunk in a few large copies.

        RAW payloads already in `landing`'s buffer in the storage dtype become views of it (no copy);
        `decode_on="device"` keeps INT8/INT4 payloads encoded (`_keep_encoded`); otherwise every block
        is decoded into one fresh buffer `[sum of 2·n·D]`.
        """
        D, src_dtype = meta.head_dim, meta.torch_dtype
        views = {b: landing.view(p) for b, p in payloads.items()}
        if src_dtype == self.dtype and all(
            meta.block(*b).codec == Codec.RAW and t is not None for b, t in views.items()
        ):
            out: dict[Block, HostBlock] = {}
            for b, t in views.items():
                bm = meta.block(*b)
                assert t is not None
                kv = t.view(self.dtype).view(2, bm.num_tokens, D)  # [2, n, D]: K then V
                out[b] = KVBlock(kv[0], kv[1], bm.token_start, bm.head_class)
            return out
        if all(meta.block(*b).codec in (Codec.INT8, Codec.INT4) for b in payloads):
            if self.config.decode_on == "device":
                return self._keep_encoded(meta, payloads, views)
            return self._decode_quantized(meta, payloads, views)
        sizes = {b: 2 * meta.block(*b).num_tokens * D for b in payloads}
        buf = torch.empty(sum(sizes.values()), dtype=self.dtype, pin_memory=self.memory.pin)
        out, pos = {}, 0
        for b, p in payloads.items():
            bm = meta.block(*b)
            kv = buf[pos : pos + sizes[b]].view(2, bm.num_tokens, D)  # [2, n, D]
            pos += sizes[b]
            k, v = decode_block(p, bm, D, src_dtype)
            kv[0].copy_(k)
            kv[1].copy_(v)
            out[b] = KVBlock(kv[0], kv[1], bm.token_start, bm.head_class)
        return out

    def _decode_quantized(
        self, meta: ChunkMeta, payloads: dict[Block, Payload], views: dict[Block, torch.Tensor | None]
    ) -> dict[Block, KVBlock]:
        """INT8/INT4 blocks decoded in batches of equal (codec, token count) (a chunk has about two:
        global heads' T and local heads' window; INT4 chunks may hold INT8 fallbacks): O(groups)
        tensor ops, not O(blocks). Same arithmetic as `decode_block`, so the same bits.

        Layout invariant: the blocks lie in ONE fresh buffer in (layer, head) order, each `[2, n, D]`
        (K rows then V rows), back to back, so a layer's blocks are one contiguous range (a GPU load
        moves a chunk, or a layer group of it, in one copy: `store.layer_load`)."""
        D = meta.head_dim
        order = sorted(payloads)  # (layer, head)
        rows = [2 * meta.block(*b).num_tokens for b in order]
        first_row = dict(zip(order, itertools.accumulate([0, *rows[:-1]]), strict=True))  # block -> first row
        groups: dict[tuple[Codec, int], list[Block]] = {}
        for b in order:
            bm = meta.block(*b)
            groups.setdefault((bm.codec, bm.num_tokens), []).append(b)
        buf = torch.empty(sum(rows) * D, dtype=self.dtype, pin_memory=self.memory.pin)
        buf_rows = buf.view(-1, D)  # [sum 2·n, D]
        src = meta.torch_dtype  # decode_block's rounding, then the storage dtype (a no-op when equal)
        for (codec, n), group in groups.items():
            raw = []
            for b in group:
                t = views[b]
                raw.append(t if t is not None else torch.frombuffer(bytearray(payloads[b]), dtype=torch.uint8))
            u8 = torch.stack(raw)  # [G, payload bytes]
            if codec == Codec.INT4:
                k, v = decode_int4_batch(u8, n, D)  # f32 [G, n, D] each
            else:  # INT8 `[G, 4·D + 4·n + 2·n·D]`: K scales, V scales, K, V (codec.py)
                ks = u8[:, : 4 * D].view(torch.float32)  # [G, D]
                vs = u8[:, 4 * D : 4 * (D + n)].view(torch.float32)  # [G, n]
                q = u8[:, 4 * (D + n) :].view(torch.int8).view(len(group), 2, n, D)  # [G, 2, n, D]
                k = q[:, 0].float() * ks[:, None, :]
                v = q[:, 1].float() * vs[:, :, None]
            starts = torch.tensor([first_row[b] for b in group])  # [G]
            k_idx = (starts[:, None] + torch.arange(n)[None, :]).reshape(-1)  # [G·n] buffer rows of K
            buf_rows.index_copy_(0, k_idx, k.to(src).to(self.dtype).reshape(-1, D))
            buf_rows.index_copy_(0, k_idx + n, v.to(src).to(self.dtype).reshape(-1, D))  # V follows K
        out: dict[Block, KVBlock] = {}
        for b in order:
            bm = meta.block(*b)
            r0, n = first_row[b], bm.num_tokens
            out[b] = KVBlock(buf_rows[r0 : r0 + n], buf_rows[r0 + n : r0 + 2 * n], bm.token_start, bm.head_class)
        return out

    def _keep_encoded(
        self, meta: ChunkMeta, payloads: dict[Block, Payload], views: dict[Block, torch.Tensor | None]
    ) -> dict[Block, HostBlock]:
        """INT8/INT4 payloads kept as they are (`EncodedBlock`), in one host buffer in (layer, head) order:
        `landing`'s when every payload lies in it in that order back to back (a cold read), else a fresh
        one (pinned on a CUDA host) they are copied into, so a GPU load moves a layer in one copy."""
        order = sorted(payloads)
        D, src = meta.head_dim, meta.torch_dtype
        landed = [views[b] for b in order]
        if _back_to_back(landed):
            got = cast(list[torch.Tensor], landed)
        else:
            buf = torch.empty(sum(len(payloads[b]) for b in order), dtype=torch.uint8, pin_memory=self.memory.pin)
            got, pos = [], 0
            for b, t in zip(order, landed, strict=True):
                n = len(payloads[b])
                got.append(buf[pos : pos + n])
                got[-1].copy_(t if t is not None else torch.frombuffer(bytearray(payloads[b]), dtype=torch.uint8))
                pos += n
        return {b: EncodedBlock(t, meta.block(*b), D, src, self.dtype) for b, t in zip(order, got, strict=True)}

    def _promote(self, chunk_key: str, meta: ChunkMeta, blocks: Mapping[Block, HostBlock]) -> Mapping[Block, HostBlock]:
        """Put blocks into the host tier (as one group when they share a buffer); returns the held
        blocks (the given ones where the tier kept none)."""
        items = [(BlockKey(chunk_key, *b), blk) for b, blk in blocks.items()]
        if self.memory.put_group(items) is not None:
            return blocks
        out: dict[Block, HostBlock] = {}
        for (key, blk), b in zip(items, blocks, strict=True):
            placed = self.memory.put(key, blk)
            out[b] = placed or blk
        return out

    def get_blocks_many(
        self, chunk_keys: Sequence[str], workers: int = 8, *, encoded: bool = False
    ) -> Generator[tuple[str, Mapping[Block, HostBlock] | None], None, None]:
        """`(key, get_blocks(key, encoded=encoded))` for every key, in order, read by up to `workers` threads at once
        (disk reads, checksums and Redis replies overlap; the GIL is released in file reads and
        crc32c). The next chunks are already being read while the caller consumes one. Chunks whose
        every block is in host memory are served in the caller's thread when their turn comes (a
        thread would only add hand-over cost to a dictionary lookup)."""
        keys = list(chunk_keys)
        cold = list(dict.fromkeys(k for k in keys if not self._in_memory(k)))
        if workers <= 1 or len(cold) <= 1:
            for key in keys:
                yield key, self.get_blocks(key, encoded=encoded)
            return
        batch = self._can_batch(cold)
        with ThreadPoolExecutor(
            max_workers=min(workers, len(cold)) + (self.config.redis_streams if batch is not None else 0),
            thread_name_prefix="kv-read",
            initializer=one_intra_op_thread,
        ) as pool:
            answers = self._read_batch(batch, pool) if batch is not None else {}
            futures = {key: pool.submit(self._get_blocks, key, None, None, encoded, answers.get(key)) for key in cold}
            try:
                for key in keys:
                    fut = futures.get(key)
                    yield key, fut.result() if fut is not None else self.get_blocks(key, encoded=encoded)
            finally:
                for fut in futures.values():
                    fut.cancel()
                for answer in answers.values():  # a reader stopped early: its chunks' readers give up
                    answer.cancel()

    def _can_batch(self, cold: list[str]) -> tuple[ColdTier, list[tuple[str, ChunkMeta]]] | None:
        """Whether (and which of) `cold` are read in one round trip: the store's only cold tier reads many
        chunks at once (Redis: `get_payloads_many`) and `config.redis_pipeline`; the chunks whose meta is
        known (the unknown ones asked for in one more round trip). None: one read per chunk."""
        tier = self.tiers[0]
        if len(self.tiers) != 1 or not self.config.redis_pipeline or not hasattr(tier, "get_payloads_many"):
            return None
        with self._lock:
            metas = {k: self._metas.get(k) for k in cold}
        unknown = [k for k, m in metas.items() if m is None]
        if unknown:
            try:
                for key, meta in zip(unknown, tier.metas(unknown), strict=True):  # type: ignore[attr-defined]
                    if meta is not None:
                        self._remember(meta)
                        metas[key] = meta
            except TierUnavailableError:
                return None  # each chunk's own read counts the error and misses
        known = [(k, m) for k, m in metas.items() if m is not None]
        return (tier, known) if len(known) > 1 else None

    def _read_batch(
        self, batch: tuple[ColdTier, list[tuple[str, ChunkMeta]]], pool: ThreadPoolExecutor
    ) -> dict[str, _Batched]:
        """Start the reads of every block of the chunks of `batch` on `pool`: `config.redis_streams`
        connections, each ONE round trip for its share of the chunks (every `redis_streams`-th one), so
        the replies arrive side by side; returns each chunk's `_Batched` answer, resolved as its reply
        reaches it (later chunks are still arriving while the first ones are decoded and promoted)."""
        tier, chunks = batch
        answers = {key: _Batched(_Landing(self.memory.pin)) for key, _ in chunks}
        requests = [(key, meta.every_block(), answers[key].landing) for key, meta in chunks]
        streams = max(1, min(self.config.redis_streams, len(requests)))

        def read(part: list[tuple[str, list[Block], _Landing]]) -> None:
            try:
                for key, got in tier.get_payloads_many(part):  # type: ignore[attr-defined]
                    answers[key].set(got)
            except BaseException as e:  # the chunks without an answer yet fail as one read would
                for key, _, _ in part:
                    answers[key].fail(e if isinstance(e, TierUnavailableError) else TierUnavailableError(str(e)))
            finally:
                for key, _, _ in part:
                    answers[key].fail(TierUnavailableError("the batched read ended without this chunk"))

        for i in range(streams):  # chunk j on stream j % streams: the first chunks arrive side by side
            pool.submit(read, requests[i::streams])
        return answers

    def _in_memory(self, chunk_key: str) -> bool:
        """Whether the host tier holds every block of a chunk whose meta is known (no tier is asked)."""
        with self._lock:
            meta = self._metas.get(chunk_key)
        return meta is not None and self.memory.num_chunk_blocks(chunk_key) == meta.num_layers * meta.num_kv_heads

    def _schedule_fill(self, chunk_key: str, i: int) -> None:
        """Copy a chunk from tier i into the tiers above it, off the read path (once per chunk at a time)."""
        with self._lock:
            if chunk_key in self._fills:
                return
            self._fills.add(chunk_key)
            if self._filler is None:
                self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-fill")
            filler = self._filler
        filler.submit(self._fill, chunk_key, i)

    def _fill(self, chunk_key: str, i: int) -> None:
        try:
            meta = self.tiers[i].meta(chunk_key)
            if meta is None:
                return
            found = self.tiers[i].get_payloads(chunk_key, meta.every_block())
            if found is None or len(found[1]) != len(meta.blocks):
                return  # Redis evicted part of it: nothing whole to copy
            payloads = [found[1][b] for b in meta.every_block()]
            for j in range(i):
                if self._write(j, found[0], payloads, durable=False):
                    self._counts.add("promotions")
        except (CorruptChunkError, TierUnavailableError):
            return
        except Exception:  # a background fill must never take the store down; the chunk stays where it was
            log.exception("copying KV chunk %r up from the %s tier failed", chunk_key, self.tiers[i].name)
        finally:
            with self._lock:
                self._fills.discard(chunk_key)

    def wait_fills(self) -> None:
        """Wait until the background copies of chunks into warmer cold tiers (Redis -> disk) are done."""
        filler = self._filler
        if filler is not None:
            filler.submit(lambda: None).result()

    def _corrupt(self, chunk_key: str, tier: ColdTier, err: Exception) -> None:
        log.error("KV chunk %r failed validation in the %s tier and was dropped: %s", chunk_key, tier.name, err)
        self._drop_memory(chunk_key)
        self._counts.add("corrupt")

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        c = self._counts.snapshot()
        host = TierStats(
            "host",
            self.memory.nbytes,
            self.memory.budget_bytes,
            len(self.memory),
            _hits(c, "host"),
            self.memory.num_evictions,
        )
        cold = [
            TierStats(
                t.name,
                t.nbytes,
                getattr(t, "budget_bytes", None),
                t.num_chunks,
                _hits(c, t.name),
                getattr(t, "num_evictions", 0),
            )
            for t in self.tiers
        ]
        classes = [h.label for h in HeadClass]
        return StoreStats(
            tiers=(host, *cold),
            hits=c["hits"],
            misses=c["misses"],
            block_lookups=c["block_lookups"],
            block_misses=c["block_misses"],
            corrupt=c["corrupt"],
            tier_errors=c["tier_errors"],
            partial_misses=c["partial_misses"],
            promotions=c["promotions"],
            demotions=c["demotions"],
            dropped=c["dropped"],
            class_stored_bytes={h: c[f"stored.{h}"] for h in classes if c[f"stored.{h}"]},
            class_block_lookups={h: c[f"lookups.{h}"] for h in classes if c[f"lookups.{h}"]},
            class_block_hits={k.removeprefix("hits."): n for k, n in sorted(c.items()) if k.startswith("hits.") and n},
        )

    def _maybe_save_stats(self, force: bool = False) -> None:
        """Persist counters next to the disk tier (for `redknot store stats`), at most every 10 s."""
        now = time.monotonic()
        if self._stats_path is None or (not force and now - self._stats_saved_at < _STATS_EVERY_S):
            return
        self._stats_saved_at = now
        try:
            save_stats(self._stats_path, self.stats())
        except OSError as e:
            log.warning("could not save KV store stats: %s", e)

    def close(self) -> None:
        """Stop the prefetch and fill threads and persist the counters."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown()
            self._prefetcher = None
        if self._filler is not None:
            self._filler.shutdown(wait=True)
            self._filler = None
        for tier in self.tiers:
            if isinstance(tier, DiskTier):
                tier.close()
        self._maybe_save_stats(force=True)


class _Batched:
    """One chunk's answer from a read of many chunks (`ChunkKVStore._read_batch`): what `get_payloads`
    would return (or raise) for every block of the chunk, landed in `landing`."""

    def __init__(self, landing: _Landing) -> None:
        self.landing = landing
        self._future: Future[tuple[ChunkMeta, dict[Block, Payload]] | None] = Future()

    def set(self, got: tuple[ChunkMeta, dict[Block, Payload]] | None | Exception) -> None:
        if isinstance(got, Exception):
            self.fail(got)
        elif not self._future.done():
            self._future.set_result(got)

    def fail(self, e: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(e)

    def cancel(self) -> None:
        self.fail(TierUnavailableError("the read was abandoned"))

    def answer(self, blocks: Sequence[Block]) -> tuple[ChunkMeta, dict[Block, Payload]] | None:
        """The payloads of `blocks` (the ones the host tier lacks), after the reply reached this chunk."""
        got = self._future.result()
        if got is None:
            return None
        meta, payloads = got
        return meta, {b: payloads[b] for b in blocks if b in payloads}


class _Landing:
    """The host buffer one cold read lands in (pinned on a CUDA host): `alloc` for `get_payloads`."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buf: torch.Tensor | None = None  # uint8 [nbytes]

    def __call__(self, nbytes: int) -> memoryview:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self._base = self.buf.data_ptr()
        return memoryview(self.buf.numpy())  # type: ignore[arg-type]  # ndarray is a buffer

    def view(self, payload: Payload) -> torch.Tensor | None:
        """`payload`'s bytes as a slice of the buffer (uint8), or None when it does not lie in it."""
        if self.buf is None or not isinstance(payload, memoryview) or payload.readonly or payload.nbytes == 0:
            return None
        off = ctypes.addressof(ctypes.c_char.from_buffer(payload)) - self._base
        if off < 0 or off + payload.nbytes > self.buf.numel():
            return None
        return self.buf[off : off + payload.nbytes]


def _back_to_back(ts: Sequence[torch.Tensor | None]) -> bool:
    """Whether every tensor is given and each starts where the previous ends (uint8 views of one buffer)."""
    if not all(t is not None for t in ts):
        return False
    return all(a.data_ptr() + a.nbytes == b.data_ptr() for a, b in itertools.pairwise(ts))  # type: ignore[union-attr]


def _hits(c: dict[str, int], tier: str) -> int:
    prefix = f"hits.{tier}."
    return sum(n for k, n in c.items() if k.startswith(prefix))


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
