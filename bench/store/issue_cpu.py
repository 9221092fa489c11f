r"""Host issue time of a layer-major host-tier load, on the CPU: the serving load's own code
(`SegmentCache.get_from_store` -> `get_blocks_many` -> `layer_load.issue_layered`) for `--chunks` (64)
chunks the store's host tier holds whole, with the pool's slots on torch's `meta` device, so every
copy, scatter and index op is dispatched but moves no byte: what is left is the host's side of the
issue (Python, plan building, torch dispatch), the part a GPU cannot overlap. It leaves out the CUDA
driver's own cost per launch and per async copy (a few microseconds each on a GPU host).

    PYTHONPATH=$PWD python3 bench/store/issue_cpu.py --label after --out bench/store/results_issue_cpu.json

Geometry: Llama-3-8B (32 layers x 8 kv heads x 128 dims, bf16), `--tokens` (512) per chunk, page
size 16, dense blocks (every head whole) and, with `--setting compressed`, int8 cold codec with a
seeded half of the heads local (tail `--window` tokens) decoded on the host (sparse plans). The
chunks are put once (disk + host tier), then `--reps` loads are timed (segment cache emptied before
each, plans' templates warm as in serving) and one more runs under cProfile (its top functions go
into the JSON). Labels accumulate in the JSON, so two versions of the code can be measured in turn.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_depth import cpu_name  # noqa: E402

from redknot_rag.kvcache import KVSegment, PageAllocator  # noqa: E402
from redknot_rag.store import ChunkKVStore, HeadCompression, KVFingerprint, StoreConfig, hash_token_ids  # noqa: E402
from redknot_rag.store.segment_cache import SegmentCache  # noqa: E402


class MetaRunner:
    """What `SegmentCache` uses of a `KVRunner`'s KV-memory API: a real page allocator, pool slots on the
    `meta` device (shapes and dispatch, no bytes)."""

    tp_size = 1

    def __init__(self, num_pages: int, page_size: int, head_dim: int, num_layers: int, num_kv_heads: int) -> None:
        self.device = torch.device("meta")
        self.dtype = torch.bfloat16
        self.page_size = page_size
        self._geometry = (num_layers, num_kv_heads)
        self._pages = PageAllocator(num_pages)
        self._k = torch.empty(num_pages * page_size, head_dim, dtype=self.dtype, device="meta")  # [slots, D]
        self._v = torch.empty_like(self._k)

    @property
    def free_pages(self) -> int:
        return self._pages.num_free

    def can_allocate(self, n: int) -> bool:
        return self._pages.can_allocate(n)

    def allocate_segment(self, num_tokens: int, visible: Any = None) -> KVSegment:
        nl, nh = self._geometry
        n = -(-num_tokens // self.page_size)
        pages = torch.from_numpy(self._pages.allocate(nl * nh * n)).view(nl, nh, n)
        return KVSegment(pages, num_tokens, is_shared=True, visible=visible)

    def write_pages(self, issue: Any) -> Any:
        return issue(self._k, self._v)

    def drop_segment(self, segment: Any) -> None:
        self._pages.decref(segment.pages.numpy(), unique=True)

    def await_layers(self, events: Any) -> None:
        pass


class LayeredCache(SegmentCache):
    """The GPU branch of `SegmentCache.get_blocks_many` on a stream-less (meta) pool: batches are issued
    layer-major by `issue_layered` (no events: nothing to wait for)."""

    def __init__(self, runner: Any, max_pages: int) -> None:
        super().__init__(runner, max_pages)
        self.stream = object()  # type: ignore[assignment]  # not None: take the layer-major branch

    def _issue(self, work: Any) -> None:
        self._layer_events.append(work())
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--setting", choices=["dense", "compressed"], default="dense")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    L, H, D, PS = 32, 8, 128, 16
    work = Path(tempfile.mkdtemp(prefix="rkv-issue-", dir=os.environ.get("RKV_BENCH_DIR")))
    try:
        fp = KVFingerprint("m", "t", hash_token_ids([1]), "bfloat16")
        cfg = StoreConfig(host_bytes=64 << 30)
        if args.setting == "compressed":
            g = torch.Generator().manual_seed(1)
            classes = (torch.rand(L, H, generator=g) < 0.5).int()  # 1 global, 0 local
            cfg = StoreConfig(
                host_bytes=64 << 30, cold_codec="int8", heads=HeadCompression.from_mask(classes, args.window)
            )
        store = ChunkKVStore(work, fp, config=cfg)
        g = torch.Generator().manual_seed(0)
        keys = [f"c{i}" for i in range(args.chunks)]
        for key in keys:
            k, v = (torch.randn(L, H, args.tokens, D, generator=g).to(torch.bfloat16) for _ in range(2))
            store.put(key, k, v)  # on disk and whole in the host tier
        per_chunk = L * H * -(-args.tokens // PS)
        runner = MetaRunner(per_chunk * args.chunks, PS, D, L, H)
        cache = LayeredCache(runner, per_chunk * args.chunks)
        chunks = [(key, args.tokens, None) for key in keys]

        def load() -> float:
            cache.clear()
            cache._layer_events.clear()
            t = time.perf_counter()
            segs = cache.get_from_store(store, chunks, 8, 4)
            s = time.perf_counter() - t
            assert all(seg is not None for seg in segs)
            return s

        load()  # warm: templates, allocator
        secs = [load() for _ in range(args.reps)]
        pr = cProfile.Profile()
        cache.clear()
        pr.enable()
        cache.get_from_store(store, chunks, 8, 4)
        pr.disable()
        st = pstats.Stats(pr)
        rows = [
            (f"{Path(f).name}:{line}:{fn}", int(calls), float(own), float(cum))
            for (f, line, fn), (_, calls, own, cum, _) in st.stats.items()  # type: ignore[attr-defined]
        ]
        med = statistics.median(secs)
        row = dict(
            setting=args.setting,
            chunks=args.chunks,
            tokens=args.tokens,
            issue_median_s=med,
            issue_per_chunk_ms=med / args.chunks * 1e3,
            issue_all_s=secs,
            profile_by_own_s=sorted(rows, key=lambda r: -r[2])[: args.top],
            profile_by_cumulative_s=sorted(rows, key=lambda r: -r[3])[: args.top],
        )
        print(args.label, args.setting, f"{med * 1e3:.1f} ms ({med / args.chunks * 1e3:.3f} ms/chunk)", flush=True)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["machine"] = (
        f"CPU: {cpu_name()}, {os.cpu_count()} cores shared with other jobs; torch {torch.__version__}, "
        f"Python {platform.python_version()}; pool on the meta device (no copies)"
    )
    data.setdefault(args.label, {})[args.setting] = row
    out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
