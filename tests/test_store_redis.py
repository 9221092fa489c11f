"""The Redis tier: unit tests against fakeredis, and a real `redis-server` (started here) for
sharing between replicas and for losing Redis mid-read."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import cast

import pytest
import torch

fakeredis = pytest.importorskip("fakeredis")
redis = pytest.importorskip("redis")

from redknot_rag.ports import free_port  # noqa: E402
from redknot_rag.store import ChunkKVStore, ColdTier, KVFingerprint, StoreConfig  # noqa: E402
from redknot_rag.store.redis_tier import RedisTier  # noqa: E402
from redknot_rag.store.tiers import HostBlock, KVBlock  # noqa: E402


def fp(weights: str = "w") -> KVFingerprint:
    return KVFingerprint(weights, "t", "a", "bfloat16")


def kv(seed: int, shape: tuple[int, ...] = (2, 3, 5, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16(), torch.randn(*shape, generator=g).bfloat16()


def test_redis_cold_tier(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis()
    tier = RedisTier(client, fp())
    assert isinstance(tier, ColdTier)
    store = ChunkKVStore(tmp_path, fp(), memory_budget_bytes=0, cold=tier)
    k, v = kv(0)
    store.put("c", k, v)
    got = store.get("c")
    assert got is not None and torch.equal(got.k, k) and torch.equal(got.v, v)
    sub = store.get("c", layer=1, heads=[2])
    assert sub is not None and torch.equal(sub.k, k[1:2, 2:3])
    assert list(store.keys()) == ["c"] and store.contains("c")
    # another fingerprint on the same server sees nothing
    other = ChunkKVStore(tmp_path, fp("B"), 0, cold=RedisTier(client, fp("B")))
    assert not other.contains("c") and other.get("c") is None
    # a block Redis evicted makes the chunk a miss; a damaged block is detected and dropped
    client.delete(tier._key("c", "l:0"))  # as if Redis evicted one layer
    assert store.get("c") is None and store.get("c", layer=1) is not None
    key = tier._key("c", "l:1")
    raw = bytearray(client.get(key))
    raw[10] ^= 0xFF
    client.set(key, bytes(raw))
    assert store.get("c", layer=1) is None and store.stats().corrupt == 1 and not store.contains("c")
    store.put("d", *kv(1))
    assert store.delete("d") and not store.contains("d") and client.dbsize() == 0


# -- a real redis-server ------------------------------------------------------------------------


def _start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        why = "redis-server not installed (.ci/setup installs it: apt-get install redis-server)"
        if os.environ.get("REDKNOT_REQUIRE_REDIS"):  # CI: a missing server is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
            "--maxmemory",
            "256mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server on port {port} did not start") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], str]]]:
    """Starts private `redis-server`s on free ports (stopped after the test): call it for one."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], str]:
        proc, url = _start_redis(tmp_path_factory.mktemp("redis"))
        procs.append(proc)
        return proc, url

    yield start
    for p in procs:
        _stop(p)


@pytest.fixture
def redis_url(redis_server) -> str:
    """REDKNOT_TEST_REDIS_URL if set (a server the test may write to), else a private one."""
    return os.environ.get("REDKNOT_TEST_REDIS_URL") or redis_server()[1]


def test_real_redis_shared_between_replicas(tmp_path: Path, redis_url: str) -> None:
    cfg = StoreConfig(redis_url=redis_url, cold_codec="int8")
    a = ChunkKVStore(tmp_path / "a", fp("real"), 1 << 20, config=cfg)
    b = ChunkKVStore(tmp_path / "b", fp("real"), 1 << 20, config=cfg)
    k, v = kv(2, shape=(4, 3, 64, 32))
    a.put("shared", k, v)
    first = a.get("shared")
    got = b.get("shared")  # replica b reads a's chunk through Redis, then from its own disk
    b.wait_fills()
    assert first is not None and got is not None
    assert torch.equal(got.k, first.k) and torch.equal(got.v, first.v)  # same bits on every replica
    redis_stats = b.stats().tier("redis")
    assert redis_stats is not None and redis_stats.block_hits == 4 * 3 and b.cold.contains_chunk("shared")
    assert (got.k.float() - k.float()).abs().max() < 0.05 * k.float().abs().max()
    assert a.delete("shared") and not b.tiers[1].contains_chunk("shared")


