"""The one way to build a reused request: load the chunks' segments, run a reuse policy, wrap the
assembled context KV into an unsubmitted `Request`.

Used by the RAG service (for `/query` and for automatic reuse on every API), the fidelity harness, head
profiling and the benches. Runs on the engine thread (`Engine.assemble`, in stages): it writes the page pool.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

from redknot_rag.engine import Engine
from redknot_rag.heads import HeadProfile, load_profile_for
from redknot_rag.rag.chunk_prefill import ChunkPrefiller
from redknot_rag.rag.layout import PromptLayout, chunk_key
from redknot_rag.request import Request, ReusedContext
from redknot_rag.reuse import ReuseInput, ReusePolicy, make_policy
from redknot_rag.sampling import SamplingParams
from redknot_rag.store import ChunkKVStore
from redknot_rag.store.segment_cache import KVLoad, SegmentCache


@dataclass
class Timing:
    """Milliseconds spent assembling one request (the engine adds question prefill and decode)."""

    kv_load_ms: float = 0.0
    kv_miss_prefill_ms: float = 0.0
    recompute_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {
            "kv_load_ms": self.kv_load_ms,
            "kv_miss_prefill_ms": self.kv_miss_prefill_ms,
            "recompute_ms": self.recompute_ms,
            **self.extra,
        }


class Assembler:
    """Builds reused requests for one engine: hot segment cache → chunk store → (miss) prefill now."""

    def __init__(
        self,
        engine: Engine,
        layout: PromptLayout,
        store: ChunkKVStore,
        *,
        profile: HeadProfile | None = None,
        cache_pages: int | None = None,
    ) -> None:
        self.engine = engine
        self.runner = runner = engine.runner
        self.layout = layout
        self.store = store
        self.profile = profile if profile is not None else load_profile_for(runner.name, runner.weights_fingerprint)
        self.prefiller: ChunkPrefiller = engine.run_store_work(lambda: ChunkPrefiller(runner, layout.anchor_ids))
        self.cache = SegmentCache(runner, max_pages=cache_pages or runner.num_pages // 2)
        self._policies: dict[str, ReusePolicy] = {}
        # recompute + question in one forward (the engine's first prefill step); False: recompute at assembly
        self.one_forward = True
        self.read_workers = 8  # chunks read from cold tiers at once

    def policy(self, name: str) -> ReusePolicy:
        """The policy for `name` (validated; built once per name with the model's head profile)."""
        pol = self._policies.get(name)
        if pol is None:
            pol = self._policies[name] = make_policy(name, self.profile)
        return pol

    def segment(self, ids: Sequence[int], timing: Timing):
        """One chunk's pool-resident segment (`segments` of one chunk), its copies waited for in full."""
        seg = self.segments([ids], timing)[0]
        self.cache.ready()
        return seg

    def segments(self, chunk_ids: Sequence[Sequence[int]], timing: Timing) -> list:
        """Pool-resident segment of every chunk: hot cache → store (per-head blocks; on a GPU copied
        layer-major on the cache's side stream, see `SegmentCache.get_blocks_many`) → (miss) prefill
        now and store it. Attention must wait for the copies: `SegmentCache.ready_layers`."""

        def item(ids: Sequence[int]) -> tuple[str, int, KVLoad]:
            key = chunk_key(ids)

            def prefill():
                t = time.perf_counter()
                k, v = self.prefiller.prefill([ids])[0]
                self.store.put(key, k.cpu(), v.cpu())
                timing.kv_miss_prefill_ms += (time.perf_counter() - t) * 1e3
                return k, v, None

            return key, len(ids), prefill

        return self.cache.get_from_store(self.store, [item(c) for c in chunk_ids], self.read_workers)

    def build(
        self,
        chunk_ids: Sequence[Sequence[int]],
        tail_ids: Sequence[int],
        policy_name: str,
        params: SamplingParams,
        timing: Timing | None = None,
        *,
        policy_obj: ReusePolicy | None = None,
        **request_kw,
    ) -> Request:
        """`build_stages` run through at once, on the calling thread (which must own the pool: the engine
        thread, or any thread when no engine loop runs)."""
        stages = self.build_stages(
            chunk_ids, tail_ids, policy_name, params, timing, policy_obj=policy_obj, **request_kw
        )
        while True:
            try:
                next(stages)
            except StopIteration as done:
                return done.value

    def build_stages(
        self,
        chunk_ids: Sequence[Sequence[int]],
        tail_ids: Sequence[int],
        policy_name: str,
        params: SamplingParams,
        timing: Timing | None = None,
        *,
        policy_obj: ReusePolicy | None = None,
        **request_kw,
    ) -> Generator[None, None, Request]:
        """`[anchor][chunks][tail]` as an unsubmitted request whose context KV the policy assembled.

        A generator of stages for `Engine.assemble`: it yields after validation and after the segment
        loads, so the engine can run steps of running requests between them; closed at a yield (its client
        left), it holds no page (the segments belong to the cache). Returns the request.

        `policy_obj` (bench only: the harness's oracles, which no API can name) replaces the policy looked up
        by `policy_name`, which then only labels the request. Runs on the runner's thread. Everything is
        validated before any page is taken; if building the request fails after assembly, the assembled
        pages are released before the error propagates.
        """
        timing = timing or Timing()
        policy = policy_obj if policy_obj is not None else self.policy(policy_name)
        prompt = self.layout.prompt_ids(chunk_ids, tail_ids)
        req = self.engine.make_request(prompt, params, **request_kw)  # validates length, params, pages
        if policy.name == "full" or not chunk_ids:
            return req
        yield
        t = time.perf_counter()
        segs = self.segments(chunk_ids, timing)
        # attention below reads the segments: the runner's forwards wait (on the device) for each layer's
        # copies as they reach it, so the host -> pool copies overlap selection and recompute
        self.cache.ready_layers()
        timing.kv_load_ms += (time.perf_counter() - t) * 1e3 - timing.kv_miss_prefill_ms
        yield
        anchor = list(self.layout.anchor_ids)
        inp = ReuseInput(anchor, self.prefiller.anchor, [list(c) for c in chunk_ids], segs, list(tail_ids))
        t = time.perf_counter()
        # selection now; the recompute itself is deferred into the engine's prefill of this request,
        # together with the question (`ReusedContext.pending`): one pass over the weights instead of two
        asm = self.runner.on_all_ranks(policy.assemble, inp, self.one_forward)  # one rank: a plain call
        timing.recompute_ms += (time.perf_counter() - t) * 1e3
        if asm.kv is not None:
            stats = {
                "recomputed_positions": asm.recomputed_index.tolist(),
                "context_len": asm.context_len,
                **asm.stats,
            }
            req.reuse = ReusedContext(
                asm.kv, asm.context_len, asm.reused_tokens, asm.recomputed_tokens, policy_name, stats, timing.as_dict()
            )
            if asm.deferred:
                req.reuse.pending = asm.recomputed_index
        return req

    def drop_chunk(self, key: str) -> None:
        """Forget a chunk's pool-resident segment (runner thread)."""
        self.cache.drop(key)

    def flush(self) -> None:
        self.cache.clear()

    def close(self) -> None:
        self.cache.clear()
        self.prefiller.close()
