"""Store counters: bytes per tier, block hits per tier and head class, errors. `as_dict()` feeds /metrics."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TierStats:
    name: str  # "host", "disk", "redis"
    nbytes: int  # host: tensor bytes; disk: file bytes; redis: server used_memory
    budget_bytes: int | None
    items: int  # host: blocks; disk/redis: chunks
    block_hits: int  # blocks served from this tier
    evictions: int  # host: blocks; disk: chunks


@dataclass(frozen=True)
class StoreStats:
    """One snapshot. Block counts are per (chunk, layer, kv_head) block looked up by a read."""

    tiers: tuple[TierStats, ...]
    hits: int  # get()/get_blocks() calls answered
    misses: int  # calls that returned None (absent, other fingerprint, corrupt, partial)
    block_lookups: int
    block_misses: int  # blocks found in no tier
    corrupt: int  # checksum / validation failures (the bad copy is dropped, never served)
    tier_errors: int  # reads or writes a tier could not serve (Redis down): each became a miss
    partial_misses: int  # get() of a full chunk that holds only a window for some head
    promotions: int  # blocks copied up into host memory, chunks copied from Redis to disk
    demotions: int  # chunks moved down when disk evicted them
    dropped: int  # chunks evicted from the coldest tier (lost by budget)
    class_stored_bytes: dict[str, int] = field(default_factory=dict)  # cold-tier bytes put, per head class
    class_block_lookups: dict[str, int] = field(default_factory=dict)
    class_block_hits: dict[str, int] = field(default_factory=dict)  # per "<tier>.<class>"

    def tier(self, name: str) -> TierStats | None:
        return next((t for t in self.tiers if t.name == name), None)

    def hit_rate(self, name: str) -> float:
        """Share of looked-up blocks served from tier `name`."""
        t = self.tier(name)
        return t.block_hits / self.block_lookups if t is not None and self.block_lookups else 0.0

    # -- names kept from the single-cold-tier store -------------------------------------------
    @property
    def memory_bytes(self) -> int:
        return self.tiers[0].nbytes

    @property
    def memory_blocks(self) -> int:
        return self.tiers[0].items

    @property
    def memory_block_hits(self) -> int:
        return self.tiers[0].block_hits

    @property
    def memory_evictions(self) -> int:
        return self.tiers[0].evictions

    @property
    def cold_bytes(self) -> int:
        return self.tiers[1].nbytes

    @property
    def cold_chunks(self) -> int:
        return self.tiers[1].items

    @property
    def cold_block_reads(self) -> int:
        return sum(t.block_hits for t in self.tiers[1:])

    @property
    def cold_evictions(self) -> int:
        return self.tiers[1].evictions

    def as_dict(self) -> dict[str, float]:
        """Flat `{name: number}` (Prometheus-style names without the `redknot_store_` prefix)."""
        out: dict[str, float] = {}
        for t in self.tiers:
            out[f"{t.name}_bytes"] = t.nbytes
            if t.budget_bytes is not None:
                out[f"{t.name}_budget_bytes"] = t.budget_bytes
            out[f"{t.name}_items"] = t.items
            out[f"{t.name}_block_hits"] = t.block_hits
            out[f"{t.name}_hit_rate"] = round(self.hit_rate(t.name), 6)
            out[f"{t.name}_evictions"] = t.evictions
        for name in (
            "hits",
            "misses",
            "block_lookups",
            "block_misses",
            "corrupt",
            "tier_errors",
            "partial_misses",
            "promotions",
            "demotions",
            "dropped",
        ):
            out[name] = getattr(self, name)
        for cls, n in self.class_stored_bytes.items():
            out[f"class_{cls}_stored_bytes"] = n
        for cls, n in self.class_block_lookups.items():
            out[f"class_{cls}_block_lookups"] = n
        for key, n in self.class_block_hits.items():
            tier, cls = key.split(".")
            out[f"class_{cls}_{tier}_block_hits"] = n
        return out


class Counters:
    """Thread-safe counters behind StoreStats."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[name] += n

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._c)


def save_stats(path: Path, stats: StoreStats) -> None:
    """Atomically write `stats.as_dict()` as JSON (read by `redknot store stats`)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(stats.as_dict(), indent=1, sort_keys=True))
    os.replace(tmp, path)
