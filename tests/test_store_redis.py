"""RedisTier as the cold tier, against fakeredis (skipped when redis/fakeredis are absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

fakeredis = pytest.importorskip("fakeredis")
pytest.importorskip("redis")

from redknot_rag.store import BlockKey, ChunkKVStore, ColdTier, KVFingerprint  # noqa: E402
from redknot_rag.store.redis_tier import RedisTier  # noqa: E402


def fp(weights: str = "w") -> KVFingerprint:
    return KVFingerprint(weights, "t", "a", "bfloat16")


def kv(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, 8, generator=g).bfloat16(), torch.randn(2, 3, 5, 8, generator=g).bfloat16()


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
    client.delete(tier._key("c", "b:0:0"))  # as if Redis evicted one block
    assert store.get("c") is None and store.get("c", layer=1) is not None
    key = tier._key("c", "b:1:1")
    raw = bytearray(client.get(key))
    raw[10] ^= 0xFF
    client.set(key, bytes(raw))
    assert store.get("c", layer=1) is None and store.stats().corrupt == 1 and not store.contains("c")
    store.put("d", *kv(1))
    assert store.delete("d") and not store.contains("d") and client.dbsize() == 0
