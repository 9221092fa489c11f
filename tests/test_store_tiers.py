"""Store v2: storage dtype, head-aware compression, int8 cold codec, tier chain, prefetch, stats."""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from redknot_rag.store import (
    BlockKey,
    ChunkKVStore,
    Codec,
    HeadClass,
    HeadCompression,
    KVBlock,
    KVFingerprint,
    StoreConfig,
    hash_token_ids,
)
from redknot_rag.store.blockfile import read_header
from redknot_rag.store.disk import DiskTier, key_hash

fakeredis = pytest.importorskip("fakeredis")

from redknot_rag.store.redis_tier import RedisTier  # noqa: E402

L, H, T, D = 3, 4, 10, 16
WINDOW = 4
# layer-major [L, H]: 0 = local (tail window only), 1 = global
CLASSES = [[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]]
NUM_LOCAL = sum(row.count(0) for row in CLASSES)  # 5


def fp(dtype: str = "float32") -> KVFingerprint:
    return KVFingerprint("w", "t", hash_token_ids([1, 2]), dtype, "")


def kv(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, H, T, D, generator=g)
    k[:, :, :, 3] *= 20  # an outlier channel, as real K has
    return k.to(dtype), torch.randn(L, H, T, D, generator=g).to(dtype)


def disk_of(store: ChunkKVStore) -> DiskTier:
    assert isinstance(store.cold, DiskTier)
    return store.cold


def file_size(store: ChunkKVStore, key: str) -> int:
    return disk_of(store)._path(key_hash(key)).stat().st_size


def test_storage_dtype_bf16_from_fp32_producer(tmp_path: Path) -> None:
    k, v = kv(0)
    dense = ChunkKVStore(tmp_path / "a", fp(), 1 << 20)
    dense.put("c", k, v)
    store = ChunkKVStore(tmp_path / "b", fp(), 1 << 20, config=StoreConfig(dtype="bfloat16"))
    store.put("c", k, v)
    for s in (store, ChunkKVStore(tmp_path / "b", fp(), 0, config=StoreConfig(dtype="bfloat16"))):  # host, disk
        got = s.get("c")
        assert got is not None and got.k.dtype == torch.float32  # `get` returns the producer's dtype
        assert torch.equal(got.k, k.bfloat16().float()) and torch.equal(got.v, v.bfloat16().float())
    blocks = store.get_blocks("c", [1], [2])
    assert blocks is not None and blocks[(1, 2)].k.dtype == torch.bfloat16  # get_blocks: storage dtype
    assert file_size(store, "c") < 0.52 * file_size(dense, "c")


def test_head_aware_compression_stores_tail_window_of_local_heads(tmp_path: Path) -> None:
    k, v = kv(1)
    heads = HeadCompression.from_mask(torch.tensor(CLASSES), WINDOW)
    cfg = StoreConfig(heads=heads)
    store = ChunkKVStore(tmp_path, fp(), 1 << 20, config=cfg)
    store.put("c", k, v)
    for s in (store, ChunkKVStore(tmp_path, fp(), 0, config=cfg)):  # from host, from disk
        blocks = s.get_blocks("c")
        assert blocks is not None and len(blocks) == L * H
        for (layer, head), b in blocks.items():
            local = CLASSES[layer][head] == 0
            start = T - WINDOW if local else 0
            assert b.head_class == (HeadClass.LOCAL if local else HeadClass.GLOBAL)
            assert (b.token_start, b.num_tokens) == (start, T - start)
            assert torch.equal(b.k, k[layer, head, start:]) and torch.equal(b.v, v[layer, head, start:])
        assert s.get("c") is None  # whole-token tensors cannot be served from a window: a miss, never zeros
        got = s.get("c", layer=1, heads=[2, 3])  # global heads only: served whole
        assert got is not None and torch.equal(got.k, k[1:2, 2:4])
    st = store.stats()
    assert st.partial_misses == 1 and st.class_stored_bytes["local"] == NUM_LOCAL * 2 * WINDOW * D * 4
    assert st.class_stored_bytes["global"] == (L * H - NUM_LOCAL) * 2 * T * D * 4
    meta = store.meta("c")
    assert meta is not None and meta.block(0, 1).num_tokens == WINDOW
    # a chunk shorter than the window keeps every token of its local heads
    short = (k[:, :, :3].contiguous(), v[:, :, :3].contiguous())
    store.put("short", *short)
    got = store.get("short")
    assert got is not None and torch.equal(got.k, short[0])
    with pytest.raises(ValueError, match="head classes"):
        store.put("bad", *kv(2), heads=HeadCompression.from_mask([[0, 1]], WINDOW))


