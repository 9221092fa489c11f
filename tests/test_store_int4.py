"""INT4 cold codec: stated error bound, layout, batched decode = per-block decode, INT8 fallback, tiers."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from crc32c import crc32c

from redknot_rag.store import (
    ChunkKVStore,
    Codec,
    HeadClass,
    HeadCompression,
    KVFingerprint,
    StoreConfig,
    hash_token_ids,
)
from redknot_rag.store.blockfile import CorruptChunkError, read_header
from redknot_rag.store.codec import (
    INT4_GROUP,
    BlockMeta,
    CodecUnsupportedError,
    decode_block,
    encode_block,
    payload_nbytes,
)
from redknot_rag.store.disk import DiskTier, key_hash

MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def fp(dtype: str = "float32") -> KVFingerprint:
    return KVFingerprint("w", "t", hash_token_ids([1, 2]), dtype, "")


def block(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, d, generator=g)
    k[:, 3] *= 30  # outlier channels, as real K has
    k[:, 17] += 50
    v = torch.randn(n, d, generator=g) * 2
    return k.to(dtype), v.to(dtype)


def stated_scales(payload: bytes, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's group scale as stored in an INT4 payload: K `[n, D]`, V `[n, D]` (f32)."""
    u8 = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    G, c = -(-n // INT4_GROUP), d // INT4_GROUP
    ks = u8[: 2 * G * d].view(torch.float16).view(G, d).float()  # first: K scales [G, D]
    vs = u8[4 * G * d : 4 * G * d + 2 * n * c].view(torch.float16).view(n, c).float()  # V scales [n, D/32]
    return ks[torch.arange(n) // INT4_GROUP], vs.repeat_interleave(INT4_GROUP, dim=1)


def assert_within_bound(x: torch.Tensor, xd: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> None:
    """|x̂ - x| <= s/2 + |x̂|·2^-(p+1) (+ f32 rounding)."""
    x, xd = x.float(), xd.float()
    f32 = 2.0**-22 * (x.abs() + s * 16)  # a few f32 ulps of the operands
    bound = s / 2 + xd.abs() * 2.0 ** -(MANTISSA[dtype] + 1) + f32
    err = (xd - x).abs()
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 5, 32, 33, 100])
def test_int4_roundtrip_within_stated_bound(dtype: torch.dtype, n: int) -> None:
    d = 64
    k, v = block(n, d, seed=n, dtype=dtype)
    meta = BlockMeta(0, n, Codec.INT4, HeadClass.GLOBAL)
    payload = encode_block(k, v, Codec.INT4)
    G = -(-n // INT4_GROUP)
    assert len(payload) == payload_nbytes(meta, d, dtype) == 4 * G * d + 4 * n * d // 32 + n * d
    kd, vd = decode_block(payload, meta, d, dtype)
    assert kd.dtype == dtype and kd.shape == (n, d) and vd.shape == (n, d)
    ks, vs = stated_scales(payload, n, d)
    # the stated K scales are what a 4-bit grid over each (32-token group, channel) range needs, rounded
    # up to f16 (its minimum rounded down by at most one f16 step): neither too small nor inflated
    rows = torch.arange(n) // INT4_GROUP
    lo = torch.stack([k[rows == g].float().amin(0) for g in range(G)])[rows]  # [n, D]
    hi = torch.stack([k[rows == g].float().amax(0) for g in range(G)])[rows]
    assert (ks * 15 >= (hi - lo) * (1 - 2**-10)).all()
    assert (ks * 15 <= (hi - lo + lo.abs() * 2**-10) * (1 + 2**-9) + 2**-20).all()
    assert_within_bound(k, kd, ks, dtype)
    assert_within_bound(v, vd, vs, dtype)
    # 4 bits: an outlier channel costs only its own groups' precision (K per channel)
    assert (kd.float() - k.float())[:, 5].abs().max() < 0.5


def test_int4_constant_groups_decode_exactly() -> None:
    n, d = 40, 64
    k = torch.full((n, d), 1.5)
    k[:, 7] = -3.25  # constant channels: scale 0
    v = torch.zeros(n, d)
    v[3] = 0.1  # 0.1 is not an f16 value: min rounds down, scale > 0, still within the bound
    meta = BlockMeta(0, n, Codec.INT4, HeadClass.GLOBAL)
    payload = encode_block(k, v, Codec.INT4)
    kd, vd = decode_block(payload, meta, d, torch.float32)
    assert torch.equal(kd, k)
    assert torch.equal(vd[:3], v[:3]) and torch.equal(vd[4:], v[4:])
    ks, vs = stated_scales(payload, n, d)
    assert (ks == 0).all() and torch.isfinite(vd).all()
    assert_within_bound(v, vd, vs, torch.float32)


def test_int4_nibble_layout() -> None:
    """Low nibble = even channel; K scales, K mins, V scales, V mins, K nibbles, V nibbles."""
    n, d = 2, 32
    k = torch.arange(d, dtype=torch.float32).repeat(n, 1) % 16  # per channel over tokens: constant
    k[1] = 0  # token 1 is 0 everywhere: channel c's group holds {c % 16, 0}
    v = (torch.arange(d, dtype=torch.float32) % 16).repeat(n, 1)  # per token: 0..15 twice, min 0, scale 1
    payload = encode_block(k, v, Codec.INT4)
    nib = payload[-n * d // 2 :]  # V nibbles [n, D/2]
    assert nib[0] == 0x10 and nib[1] == 0x32 and nib[7] == 0xFE
    vs = torch.frombuffer(bytearray(payload[4 * d : 4 * d + 2 * n]), dtype=torch.float16)
    assert vs.tolist() == [1.0, 1.0]


def test_int4_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(CodecUnsupportedError, match="multiple of 32"):
        encode_block(torch.zeros(4, 48), torch.zeros(4, 48), Codec.INT4)
    with pytest.raises(CodecUnsupportedError, match="float16"):
        encode_block(torch.full((4, 32), 1e6), torch.zeros(4, 32), Codec.INT4)
    big = torch.zeros(4, 32)
    big[0, 0], big[1, 0] = -60000.0, 60000.0  # each fits f16, the scale's range (8000) fits, fine
    encode_block(big, torch.zeros(4, 32), Codec.INT4)
    with pytest.raises(ValueError, match="int4"):
        Codec.parse("int3")


def tier_hits(store: ChunkKVStore, name: str) -> int:
    t = store.stats().tier(name)
    assert t is not None
    return t.block_hits


def int4_store(root: Path, **kw) -> ChunkKVStore:
    return ChunkKVStore(root, fp(), 0, config=StoreConfig(dtype="bfloat16", cold_codec="int4", **kw))


def chunk(L: int, H: int, T: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, H, T, D, generator=g)
    k[..., 3] *= 20
    return k, torch.randn(L, H, T, D, generator=g)


def test_store_batched_decode_equals_decode_block_bit_for_bit(tmp_path: Path) -> None:
    L, H, T, D, window = 3, 4, 70, 64, 40
    classes = [[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]]
    k, v = chunk(L, H, T, D, 0)
    store = int4_store(tmp_path, heads=HeadCompression.from_mask(classes, window))
    store.put("c", k, v)
    got = store.get_blocks("c")  # host tier 0 bytes: decoded from disk, in batches per token count
    meta = store.meta("c")
    assert got is not None and meta is not None and tier_hits(store, "disk") == L * H
    bf = torch.bfloat16
    for (layer, head), blk in got.items():
        bm = meta.block(layer, head)
        assert bm.codec == Codec.INT4 and blk.k.dtype == bf
        assert bm.num_tokens == (window if classes[layer][head] == 0 else T)
        start = bm.token_start
        kd, vd = decode_block(encode_block(k[layer, head, start:], v[layer, head, start:], Codec.INT4), bm, D, bf)
        assert torch.equal(blk.k, kd) and torch.equal(blk.v, vd)


def test_store_falls_back_to_int8_per_block(tmp_path: Path) -> None:
    # head_dim 48: no block can be INT4
    k, v = chunk(2, 2, 10, 48, 1)
    store = int4_store(tmp_path / "d48")
    store.put("c", k, v)
    meta = store.meta("c")
    assert meta is not None and all(b.codec == Codec.INT8 for b in meta.blocks)
    assert store.get_blocks("c") is not None
    # one block outside f16's range: that block alone is INT8, the chunk reads back (mixed batches)
    k, v = chunk(2, 2, 10, 64, 2)
    k[1, 0] *= 1e5
    store = int4_store(tmp_path / "range")
    store.put("c", k, v)
    fd = os.open(store.cold._path(key_hash("c")), os.O_RDONLY)  # type: ignore[attr-defined]
    try:
        codecs = [b.codec for b in read_header(fd).meta.blocks]
    finally:
        os.close(fd)
    assert codecs == [Codec.INT4, Codec.INT4, Codec.INT8, Codec.INT4]
    got = store.get_blocks("c")
    assert got is not None
    for (layer, head), blk in got.items():
        ref = k[layer, head]
        err = (blk.k.float() - ref).abs().max()  # no inf/nan: within the block's codec's precision
        assert err <= ref.abs().max() / (100 if (layer, head) == (1, 0) else 10)


def test_int4_chunk_roundtrips_disk_and_redis_within_bound(tmp_path: Path) -> None:
    fakeredis = pytest.importorskip("fakeredis")
    from redknot_rag.store.redis_tier import RedisTier

    L, H, T, D = 2, 3, 45, 64
    k, v = chunk(L, H, T, D, 3)
    client = fakeredis.FakeRedis()
    cfg = StoreConfig(dtype="bfloat16", cold_codec="int4", redis_write_through=True)
    store = ChunkKVStore(tmp_path / "a", fp(), 1 << 20, config=cfg, redis=RedisTier(client, fp()))
    store.put("c", k, v)
    hot = store.get_blocks("c")
    from_disk = int4_store(tmp_path / "a").get_blocks("c")
    redis_only = ChunkKVStore(tmp_path / "b", fp(), 0, config=cfg, cold=RedisTier(client, fp()))
    from_redis = redis_only.get_blocks("c")
    assert hot is not None and from_disk is not None and from_redis is not None
    assert tier_hits(redis_only, "redis") == L * H
    for (layer, head), blk in from_redis.items():
        for other in (hot, from_disk):  # the same bits from every tier
            assert torch.equal(other[(layer, head)].k, blk.k) and torch.equal(other[(layer, head)].v, blk.v)
        payload = encode_block(k[layer, head], v[layer, head], Codec.INT4)
        ks, vs = stated_scales(payload, T, D)
        assert_within_bound(k[layer, head], blk.k, ks, torch.bfloat16)
        assert_within_bound(v[layer, head], blk.v, vs, torch.bfloat16)
    assert isinstance(store.cold, DiskTier)
    raw = ChunkKVStore(tmp_path / "raw", fp(), 0, config=StoreConfig(dtype="bfloat16"))
    raw.put("c", k, v)
    assert store.cold.nbytes < 0.4 * raw.stats().cold_bytes


def test_unknown_codec_id_is_refused(tmp_path: Path) -> None:
    store = ChunkKVStore(tmp_path, fp(), 0)
    k, v = chunk(1, 2, 4, 32, 4)
    store.put("c", k, v)
    path = store.cold._path(key_hash("c"))  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    header_len = struct.unpack_from("<I", data, 12)[0]
    struct.pack_into("<H", data, 88 + 28, 9)  # block 0's codec u16
    struct.pack_into("<I", data, header_len - 4, crc32c(bytes(data[: header_len - 4])))  # a valid header crc
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CorruptChunkError, match="not a valid Codec"):
            read_header(fd)
    finally:
        os.close(fd)
    assert ChunkKVStore(tmp_path, fp(), 0).get_blocks("c") is None  # a miss, never a misread


def test_cli_flags_accept_int4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from redknot_rag.store.store_cli import main as store_main
    from redknot_rag.store.store_config import add_store_args, store_config_from_args

    p = argparse.ArgumentParser()
    add_store_args(p)
    assert store_config_from_args(p.parse_args(["--store-cold-codec", "int4"])).codec == Codec.INT4
    with pytest.raises(SystemExit):
        p.parse_args(["--store-cold-codec", "int2"])
    assert store_main(["migrate", "--data-dir", str(tmp_path), "--store-cold-codec", "int4"]) == 0
    assert "no format-v1 store" in capsys.readouterr().out
