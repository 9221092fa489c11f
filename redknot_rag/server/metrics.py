"""Prometheus metrics through `prometheus-client`: one registry per server (never the global one).

Names are vLLM's (`time_to_first_token_seconds`, `inter_token_latency_seconds`,
`e2e_request_latency_seconds`, `prompt_tokens_total`, `generation_tokens_total`,
`request_success_total{finished_reason}`, `num_requests_running`, `num_requests_waiting`,
`kv_cache_usage_perc`) with SGLang's `cached_tokens_total`, under the `redknot_` prefix
(Prometheus names take no `:` outside recording rules), and vLLM's histogram buckets. What only
we have: reuse per policy (tokens reused vs recomputed, phase times) and the chunk-KV store
per tier, read from the store at scrape time. README "Metrics" lists every series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from redknot_rag.request import ReusedContext

log = logging.getLogger("redknot.server")
disable_created_metrics()  # no `_created` series next to every counter and histogram
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "redknot_"
# vLLM v1's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REUSE_PHASES = ("kv_load", "kv_miss_prefill", "recompute")  # keys `<phase>_ms` of `ReusedContext.phase_ms`


class _Gauges(Collector):
    """Gauges read at scrape time; a read that fails leaves its series out (the scrape succeeds)."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, str, Callable[[], float]]] = []

    def collect(self) -> Iterator[Metric]:
        for name, doc, read in self.reads:
            try:
                value = float(read())
            except Exception:
                log.debug("gauge %s unreadable", name, exc_info=True)
                continue
            yield GaugeMetricFamily(name, doc, value=value)


class StoreCollector(Collector):
    """The chunk-KV store's counters per tier (`StoreStats`), read at scrape time."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.stats()
        except Exception:
            log.warning("store stats unreadable", exc_info=True)
            return
        size = GaugeMetricFamily(P + "store_bytes", "Bytes held per store tier.", labels=["tier"])
        budget = GaugeMetricFamily(P + "store_budget_bytes", "Byte budget per store tier.", labels=["tier"])
        items = GaugeMetricFamily(
            P + "store_items", "Items per store tier (host: blocks; disk/redis: chunks).", labels=["tier"]
        )
        hits = CounterMetricFamily(
            P + "store_block_hits", "(chunk, layer, head) blocks served per store tier.", labels=["tier"]
        )
        evictions = CounterMetricFamily(P + "store_evictions", "Evictions per store tier.", labels=["tier"])
        for t in s.tiers:
            size.add_metric([t.name], t.nbytes)
            if t.budget_bytes is not None:
                budget.add_metric([t.name], t.budget_bytes)
            items.add_metric([t.name], t.items)
            hits.add_metric([t.name], t.block_hits)
            evictions.add_metric([t.name], t.evictions)
        yield from (size, budget, items, hits, evictions)
        for field, doc in (
            ("hits", "Chunk lookups answered by the store."),
            ("misses", "Chunk lookups the store could not answer."),
            ("block_lookups", "(chunk, layer, head) blocks looked up."),
            ("block_misses", "Blocks found in no tier."),
            ("corrupt", "Blocks that failed checksum or validation (dropped, never served)."),
            ("tier_errors", "Reads or writes a tier could not serve (each became a miss)."),
            ("promotions", "Copies up a tier (blocks into host memory, chunks from Redis to disk)."),
            ("demotions", "Chunks moved down a tier."),
            ("dropped", "Chunks evicted from the coldest tier."),
        ):
            yield CounterMetricFamily(P + "store_" + field, doc, value=getattr(s, field))
        cls = CounterMetricFamily(
            P + "store_class_block_hits", "Blocks served per tier and head class.", labels=["tier", "head_class"]
        )
        for key, n in sorted(s.class_block_hits.items()):
            tier, _, head_class = key.partition(".")
            cls.add_metric([tier, head_class], n)
        yield cls


class Metrics:
    """All series of one server. `observe_request` is called once per finished engine request."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(
            P + "http_requests", "HTTP requests by route template and status code.", ["route", "code"], registry=r
        )
        self.request_success = Counter(
            P + "request_success", "Engine requests finished, by finish reason.", ["finished_reason"], registry=r
        )
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", registry=r)
        self.cached_tokens = Counter(
            P + "cached_tokens", "Prompt tokens served from stored chunk KV (not prefilled).", registry=r
        )
        self.rejected = Counter(P + "rejected_requests", "Requests refused, by reason.", ["reason"], registry=r)
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds", "Time between output tokens.", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds", "Engine request latency.", buckets=E2E_BUCKETS, registry=r
        )
        self.reuse_requests = Counter(
            P + "reuse_requests", "Requests whose context was assembled by a reuse policy.", ["policy"], registry=r
        )
        self.reused_tokens = Counter(
            P + "reuse_reused_tokens", "Context tokens served from stored KV, per policy.", ["policy"], registry=r
        )
        self.recomputed_tokens = Counter(
            P + "reuse_recomputed_tokens", "Context tokens recomputed, per policy.", ["policy"], registry=r
        )
        self.reuse_phase = Histogram(
            P + "reuse_phase_seconds",
            "Time of one reuse phase (kv_load, kv_miss_prefill, recompute) per request.",
            ["policy", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self._gauges = _Gauges()
        r.register(self._gauges)

    def add_gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._gauges.reads.append((name, help, read))

    def add_store(self, stats: Callable[[], Any]) -> None:
        """Export a chunk-KV store's `stats()` (a `StoreStats`) on every scrape."""
        self.registry.register(StoreCollector(stats))

    def count_http(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, code=str(status)).inc()

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def observe_request(
        self,
        *,
        prompt_tokens: int,
        output_tokens: int,
        cached_tokens: int,
        finish: str,
        ttft: float | None,
        token_times: list[float],
        e2e: float | None,
        reuse: ReusedContext | None = None,
    ) -> None:
        self.request_success.labels(finished_reason=finish).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.cached_tokens.inc(cached_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        for a, b in zip(token_times, token_times[1:]):
            self.itl.observe(b - a)
        if e2e is not None:
            self.e2e.observe(e2e)
        if reuse is not None:
            self.reuse_requests.labels(policy=reuse.policy).inc()
            self.reused_tokens.labels(policy=reuse.policy).inc(reuse.reused_tokens)
            self.recomputed_tokens.labels(policy=reuse.policy).inc(reuse.recomputed_tokens)
            for phase in REUSE_PHASES:
                ms = reuse.phase_ms.get(f"{phase}_ms")  # absent: the phase did not run
                if ms is not None:
                    self.reuse_phase.labels(policy=reuse.policy, phase=phase).observe(ms / 1e3)

    def render(self) -> bytes:
        """The text exposition format (may read the store: call off the event loop)."""
        return generate_latest(self.registry)