def test_int8_cold_codec_within_stated_error_and_same_bits_from_every_tier(tmp_path: Path) -> None:
    k, v = kv(3)
    cfg = StoreConfig(dtype="bfloat16", cold_codec="int8")
    store = ChunkKVStore(tmp_path, fp(), 1 << 20, config=cfg)
    store.put("c", k, v)
    hot = store.get_blocks("c")
    cold = ChunkKVStore(tmp_path, fp(), 1 << 20, config=cfg).get_blocks("c")
    assert hot is not None and cold is not None
    for b in hot:  # host memory holds what the cold tier decodes to
        assert torch.equal(hot[b].k, cold[b].k) and torch.equal(hot[b].v, cold[b].v)
    eps = 2.0**-8  # bf16 rounding of the dequantized value
    for (layer, head), blk in cold.items():
        kx, vx = k[layer, head], v[layer, head]
        k_scale = kx.abs().amax(dim=0, keepdim=True) / 127  # per channel
        v_scale = vx.abs().amax(dim=1, keepdim=True) / 127  # per token
        kd, vd = blk.k.float(), blk.v.float()
        assert ((kd - kx).abs() <= k_scale / 2 * 1.0001 + kd.abs() * eps).all()
        assert ((vd - vx).abs() <= v_scale / 2 * 1.0001 + vd.abs() * eps).all()
    raw = ChunkKVStore(tmp_path / "raw", fp(), 0, config=StoreConfig(dtype="bfloat16"))
    raw.put("c", k, v)
    assert file_size(store, "c") < file_size(raw, "c")
    hdr_fd = os.open(disk_of(store)._path(key_hash("c")), os.O_RDONLY)
    try:
        assert all(b.codec == Codec.INT8 for b in read_header(hdr_fd).meta.blocks)
    finally:
        os.close(hdr_fd)


def chain(tmp_path: Path, client, *, disk_bytes: int | None, write_through: bool, host: int = 1 << 20, **kw):
    cfg = StoreConfig(disk_bytes=disk_bytes, redis_write_through=write_through, **kw)
    return ChunkKVStore(tmp_path, fp(), host, config=cfg, redis=RedisTier(client, fp()))