def test_killed_redis_mid_read_degrades_to_a_miss(
    tmp_path: Path, redis_server, caplog: pytest.LogCaptureFixture
) -> None:
    proc, url = redis_server()
    tier = RedisTier.from_url(url, fp(), timeout_s=1.0)
    store = ChunkKVStore(tmp_path, fp(), 0, cold=tier)  # Redis is the only tier: every read goes there
    data = {f"c{i}": kv(10 + i, shape=(4, 3, 16, 8)) for i in range(3)}
    for key, (k, v) in data.items():
        store.put(key, k, v)
    gate = threading.Event()

    def hold_layer_2(chunk_key: str, layer: int) -> None:
        if layer == 2:
            assert gate.wait(10)
        return None

    pf = store.prefetch(list(data), heads=hold_layer_2)
    for layer in (0, 1):
        got = pf.wait_layer(layer, timeout=10)
        for key, (k, _) in data.items():
            blocks = got[key]
            assert blocks is not None and torch.equal(blocks[1].k, k[layer, 1])
    proc.kill()  # Redis dies in the middle of the query's reads
    proc.wait()
    with caplog.at_level(logging.WARNING):
        gate.set()
        for layer in (2, 3):
            assert pf.wait_layer(layer, timeout=10) == {key: None for key in data}  # misses, no exception
        assert store.get("c0") is None and not store.contains("c0")
        # the caller's recompute path: storing again must not raise either
        store.put("c0", *data["c0"])
    assert "redis KV tier unavailable" in caplog.text
    st = store.stats()
    assert st.tier_errors >= 1 and st.misses >= 1 and st.block_misses > 0
    store.close()


def test_raw_bulk_reads_match_redis_py_and_detect_damage(tmp_path: Path, redis_server) -> None:
    """The tier's raw MGET path (`resp.py`, reads straight into the caller's buffer) returns the same
    bits as the redis-py path; an evicted layer is a miss for its blocks only; a flipped payload byte
    or a value of the wrong size is caught (corrupt, dropped, never served); the connection is
    usable after each of these."""
    _, url = redis_server()
    raw_tier = RedisTier.from_url(url, fp(), timeout_s=5.0)
    assert raw_tier.resp is not None
    py_tier = RedisTier(redis.Redis.from_url(url), fp())
    store = ChunkKVStore(tmp_path, fp(), 0, cold=raw_tier)
    data = {f"c{i}": kv(30 + i, shape=(4, 3, 16, 8)) for i in range(3)}
    for key, (k, v) in data.items():
        store.put(key, k, v)
    for key, (k, v) in data.items():
        blocks = store.get_blocks(key)
        assert blocks is not None
        assert all(torch.equal(b.k, k[la, h]) and torch.equal(b.v, v[la, h]) for (la, h), b in blocks.items())
        raw_meta, raw_p = raw_tier.get_payloads(key, [(1, 2), (3, 0), (0, 1)])  # type: ignore[misc]
        py_meta, py_p = py_tier.get_payloads(key, [(1, 2), (3, 0), (0, 1)])  # type: ignore[misc]
        assert raw_meta == py_meta and {b: bytes(p) for b, p in raw_p.items()} == {b: bytes(p) for b, p in py_p.items()}
    client = redis.Redis.from_url(url)
    client.delete(raw_tier._key("c0", "l:2"))  # as if Redis evicted one layer
    got = raw_tier.get_payloads("c0", [(1, 0), (2, 0)])
    assert got is not None and set(got[1]) == {(1, 0)}
    key = raw_tier._key("c1", "l:1")
    value = bytearray(client.get(key))  # type: ignore[arg-type]
    value[-5] ^= 0x01  # a payload byte of the last head
    client.set(key, bytes(value))
    assert store.get_blocks("c1") is None and not store.contains("c1") and store.stats().corrupt == 1
    client.set(raw_tier._key("c2", "l:3"), b"short")
    assert store.get_blocks("c2") is None and store.stats().corrupt == 2
    assert raw_tier.get_payloads("absent", [(0, 0)]) is None
    assert raw_tier.get_payloads("c0", [(0, 0)]) is not None  # the same connection, still in step
    store.close()


def _kvs(blocks: Mapping[tuple[int, int], HostBlock] | None) -> dict[tuple[int, int], KVBlock] | None:
    """`get_blocks_many`'s answer with its blocks checked to be decoded ones."""
    if blocks is None:
        return None
    assert all(isinstance(b, KVBlock) for b in blocks.values())
    return cast(dict[tuple[int, int], KVBlock], dict(blocks))


def _mget_calls(tier: RedisTier) -> list[int]:
    """Counts the tier's MGETs (raw connection and redis-py), one entry per call: its number of keys."""
    calls: list[int] = []
    assert tier.resp is not None
    raw, py = tier.resp.mget, tier.client.mget

    def raw_mget(keys):  # type: ignore[no-untyped-def]
        calls.append(len(keys))
        return raw(keys)

    def py_mget(keys, *a):  # type: ignore[no-untyped-def]
        calls.append(len(keys))
        return py(keys, *a)

    tier.resp.mget = raw_mget  # type: ignore[method-assign]
    tier.client.mget = py_mget
    return calls


