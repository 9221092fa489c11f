"""ChunkKVStore on CPU: roundtrip, per-head reads, fingerprints, checksums, tiers, concurrency."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from redknot_rag.store import (
    BlockKey,
    BlockMeta,
    BlockTier,
    ChunkKVStore,
    ChunkMeta,
    Codec,
    ColdTier,
    DiskTier,
    HeadClass,
    KVBlock,
    KVFingerprint,
    MemoryTier,
    StoreConfig,
    hash_token_ids,
)
from redknot_rag.store.blockfile import read_header
from redknot_rag.store.codec import decode_block, encode_block
from redknot_rag.store.disk import key_hash

L, H, T, D = 3, 4, 7, 16


def fp(dtype: str = "float32", weights: str = "w0") -> KVFingerprint:
    return KVFingerprint(weights, "tok0", hash_token_ids([1, 2, 3]), dtype, "prof0")


def kv(seed: int, dtype: torch.dtype = torch.float32, shape=(L, H, T, D)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def chunk_path(store: ChunkKVStore, key: str) -> Path:
    assert isinstance(store.cold, DiskTier)
    return store.cold._path(key_hash(key))


def block_bytes(dtype: torch.dtype = torch.float32) -> int:
    return 2 * T * D * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    f = fp(str(dtype).removeprefix("torch."))
    k, v = kv(0, dtype)
    store = ChunkKVStore(tmp_path, f, memory_budget_bytes=1 << 20)
    store.put("doc/0", k, v)
    got = store.get("doc/0")  # from memory
    assert got is not None and got.num_tokens == T and got.k.dtype == dtype
    assert torch.equal(got.k, k) and torch.equal(got.v, v)
    cold = ChunkKVStore(tmp_path, f, memory_budget_bytes=0).get("doc/0")  # from disk
    assert cold is not None and torch.equal(cold.k, k) and torch.equal(cold.v, v)
    sub = ChunkKVStore(tmp_path, f, memory_budget_bytes=0).get("doc/0", layer=2, heads=[3, 1])
    assert sub is not None and sub.k.shape == (1, 2, T, D)
    assert torch.equal(sub.k, k[2:3, [3, 1]]) and torch.equal(sub.v, v[2:3, [3, 1]])
    blk = store.get_block("doc/0", 1, 2)
    assert blk is not None and torch.equal(blk[0], k[1, 2]) and torch.equal(blk[1], v[1, 2])


def test_single_block_read_touches_only_its_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffered: exactly the header and the block's bytes; direct I/O: the block's range widened to
    4 KiB alignment, no more."""
    k, v = kv(1)
    ChunkKVStore(tmp_path, fp(), 0).put("c", k, v)
    store = ChunkKVStore(tmp_path, fp(), 0, config=StoreConfig(host_bytes=0, disk_direct_io=False))
    direct = ChunkKVStore(tmp_path, fp(), 0, config=StoreConfig(host_bytes=0, disk_direct_io=True))
    header_len = len(read_header_bytes(chunk_path(store, "c")))
    read = {"bytes": 0}
    pread, preadv = os.pread, os.preadv

    def counting_pread(fd: int, n: int, off: int) -> bytes:
        out = pread(fd, n, off)
        read["bytes"] += len(out)
        return out

    def counting_preadv(fd: int, bufs, off: int) -> int:
        n = preadv(fd, bufs, off)
        read["bytes"] += n
        return n

    monkeypatch.setattr(os, "pread", counting_pread)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    blk = store.get_block("c", 2, 1)
    assert blk is not None and torch.equal(blk[0], k[2, 1])
    assert read["bytes"] == header_len + block_bytes()
    read["bytes"] = 0
    blk = direct.get_block("c", 2, 1)
    assert blk is not None and torch.equal(blk[0], k[2, 1])
    assert header_len + block_bytes() <= read["bytes"] <= header_len + block_bytes() + 2 * 4096


def read_header_bytes(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, read_header(fd).header_len, 0)
    finally:
        os.close(fd)


def corrupt_block(path: Path, layer: int, head: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        hdr = read_header(fd)
        off = hdr.offsets[hdr.block_index(layer, head)] + 5
        byte = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), off)
    finally:
        os.close(fd)


def test_other_block_corrupt_single_head_still_reads(tmp_path: Path) -> None:
    k, v = kv(2)
    ChunkKVStore(tmp_path, fp(), 0).put("c", k, v)
    store = ChunkKVStore(tmp_path, fp(), 0)
    corrupt_block(chunk_path(store, "c"), 0, 0)
    blk = store.get_block("c", 1, 3)  # never touches block (0, 0)
    assert blk is not None and torch.equal(blk[0], k[1, 3]) and torch.equal(blk[1], v[1, 3])
    assert store.get("c") is None  # the full read hits the bad block: a miss, never its bytes
    assert store.stats().corrupt == 1 and not store.contains("c")
    assert (store.cold.quarantine_dir / f"{key_hash('c')}.rkv").exists()  # type: ignore[attr-defined]