def test_demotion_and_promotion_bit_exact(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    data = {f"c{i}": kv(10 + i) for i in range(3)}
    probe = ChunkKVStore(tmp_path / "probe", fp(), 0)
    probe.put("c0", *data["c0"])
    size = probe.stats().cold_bytes
    store = chain(tmp_path / "s", client, disk_bytes=2 * size, write_through=False, host=L * H * 2 * T * D * 4)
    for key, (k, v) in data.items():
        store.put(key, k, v)
    st = store.stats()
    assert st.demotions == 1 and st.dropped == 0  # disk evicted c0 into Redis: moved, not lost
    assert not disk_of(store).contains_chunk("c0") and store.tiers[1].contains_chunk("c0")
    assert st.tier("host").items == L * H  # host holds one chunk: c2; c0, c1 were evicted from it
    assert store.contains("c0") and sorted(store.keys()) == ["c0", "c1", "c2"]
    got = store.get("c0")  # host miss, disk miss -> Redis, promoted into host and onto disk
    assert got is not None and torch.equal(got.k, data["c0"][0]) and torch.equal(got.v, data["c0"][1])
    store.wait_fills()
    st = store.stats()
    assert st.tier("redis").block_hits == L * H and disk_of(store).contains_chunk("c0")
    assert store.memory.contains(BlockKey("c0", 2, 3))
    store.evict()
    again = store.get("c0")  # now from disk
    assert again is not None and torch.equal(again.k, data["c0"][0])
    assert store.stats().tier("disk").block_hits == L * H
    for key, (k, v) in data.items():  # every chunk survives every move bit for bit
        got = store.get(key)
        assert got is not None and torch.equal(got.k, k) and torch.equal(got.v, v), key
    assert store.stats().tier("disk").nbytes <= 2 * size


def test_int8_and_windows_survive_demotion_bit_exact(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    heads = HeadCompression.from_mask(CLASSES, WINDOW)
    kw: dict = dict(dtype="bfloat16", cold_codec="int8", heads=heads)
    store = chain(tmp_path, client, disk_bytes=1, write_through=False, **kw)  # disk keeps only the newest
    store.put("a", *kv(20))
    first = store.get_blocks("a")
    store.put("b", *kv(21))  # evicts a to Redis
    store.evict()
    assert not disk_of(store).contains_chunk("a")
    moved = store.get_blocks("a")
    assert first is not None and moved is not None
    for b in first:
        assert torch.equal(first[b].k, moved[b].k) and torch.equal(first[b].v, moved[b].v)
        assert first[b].token_start == moved[b].token_start


def test_write_through_shares_chunks_between_replicas(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    a = chain(tmp_path / "a", client, disk_bytes=None, write_through=True)
    b = chain(tmp_path / "b", client, disk_bytes=None, write_through=True)
    k, v = kv(30)
    a.put("c", k, v)
    assert b.contains("c")
    got = b.get("c")  # replica b never computed it
    b.wait_fills()
    assert got is not None and torch.equal(got.k, k) and disk_of(b).contains_chunk("c")


def corrupt_block(path: Path, layer: int, head: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        hdr = read_header(fd)
        off = hdr.offsets[hdr.block_index(layer, head)] + 7
        os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0x10]), off)
    finally:
        os.close(fd)


def test_corrupt_disk_block_falls_through_to_redis_never_used(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    store = chain(tmp_path, client, disk_bytes=None, write_through=True, host=0)
    k, v = kv(40)
    store.put("c", k, v)
    corrupt_block(disk_of(store)._path(key_hash("c")), 1, 2)
    got = store.get("c")  # the flipped byte is detected; the good copy comes from Redis
    assert got is not None and torch.equal(got.k, k) and torch.equal(got.v, v)
    st = store.stats()
    assert st.corrupt == 1 and (disk_of(store).quarantine_dir / f"{key_hash('c')}.rkv").exists()
    store.wait_fills()
    assert disk_of(store).contains_chunk("c")  # ...and promoted back onto disk, whole
    assert torch.equal(ChunkKVStore(tmp_path, fp(), 0).get("c").k, k)  # type: ignore[union-attr]


def test_prefetch_layer_by_layer(tmp_path: Path) -> None:
    data = {f"c{i}": kv(50 + i) for i in range(3)}
    heads = HeadCompression.from_mask(CLASSES, WINDOW)
    store = ChunkKVStore(tmp_path, fp(), 1 << 20, config=StoreConfig(heads=heads))
    for key, (k, v) in data.items():
        store.put(key, k, v, keep_in_memory=False)
    order: list[tuple[str, int]] = []
    gate = threading.Event()
    real = store.get_blocks

    def traced(chunk_key, layers=None, heads=None):
        order.append((chunk_key, layers[0]))
        if layers[0] == 2:
            assert gate.wait(10)  # layer 2 is held back until the test has used layers 0 and 1
        return real(chunk_key, layers, heads)

    store.get_blocks = traced  # type: ignore[method-assign, assignment]

    def only_global(chunk_key: str, layer: int) -> list[int]:  # a non-last chunk: local heads not read
        return [h for h in range(H) if CLASSES[layer][h] == 1]

    pf = store.prefetch(["c0", "c1", "c2", "missing"], heads=only_global)
    assert pf.layers == (0, 1, 2)
    for layer in (0, 1):
        got = pf.wait_layer(layer, timeout=10)
        assert got["missing"] is None
        for key in ("c0", "c1", "c2"):
            blocks = got[key]
            assert blocks is not None and sorted(blocks) == only_global(key, layer)
            for h, b in blocks.items():
                assert torch.equal(b.k, data[key][0][layer, h]) and b.token_start == 0
    assert not pf.future("c0", 2).done()  # layer 2 did not block layers 0 and 1
    gate.set()
    assert pf.wait_layer(2, timeout=10)["c2"] is not None and pf.done()
    assert order == [(key, layer) for layer in range(3) for key in ("c0", "c1", "c2", "missing")]
    store.close()


def test_old_format_is_refused_with_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ChunkKVStore(tmp_path, fp(), 0)
    store.put("c", *kv(60))
    path = disk_of(store)._path(key_hash("c"))
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 1)  # a v1 header
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert ChunkKVStore(tmp_path, fp(), 0).get("c") is None
    assert "format v1" in caplog.text and "redknot store migrate" in caplog.text
    (tmp_path / "v1-0123456789abcdef").mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ChunkKVStore(tmp_path, fp(), 0)
    assert "older format (v1)" in caplog.text


def test_stats_dict_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from redknot_rag.store.store_cli import main as store_main

    heads = HeadCompression.from_mask(CLASSES, WINDOW)
    store = ChunkKVStore(tmp_path / "kv", fp(), 1 << 20, config=StoreConfig(heads=heads))
    store.put("c", *kv(70))
    assert store.get_blocks("c", [0]) is not None and store.get_blocks("nope") is None
    d = store.stats().as_dict()
    assert d["host_block_hits"] == H and d["hits"] == 1 and d["misses"] == 1
    assert d["host_hit_rate"] == 1.0 and d["class_local_stored_bytes"] > 0 and "disk_bytes" in d
    store.close()  # persists the counters for the CLI
    assert store_main(["stats", "--data-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (ns,) = out["namespaces"]
    assert ns["chunks"] == 1 and ns["tokens"] == T and ns["disk_bytes"] == d["disk_bytes"]
    assert ns["by_class"]["local"]["blocks"] == NUM_LOCAL and ns["by_class"]["global"]["blocks"] == L * H - NUM_LOCAL
    assert ns["by_class"]["local"]["tokens"] == NUM_LOCAL * WINDOW
    assert ns["counters"]["host_block_hits"] == H


def write_v1_store(root: Path, f: KVFingerprint, chunks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """A format-v1 namespace as the v1 writer laid it out (dense blocks, zlib crc32)."""
    import dataclasses
    import zlib

    old = dataclasses.replace(f, format_version=1)
    ns = root / f"v1-{old.digest()[:32]}"
    (ns / "chunks" / "ab").mkdir(parents=True)
    (ns / "fingerprint.json").write_text(json.dumps({"digest": old.digest(), **dataclasses.asdict(old)}))
    for key, (k, v) in chunks.items():
        nl, nh, t, d = k.shape
        kb = key.encode()
        header_len = 88 + 24 * nl * nh + len(kb) + 4
        base = -(-header_len // 64) * 64
        size = 2 * t * d * k.element_size()
        step = -(-size // 64) * 64
        blocks = [
            k[layer, head].contiguous().view(torch.uint8).numpy().tobytes()
            + v[layer, head].contiguous().view(torch.uint8).numpy().tobytes()
            for layer in range(nl)
            for head in range(nh)
        ]
        head_bytes = struct.pack(
            "<8s8I16s32s",
            b"RKNOTKV\0",
            1,
            header_len,
            nl,
            nh,
            t,
            d,
            len(kb),
            0,
            b"float32".ljust(16, b"\0"),
            bytes.fromhex(old.digest()),
        )
        head_bytes += (
            b"".join(struct.pack("<QQII", base + i * step, size, zlib.crc32(b), t) for i, b in enumerate(blocks)) + kb
        )
        body = head_bytes + struct.pack("<I", zlib.crc32(head_bytes))
        body += b"\0" * (base - len(body)) + b"".join(b + b"\0" * (step - size) for b in blocks)
        (ns / "chunks" / "ab" / f"{key_hash(key)}.rkv").write_bytes(body)
    return ns


def test_migrate_v1_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from redknot_rag.store.store_cli import main as store_main

    data = {"c0": kv(80), "c1": kv(81), "bad": kv(82)}
    ns = write_v1_store(tmp_path, fp(), data)
    bad = ns / "chunks" / "ab" / f"{key_hash('bad')}.rkv"
    raw = bytearray(bad.read_bytes())
    raw[-10] ^= 0x01  # a flipped byte in the last block: that chunk is never migrated
    bad.write_bytes(bytes(raw))
    assert ChunkKVStore(tmp_path, fp(), 0).get("c0") is None  # v1 is not read as such
    assert store_main(["migrate", "--data-dir", str(tmp_path), "--store-dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chunks"] == 2 and report["skipped"] == 1
    assert report["bytes_after"] < 0.55 * report["bytes_before"]
    store = ChunkKVStore(tmp_path, fp(), 0)
    for key in ("c0", "c1"):
        got = store.get(key)
        assert got is not None and torch.equal(got.k, data[key][0].bfloat16().float())
    assert store.get("bad") is None and sorted(store.keys()) == ["c0", "c1"]


def test_store_flags_and_config_validation() -> None:
    import argparse

    from redknot_rag.store import add_store_args, store_config_from_args
    from redknot_rag.store.store_config import parse_bytes

    assert parse_bytes("4096") == 4096 and parse_bytes("256M") == 256 << 20 and parse_bytes("1.5GiB") == 3 << 29
    with pytest.raises(ValueError):
        parse_bytes("lots")
    p = argparse.ArgumentParser()
    add_store_args(p)
    args = p.parse_args(["--store-host-bytes", "1G", "--store-disk-bytes", "20G", "--store-cold-codec", "int8"])
    cfg = store_config_from_args(args)
    assert (cfg.host_bytes, cfg.disk_bytes, cfg.dtype, cfg.codec, cfg.heads) == (
        1 << 30,
        20 << 30,
        "bfloat16",
        Codec.INT8,
        None,
    )

    class Profile:
        classes, window = CLASSES, WINDOW

    args = p.parse_args(["--store-local-heads", "profile"])
    assert store_config_from_args(args, Profile()).heads == HeadCompression.from_mask(CLASSES, WINDOW)
    with pytest.raises(ValueError, match="head profile"):
        store_config_from_args(args, None)
    with pytest.raises(SystemExit):
        p.parse_args(["--store-host-bytes", "many"])
    for bad in (dict(dtype="int4"), dict(cold_codec="zstd"), dict(host_bytes=-1)):
        with pytest.raises(ValueError):
            StoreConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HeadCompression.from_mask([[0, 2]], 4)


def test_host_tier_keeps_reused_blocks_through_a_scan() -> None:
    from redknot_rag.store import MemoryTier

    blk = KVBlock(torch.zeros(8, 4), torch.zeros(8, 4))  # 256 B
    mem = MemoryTier(10 * blk.nbytes)
    hot = [BlockKey("hot", 0, h) for h in range(3)]
    for key in hot:
        mem.put(key, blk)
        assert mem.get(key) is not None  # read again: protected
    for i in range(50):  # one query's blocks alone exceed the budget five times
        mem.put(BlockKey(f"scan{i}", 0, 0), blk)
        assert mem.nbytes <= mem.budget_bytes
    assert all(mem.contains(key) for key in hot)  # a plain LRU would have flushed them
    assert not mem.contains(BlockKey("scan0", 0, 0)) and mem.contains(BlockKey("scan49", 0, 0))
    assert len(mem) == 10 and mem.evict(target_bytes=0) == 10 * blk.nbytes and len(mem) == 0


def _one_buffer(blocks: Mapping) -> bool:
    """Whether every block's K and V lie back to back in one storage (one host -> GPU copy)."""
    from redknot_rag.store.load_plan import byte_runs

    order = sorted(blocks, key=lambda lh: blocks[lh].k.data_ptr())  # host memory order, as load_plan copies
    return len(byte_runs([t for lh in order for t in (blocks[lh].k, blocks[lh].v)])) == 1


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_cold_read_lands_in_one_buffer_evicted_as_a_group(tmp_path: Path, tier: str) -> None:
    """A chunk read from disk or Redis is one host buffer (views, same bits as stored, compressed
    and int8 too); the host tier evicts it as a unit by budget, and named heads alone (the others
    keep their bits and bytes)."""
    client = fakeredis.FakeRedis()
    heads = HeadCompression.from_mask(CLASSES, WINDOW)
    for codec in ("raw", "int8"):
        cfg = StoreConfig(cold_codec=codec, heads=heads, host_bytes=1 << 20)
        cold = RedisTier(client, fp(), prefix=f"t-{codec}") if tier == "redis" else None
        store = ChunkKVStore(tmp_path / codec, fp(), config=cfg, cold=cold)
        k, v = kv(50)
        store.put("c", k, v)
        want = {lh: (b.k.clone(), b.v.clone()) for lh, b in store.get_blocks("c").items()}  # type: ignore[union-attr]
        store.evict()
        got = store.get_blocks("c")
        assert (
            got is not None
            and _one_buffer(got)
            and store.stats().tiers[0].nbytes == sum(b.nbytes for b in got.values())
        )
        assert all(torch.equal(got[lh].k, wk) and torch.equal(got[lh].v, wv) for lh, (wk, wv) in want.items())
        if codec == "raw":  # stored bits, exactly: global heads whole, local heads their tail window
            assert all(torch.equal(got[(la, h)].k, k[la, h, -got[(la, h)].num_tokens :]) for la, h in got)
        one = got[(1, 2)].nbytes
        freed = store.evict("c", layer=1, heads=[2])  # a named head alone: the group is split first
        assert freed == one and store.stats().memory_blocks == L * H - 1
        again = store.get_blocks("c")
        assert again is not None and all(torch.equal(again[lh].k, wk) for lh, (wk, _) in want.items())
        assert store.evict(target_bytes=0) > 0 and store.stats().memory_blocks == 0
        store.close()


def test_get_blocks_many_in_order_and_corruption_is_a_miss(tmp_path: Path) -> None:
    """Parallel reads return each chunk's blocks in request order, same bits as one by one; a flipped
    byte inside a multi-block read run is caught by its block's CRC-32C: that chunk misses (None),
    quarantined, never served; the others are unaffected."""
    store = ChunkKVStore(tmp_path, fp(), 1 << 20)
    data = {f"c{i}": kv(60 + i) for i in range(6)}
    for key, (k, v) in data.items():
        store.put(key, k, v, keep_in_memory=False)
    corrupt_block(disk_of(store)._path(key_hash("c3")), 2, 1)
    keys = ["c5", "c0", "absent", "c3", "c1", "c2", "c4"]
    got = list(store.get_blocks_many(keys, workers=4))
    assert [key for key, _ in got] == keys
    for key, blocks in got:
        if key in ("absent", "c3"):
            assert blocks is None
            continue
        assert blocks is not None and _one_buffer(blocks)
        k, v = data[key]
        assert all(
            isinstance(b, KVBlock) and torch.equal(b.k, k[la, h]) and torch.equal(b.v, v[la, h])
            for (la, h), b in blocks.items()
        )
    assert store.stats().corrupt == 1 and (disk_of(store).quarantine_dir / f"{key_hash('c3')}.rkv").exists()
    store.close()


def test_reader_thread_has_one_intra_op_thread() -> None:
    """A store reader thread decodes with one intra-op thread; the calling thread keeps its own count."""
    import threading

    try:  # faiss brings its own OpenMP runtime: the setting must reach torch's, not the first one loaded
        import faiss  # noqa: F401
    except ImportError:
        pass
    from redknot_rag.store.threads import _omp_set_num_threads, one_intra_op_thread

    _omp_set_num_threads.cache_clear()
    if _omp_set_num_threads() is None:
        pytest.skip("no OpenMP runtime loaded by this torch build")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def reader() -> None:
            one_intra_op_thread()
            seen.append(torch.get_num_threads())

        t = threading.Thread(target=reader)
        t.start()
        t.join()
        assert seen == [1]
        assert torch.get_num_threads() == 2  # this thread's pool is untouched
    finally:
        torch.set_num_threads(before)


def test_whole_chunk_host_hit_is_one_group_read(tmp_path: Path) -> None:
    """A chunk the host tier holds whole in one group is served by one group read (`ChunkBlocks`, the
    same object each time, so a GPU load's byte runs are derived once) with the same blocks and the
    same counters as the block-by-block read; once a head is evicted alone (the group split), reads
    go block by block again and stay exact."""
    from redknot_rag.store.tiers import ChunkBlocks

    cfg = StoreConfig(cold_codec="int8", heads=HeadCompression.from_mask(CLASSES, WINDOW), host_bytes=1 << 20)
    store = ChunkKVStore(tmp_path, fp(), config=cfg)
    k, v = kv(60)
    store.put("c", k, v)
    store.evict()
    first = store.get_blocks("c")  # from disk: decoded into one buffer, promoted as one group
    assert first is not None and not isinstance(first, ChunkBlocks)
    before = store._counts.snapshot()
    whole = store.get_blocks("c")
    after = store._counts.snapshot()
    assert isinstance(whole, ChunkBlocks) and store.get_blocks("c") is whole
    assert set(whole) == set(first) and all(
        torch.equal(whole[lh].k, first[lh].k) and torch.equal(whole[lh].v, first[lh].v) for lh in first
    )
    grew = {n: after[n] - before.get(n, 0) for n in after if after[n] != before.get(n, 0)}
    assert grew["block_lookups"] == L * H and grew["hits.host.local"] == NUM_LOCAL
    assert grew["hits.host.global"] == L * H - NUM_LOCAL and grew["hits"] == 1
    store.evict("c", layer=0, heads=[1])  # split: the group no longer holds the chunk
    again = store.get_blocks("c")
    assert again is not None and not isinstance(again, ChunkBlocks) and len(again) == L * H
    assert all(torch.equal(again[lh].k, first[lh].k) for lh in first)
    store.close()


def _block_bytes(blocks) -> dict:  # type: ignore[no-untyped-def]
    return {lh: (b.token_start, b.k.clone(), b.v.clone()) for lh, b in blocks.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[lh][0] == b[lh][0] and torch.equal(a[lh][1], b[lh][1]) and torch.equal(a[lh][2], b[lh][2]) for lh in a
    )


def _direct_allowed(where: Path) -> bool:
    """Whether the filesystem of `where` lets a file descriptor turn O_DIRECT on (as `DiskTier` does)."""
    import fcntl

    probe = where / "direct-probe"
    probe.write_bytes(b"\0" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_deep_and_direct_disk_reads_equal_the_one_pread_path(tmp_path: Path, codec: str) -> None:
    """Reads split into 4 KiB pieces by 4 threads, with and without O_DIRECT, return exactly the blocks
    of one pread per run: whole chunks, head-aware windows, and subsets of layers and heads (several
    runs, each widened to aligned ranges under direct I/O)."""
    heads = HeadCompression.from_mask(CLASSES, WINDOW)
    base: dict = dict(cold_codec=codec, heads=heads, host_bytes=1 << 20)
    ref = ChunkKVStore(tmp_path / "d", fp(), config=StoreConfig(**base, disk_read_depth=1))
    data = {f"c{i}": kv(80 + i) for i in range(3)}
    for key, (k, v) in data.items():
        ref.put(key, k, v, keep_in_memory=False)
    subsets = [(None, None), ([2, 0], [3, 1]), ([1], None), (None, [2])]
    want = {(key, i): _block_bytes(ref.get_blocks(key, *ls)) for key in data for i, ls in enumerate(subsets)}  # type: ignore[arg-type]
    ref.close()
    for direct in (False, True):
        cfg = StoreConfig(**base, disk_read_depth=4, disk_read_piece_bytes=4096, disk_direct_io=direct)
        store = ChunkKVStore(tmp_path / "d", fp(), config=cfg)  # the same files
        assert disk_of(store).reader.depth == 4
        for (key, i), blocks in want.items():
            store.evict()
            got = store.get_blocks(key, *subsets[i])  # type: ignore[arg-type]
            assert got is not None and _same(_block_bytes(got), blocks), (direct, key, i)
        store.evict()
        many = dict(store.get_blocks_many(list(data), workers=3))
        assert all(_same(_block_bytes(many[key]), want[(key, 0)]) for key in data)  # type: ignore[arg-type]
        # where the filesystem allows O_DIRECT (ext4, xfs; not tmpfs) the direct path really ran
        assert disk_of(store).direct_io == (direct and _direct_allowed(tmp_path))
        store.close()


def test_failed_disk_read_fails_the_request_clearly_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error in one piece of a deep-queue read fails that read with ChunkReadError naming the
    chunk, only after every other piece has finished (none writes into the dropped buffer later); the
    file is neither quarantined nor dropped, nothing is promoted, and the next read returns every block."""
    from redknot_rag.store import blockfile
    from redknot_rag.store.disk import ChunkReadError

    cfg = StoreConfig(host_bytes=1 << 20, disk_read_depth=4, disk_read_piece_bytes=4096, disk_direct_io=False)
    store = ChunkKVStore(tmp_path, fp(), config=cfg)
    k, v = kv(90)
    store.put("c", k, v, keep_in_memory=False)
    hdr_off = read_header(os.open(disk_of(store)._path(key_hash("c")), os.O_RDONLY)).offsets[0]
    real = os.preadv
    lock = threading.Lock()
    state = {"running": 0, "max": 0, "at_raise": -1}

    def flaky(fd: int, bufs: list, offset: int) -> int:  # type: ignore[type-arg]
        with lock:
            state["running"] += 1
            state["max"] = max(state["max"], state["running"])
        try:
            if offset == hdr_off + 4096:  # the second piece
                raise OSError(5, "Input/output error")
            threading.Event().wait(0.05)  # the other pieces are still running when it fails
            return real(fd, bufs, offset)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(blockfile.os, "preadv", flaky)
    with pytest.raises(ChunkReadError, match="'c'") as err:
        store.get_blocks("c")
    state["at_raise"] = state["running"]
    assert isinstance(err.value.__cause__, OSError) and state["at_raise"] == 0 and state["max"] > 1
    monkeypatch.setattr(blockfile.os, "preadv", real)
    assert disk_of(store)._path(key_hash("c")).exists() and not any(disk_of(store).quarantine_dir.iterdir())
    assert store.stats().corrupt == 0 and store.stats().memory_blocks == 0
    got = store.get_blocks("c")
    assert got is not None
    assert all(torch.equal(b.k, k[la, h]) and torch.equal(b.v, v[la, h]) for (la, h), b in got.items())
    store.close()


def test_direct_reads_refused_by_the_filesystem_fall_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem that takes the O_DIRECT flag but fails the reads (EINVAL): the read is redone through
    the page cache (same blocks), direct I/O is off from then on, with one log line."""
    import errno
    import fcntl

    from redknot_rag.store import blockfile

    store = ChunkKVStore(tmp_path, fp(), config=StoreConfig(host_bytes=1 << 20))  # defaults: direct, depth 8
    k, v = kv(91)
    store.put("c", k, v, keep_in_memory=False)
    real = os.preadv
    refused: list[int] = []

    def no_direct(fd: int, bufs: list, offset: int) -> int:  # type: ignore[type-arg]
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(blockfile.os, "preadv", no_direct)
    with caplog.at_level(logging.WARNING):
        got = store.get_blocks("c")
    assert refused and not disk_of(store).direct_io and "direct I/O refused" in caplog.text
    assert got is not None
    assert all(torch.equal(b.k, k[la, h]) and torch.equal(b.v, v[la, h]) for (la, h), b in got.items())
    store.close()