def test_pipelined_reads_one_round_trip_same_blocks(tmp_path: Path, redis_server) -> None:
    """`get_blocks_many` on a Redis-only store reads every chunk's layers in ONE MGET (plus one for the
    metas it does not know yet), not one per chunk, and returns exactly the blocks of the per-chunk path
    (int8 and raw, redis-py and raw connection); an absent chunk misses and a damaged one is caught and
    dropped while the chunks after it in the same reply are served."""
    _, url = redis_server()
    data = {f"c{i}": kv(40 + i, shape=(4, 3, 16, 32)) for i in range(5)}
    for codec in ("raw", "int8"):
        writer = ChunkKVStore(tmp_path / f"w{codec}", fp(codec), 0, cold=RedisTier.from_url(url, fp(codec)),
                              config=StoreConfig(cold_codec=codec))  # fmt: skip
        for key, (k, v) in data.items():
            writer.put(key, k, v, keep_in_memory=False)
        keys = ["c3", "c0", "absent", "c4", "c1", "c2"]
        got = {}
        for streams in (0, 1, 2):  # 0: no pipelining
            tier = RedisTier.from_url(url, fp(codec))
            calls = _mget_calls(tier)
            cfg = StoreConfig(cold_codec=codec, redis_pipeline=streams > 0, redis_streams=max(streams, 1))
            store = ChunkKVStore(tmp_path / f"r{codec}{streams}", fp(codec), 1 << 24, cold=tier, config=cfg)
            got[streams] = [(k, _kvs(b)) for k, b in store.get_blocks_many(keys, workers=3)]
            assert [k for k, _ in got[streams]] == keys and got[streams][2][1] is None
            if streams == 1:  # metas (all 6), then every present chunk's meta + 4 layers in one reply
                assert sorted(calls) == [6, 5 * 5], calls
            elif streams == 2:  # the 5 present chunks over 2 connections: 3 and 2 chunks
                assert sorted(calls) == [6, 2 * 5, 3 * 5], calls
            else:
                assert len([n for n in calls if n == 5]) == 5, calls  # one MGET per chunk
            store.close()
        for streams in (1, 2):
            for (k0, b0), (k1, b1) in zip(got[0], got[streams], strict=True):
                assert k0 == k1 and (b0 is None) == (b1 is None)
                if b0 is not None and b1 is not None:
                    assert b0.keys() == b1.keys()
                    assert all(torch.equal(b0[lh].k, b1[lh].k) and torch.equal(b0[lh].v, b1[lh].v) for lh in b0)
        if codec == "raw":
            served = [(key, bs) for key, bs in got[2] if bs is not None]
            assert all(torch.equal(b.k, data[key][0][la, h]) for key, bs in served for (la, h), b in bs.items())
    # a flipped byte in c1's layer 2: c1 misses (dropped), c2 after it in the same reply is served
    tier = RedisTier.from_url(url, fp("raw"))
    client = redis.Redis.from_url(url)
    lkey = tier._key("c1", "l:2")
    value = bytearray(client.get(lkey))  # type: ignore[arg-type]
    value[-3] ^= 0x01
    client.set(lkey, bytes(value))
    store = ChunkKVStore(tmp_path / "bad", fp("raw"), 1 << 24, cold=tier)
    got_bad = {k: _kvs(b) for k, b in store.get_blocks_many(["c0", "c1", "c2"], workers=2)}
    c2 = got_bad["c2"]
    assert got_bad["c1"] is None and got_bad["c0"] is not None and c2 is not None
    assert torch.equal(c2[(3, 2)].k, data["c2"][0][3, 2])
    assert store.stats().corrupt == 1 and not tier.contains_chunk("c1")
    assert tier.get_payloads("c0", [(0, 0)]) is not None  # the connection is still in step
    store.close()


def test_pipelined_read_losing_redis_midway_is_misses_and_loses_nothing(
    tmp_path: Path, redis_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection failing in the middle of the one-reply read: the chunks already read are served,
    every later one is a miss (no exception, a tier error counted), the stored chunks stay in Redis, and
    the next read (a fresh connection) returns all of them exactly."""
    _, url = redis_server()
    tier = RedisTier.from_url(url, fp(), retry_after_s=0.0)
    store = ChunkKVStore(tmp_path, fp(), 1 << 24, cold=tier, config=StoreConfig(redis_streams=1))
    data = {f"c{i}": kv(70 + i, shape=(4, 3, 16, 32)) for i in range(4)}
    for key, (k, v) in data.items():
        store.put(key, k, v, keep_in_memory=False)
    real = RedisTier._parse_raw
    seen: list[str] = []

    def dies_at_third(self, reader, chunk_key, layers, alloc):  # type: ignore[no-untyped-def]
        seen.append(chunk_key)
        if len(seen) == 3:
            reader.sock.close()  # the connection is lost in the middle of the reply
        return real(self, reader, chunk_key, layers, alloc)

    monkeypatch.setattr(RedisTier, "_parse_raw", dies_at_third)
    got = dict(store.get_blocks_many(list(data), workers=2))
    monkeypatch.setattr(RedisTier, "_parse_raw", real)
    assert got["c0"] is not None and got["c1"] is not None and got["c2"] is None and got["c3"] is None
    assert store.stats().tier_errors >= 1
    store.evict()
    again = {k: _kvs(b) for k, b in store.get_blocks_many(list(data), workers=2)}
    for key, (k, v) in data.items():
        blocks = again[key]
        assert blocks is not None
        assert all(torch.equal(b.k, k[la, h]) and torch.equal(b.v, v[la, h]) for (la, h), b in blocks.items())
    store.close()