def test_checksum_corruption_is_a_miss(tmp_path: Path) -> None:
    k, v = kv(3)
    store = ChunkKVStore(tmp_path, fp(), 1 << 20)
    store.put("c", k, v)
    store.evict()  # memory copy gone: the next read must come from the file
    corrupt_block(chunk_path(store, "c"), 2, 3)
    assert store.get("c", layer=2) is None
    st = store.stats()
    assert st.corrupt == 1 and st.misses == 1 and not chunk_path(store, "c").exists()
    assert store.get("c") is None and not store.contains("c")


@pytest.mark.parametrize("damage", ["header", "truncate", "magic"])
def test_damaged_file_is_a_miss(tmp_path: Path, damage: str) -> None:
    k, v = kv(4)
    ChunkKVStore(tmp_path, fp(), 0).put("c", k, v)
    store = ChunkKVStore(tmp_path, fp(), 0)
    path = chunk_path(store, "c")
    data = bytearray(path.read_bytes())
    if damage == "header":
        data[100] ^= 0x01  # inside the block table
    elif damage == "magic":
        data[0] ^= 0x01
    else:
        data = data[: len(data) - 9]
    path.write_bytes(bytes(data))
    assert store.get("c") is None
    assert store.stats().corrupt == 1 and not store.contains("c")


def test_fingerprint_mismatch_is_a_miss(tmp_path: Path) -> None:
    k, v = kv(5)
    ChunkKVStore(tmp_path, fp(weights="A"), 1 << 20).put("c", k, v)
    other = ChunkKVStore(tmp_path, fp(weights="B"), 1 << 20)
    assert not other.contains("c") and other.get("c") is None and other.get_block("c", 0, 0) is None
    # a file carried into another fingerprint's namespace is still refused, from its header
    src = chunk_path(ChunkKVStore(tmp_path, fp(weights="A"), 0), "c")
    dst = chunk_path(other, "c")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    other = ChunkKVStore(tmp_path, fp(weights="B"), 1 << 20)
    assert other.contains("c")  # cheap presence check sees a file...
    assert other.get("c") is None and not other.contains("c")  # ...the read refuses and drops it
    assert ChunkKVStore(tmp_path, fp(weights="A"), 0).get("c") is not None
    assert fp(weights="A").digest() != fp(weights="B").digest() != fp(dtype="bfloat16", weights="B").digest()


def test_put_rejects_wrong_dtype_and_shape(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp("bfloat16"), 1 << 20)
    with pytest.raises(ValueError):
        store.put("c", *kv(0, torch.float32))
    with pytest.raises(ValueError):
        store.put("c", torch.zeros(2, 2, 0, 4, dtype=torch.bfloat16), torch.zeros(2, 2, 0, 4, dtype=torch.bfloat16))


def test_lru_memory_budget_falls_back_to_disk(tmp_path: Path) -> None:
    per_chunk = L * H * block_bytes()
    store = ChunkKVStore(tmp_path, fp(), memory_budget_bytes=2 * per_chunk)
    data = {f"c{i}": kv(10 + i) for i in range(3)}
    for key, (k, v) in data.items():
        store.put(key, k, v)
    st = store.stats()
    assert st.memory_bytes <= 2 * per_chunk and st.memory_blocks == 2 * L * H and st.memory_evictions == L * H
    assert not store.memory.contains(BlockKey("c0", 0, 0))  # least recently used went first
    got = store.get("c0")  # served from disk, promoted, evicting c1 (now the LRU)
    assert got is not None and torch.equal(got.k, data["c0"][0]) and torch.equal(got.v, data["c0"][1])
    assert store.stats().cold_block_reads == L * H
    assert store.memory.contains(BlockKey("c0", 0, 0)) and not store.memory.contains(BlockKey("c1", 0, 0))
    for key, (k, v) in data.items():
        got = store.get(key)
        assert got is not None and torch.equal(got.k, k) and torch.equal(got.v, v)
    assert store.stats().memory_bytes <= 2 * per_chunk


def test_head_granular_memory_eviction(tmp_path: Path) -> None:
    k, v = kv(6)
    store = ChunkKVStore(tmp_path, fp(), 1 << 20)
    store.put("c", k, v)
    freed = store.evict("c", layer=1, heads=[0, 2])
    assert freed == 2 * block_bytes() and store.stats().memory_blocks == L * H - 2
    got = store.get("c", layer=1)
    assert got is not None and torch.equal(got.k, k[1:2]) and store.stats().cold_block_reads == 2
    assert store.evict(target_bytes=block_bytes()) > 0 and store.stats().memory_bytes <= block_bytes()


def test_disk_budget_evicts_lru_chunk(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp(), 1 << 20)
    store.put("c0", *kv(0))
    size = store.stats().cold_bytes
    store = ChunkKVStore(tmp_path, fp(), 1 << 20, disk_budget_bytes=2 * size)
    store.put("c1", *kv(1))
    assert store.get("c0") is not None  # c0 is now more recent than c1
    store.put("c2", *kv(2))
    assert store.contains("c0") and not store.contains("c1") and store.contains("c2")
    assert store.get("c1") is None and store.stats().cold_evictions == 1
    assert not store.memory.contains(BlockKey("c1", 0, 0))  # memory only caches what cold holds


