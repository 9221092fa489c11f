"""Crash safety: SIGKILL a writer at random moments; concurrent writer processes on one chunk."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from redknot_rag.store import ChunkKVStore, DiskTier, KVFingerprint

FP = KVFingerprint("w", "t", "a", "float32")  # the child builds the same one

# The child writes chunks forever; after each put returns it prints the key (then it is committed).
CHILD = r"""
import sys, torch
from redknot_rag.store import ChunkKVStore, KVFingerprint
root, start, repeat_key, die_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if die_at >= 0:  # SIGKILL ourselves at the commit point of put number die_at: file written, not renamed
    import os, signal
    real_replace, calls = os.replace, [0]
    def replace(src, dst):
        calls[0] += str(dst).endswith(".rkv")
        if calls[0] == die_at + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
store = ChunkKVStore(root, KVFingerprint("w", "t", "a", "float32"), memory_budget_bytes=0)

def chunk(i):
    g = torch.Generator().manual_seed(i)
    t = 64 + (i * 37) % 200
    return torch.randn(4, 4, t, 64, generator=g), torch.randn(4, 4, t, 64, generator=g)

print("ready", flush=True)
i = start
while True:
    key = repeat_key or f"c{i}"
    store.put(key, *chunk(i if not repeat_key else 0), keep_in_memory=False)
    print(key, flush=True)
    i += 1
    if repeat_key and i - start >= 20:
        break
"""


def expected(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    t = 64 + (i * 37) % 200
    return torch.randn(4, 4, t, 64, generator=g), torch.randn(4, 4, t, 64, generator=g)


def spawn(root: Path, start: int, repeat_key: str = "", die_at: int = -1) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(start), repeat_key, str(die_at)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkill_at_random_moments_loses_nothing_committed(tmp_path: Path) -> None:
    rng = random.Random(1234)
    committed: set[str] = set()
    attempted: set[str] = set()
    for round_ in range(5):
        start = 1000 * round_
        child = spawn(tmp_path, start)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        keys = [line for line in out.split() if line]
        committed.update(keys)
        attempted.update(f"c{start + j}" for j in range(len(keys) + 1))  # + the one in flight

        store = ChunkKVStore(tmp_path, FP, memory_budget_bytes=0)  # opens cleanly
        tier = store.cold
        assert isinstance(tier, DiskTier)
        assert not any(tier.tmp_dir.iterdir())  # the killed writer's temp file is gone
        visible = set(store.keys())
        assert committed <= visible <= attempted  # nothing committed lost, nothing unknown shown
        for key in visible:  # every visible chunk is whole and bit-exact
            want_k, want_v = expected(int(key[1:]))
            got = store.get(key)
            assert got is not None, key
            assert torch.equal(got.k, want_k) and torch.equal(got.v, want_v), key
        assert store.stats().corrupt == 0
    assert len(committed) >= 5


def test_two_processes_writing_one_chunk(tmp_path: Path) -> None:
    children = [spawn(tmp_path, 0, repeat_key="shared") for _ in range(2)]
    for c in children:
        out, _ = c.communicate(timeout=120)
        assert c.returncode == 0 and out.split().count("shared") == 20
    store = ChunkKVStore(tmp_path, FP, memory_budget_bytes=0)
    got = store.get("shared")
    want_k, want_v = expected(0)
    assert got is not None and torch.equal(got.k, want_k) and torch.equal(got.v, want_v)
    assert list(store.keys()) == ["shared"] and store.stats().cold_chunks == 1


def test_kill_between_fsync_and_rename(tmp_path: Path) -> None:
    child = spawn(tmp_path, 0, die_at=3)  # the fourth put dies with its temp file complete on disk
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and out.split() == ["ready", "c0", "c1", "c2"]
    store = ChunkKVStore(tmp_path, FP, memory_budget_bytes=0)
    tier = store.cold
    assert isinstance(tier, DiskTier) and tier.num_stale_removed == 1 and not any(tier.tmp_dir.iterdir())
    assert sorted(store.keys()) == ["c0", "c1", "c2"] and not store.contains("c3")
    for i in range(3):
        got = store.get(f"c{i}")
        assert got is not None and torch.equal(got.k, expected(i)[0])