def test_delete(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp(), 1 << 20)
    store.put("c", *kv(7))
    assert store.delete("c") and not store.delete("c")
    assert not store.contains("c") and store.get("c") is None
    st = store.stats()
    assert st.memory_bytes == 0 and st.cold_chunks == 0 and st.cold_bytes == 0
    assert not chunk_path(store, "c").exists()


def test_keys_and_reopen(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp(), 0)
    for i in range(4):
        store.put(f"doc/{i}", *kv(i, shape=(L, H, 3 + i, D)))
    again = ChunkKVStore(tmp_path, fp(), 0)
    assert sorted(again.keys()) == [f"doc/{i}" for i in range(4)]
    assert again.stats().cold_chunks == 4 and again.stats().cold_bytes == store.stats().cold_bytes
    got = again.get("doc/3")
    assert got is not None and got.num_tokens == 6


def test_stale_temp_files_cleaned_live_ones_kept(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp(), 0)
    tier = store.cold
    assert isinstance(tier, DiskTier)
    dead = tier.tmp_dir / f"abc.{tier._host}.999999999.x.tmp"  # no such pid
    live = tier.tmp_dir / f"abd.{tier._host}.{os.getpid()}.y.tmp"
    dead.write_bytes(b"partial")
    live.write_bytes(b"in flight")
    again = ChunkKVStore(tmp_path, fp(), 0)
    assert not dead.exists() and live.exists() and again.stats().cold_chunks == 0


def test_tiers_follow_protocols(tmp_path: Path) -> None:
    mem = MemoryTier(1 << 20)
    disk = DiskTier(tmp_path, fp())
    assert isinstance(mem, BlockTier) and isinstance(disk, ColdTier)
    k, v = kv(8)
    full = BlockMeta(0, T, Codec.RAW, HeadClass.UNCLASSIFIED)
    meta = ChunkMeta("c", L, H, T, D, "float32", (full,) * (L * H))
    payloads = [encode_block(k[l, h], v[l, h], Codec.RAW) for l in range(L) for h in range(H)]
    assert disk.put_chunk(meta, payloads) == []
    got = disk.get_payloads("c", [(1, 1), (2, 3)])
    assert got is not None and got[0] == meta
    kk, vv = decode_block(got[1][(1, 1)], full, D, torch.float32)
    assert torch.equal(kk, k[1, 1]) and torch.equal(vv, v[1, 1])
    with pytest.raises(ValueError):  # a payload that does not match its meta is refused
        disk.put_chunk(meta, payloads[:-1] + [b"short"])
    new = KVBlock(torch.ones(T, D), torch.zeros(T, D))
    mem.put(BlockKey("c", 0, 0), new)
    assert mem.contains(BlockKey("c", 0, 0)) and mem.delete(BlockKey("c", 0, 0)) and mem.nbytes == 0


def test_concurrent_threads(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp(), memory_budget_bytes=3 * L * H * block_bytes())
    data = {f"c{i}": kv(100 + i) for i in range(6)}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for r in range(10):
                key = f"c{(n + r) % 6}"
                store.put(key, *data[key])  # same keys from several threads: last rename wins
                got = store.get(f"c{(n + r + 1) % 6}", heads=[n % H])
                if got is not None:
                    assert torch.equal(got.k, data[f"c{(n + r + 1) % 6}"][0][:, [n % H]])
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.stats().memory_bytes <= 3 * L * H * block_bytes()
    fresh = ChunkKVStore(tmp_path, fp(), 0)
    for key, (k, v) in data.items():
        got = fresh.get(key)
        assert got is not None and torch.equal(got.k, k) and torch.equal(got.v, v)
    assert not any(fresh.cold.tmp_dir.iterdir())  # type: ignore[attr-defined]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("device", ["cuda", "cpu"])  # GPU-resident hot tier; pinned host warm tier
def test_gpu_tensors_roundtrip(tmp_path: Path, device: str) -> None:
    k, v = (t.cuda() for t in kv(9, torch.bfloat16))
    store = ChunkKVStore(tmp_path, fp("bfloat16"), 1 << 20, device=device)
    store.put("c", k, v)
    got = store.get("c", heads=[1, 3])
    assert got is not None and got.k.device.type == device
    assert torch.equal(got.k.cuda(), k[:, [1, 3]]) and torch.equal(got.v.cuda(), v[:, [1, 3]])
    if device == "cpu":
        assert store.memory.pin and store.memory.get(BlockKey("c", 0, 0)).k.is_pinned()  # type: ignore[union-attr]
    store.evict()
    again = store.get("c")  # from disk, onto the device
    assert again is not None and again.k.device.type == device and torch.equal(again.k.cuda(), k)
