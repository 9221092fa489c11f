"""`/metrics` as prometheus_client writes it: parsed back by prometheus_client's own text parser,
and every series documented in README's Metrics table (and every documented series emitted)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from redknot_rag.request import ReusedContext
from redknot_rag.server.metrics import TTFT_BUCKETS, Metrics
from redknot_rag.store.stats import StoreStats, TierStats

README = Path(__file__).resolve().parents[1] / "README.md"


def _store() -> StoreStats:
    tiers = (TierStats("host", 4096, 8192, 3, 10, 1), TierStats("disk", 65536, None, 2, 4, 0))
    return StoreStats(
        tiers=tiers, hits=5, misses=1, block_lookups=16, block_misses=2, corrupt=0, tier_errors=0,
        partial_misses=0, promotions=1, demotions=0, dropped=0, class_block_hits={"host.local": 6, "disk.global": 4},
    )  # fmt: skip


def _metrics() -> Metrics:
    m = Metrics()
    m.add_gauge("redknot_num_requests_waiting", "waiting", lambda: 2)
    m.add_gauge("redknot_num_requests_running", "running", lambda: 1)
    m.add_gauge("redknot_kv_pool_pages", "pages", lambda: 100)
    m.add_gauge("redknot_kv_pool_free_pages", "free", lambda: 75)
    m.add_gauge("redknot_kv_cache_usage_perc", "usage", lambda: 0.25)
    m.add_gauge("redknot_broken_gauge", "a read that fails is left out", lambda: 1 / 0)
    m.add_store(_store)
    m.count_http("/generate", 200)
    m.count_http("/documents/{doc_id}", 404)
    m.count_rejected("queue_full")
    m.observe_request(prompt_tokens=10, output_tokens=3, cached_tokens=0, finish="stop", ttft=0.03,
                      token_times=[1.0, 1.02, 1.05], e2e=0.2)  # fmt: skip
    phases = {"kv_load_ms": 4.0, "recompute_ms": 12.0, "kv_miss_prefill_ms": 0.0, "retrieve_ms": 3.0}
    reuse = ReusedContext(None, 100, 90, 10, "redknot", phase_ms=phases)
    m.observe_request(prompt_tokens=120, output_tokens=5, cached_tokens=90, finish="length", ttft=0.5,
                      token_times=[2.0, 2.1], e2e=0.9, reuse=reuse)  # fmt: skip
    return m


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_with_prometheus_parser():
    text = _metrics().render().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["redknot_time_to_first_token_seconds"].type == "histogram"
    assert fams["redknot_http_requests"].type == "counter" and fams["redknot_kv_cache_usage_perc"].type == "gauge"
    v = _samples(text)
    assert v[("redknot_http_requests_total", (("code", "200"), ("route", "/generate")))] == 1
    assert v[("redknot_request_success_total", (("finished_reason", "length"),))] == 1
    assert v[("redknot_prompt_tokens_total", ())] == 130 and v[("redknot_generation_tokens_total", ())] == 8
    assert v[("redknot_cached_tokens_total", ())] == 90
    assert v[("redknot_time_to_first_token_seconds_count", ())] == 2
    les = [k[1][0][1] for k in v if k[0] == "redknot_time_to_first_token_seconds_bucket"]
    assert [float(x) for x in les[:-1]] == list(TTFT_BUCKETS) and les[-1] == "+Inf"
    assert v[("redknot_time_to_first_token_seconds_bucket", (("le", "0.04"),))] == 1  # 0.03 s
    assert v[("redknot_inter_token_latency_seconds_count", ())] == 3  # 2 gaps + 1 gap
    assert v[("redknot_reuse_reused_tokens_total", (("policy", "redknot"),))] == 90
    assert v[("redknot_reuse_recomputed_tokens_total", (("policy", "redknot"),))] == 10
    assert v[("redknot_reuse_phase_seconds_sum", (("phase", "recompute"), ("policy", "redknot")))] == 0.012
    assert ("redknot_reuse_phase_seconds_count", (("phase", "retrieve"), ("policy", "redknot"))) not in v
    assert v[("redknot_kv_cache_usage_perc", ())] == 0.25 and v[("redknot_num_requests_waiting", ())] == 2
    assert v[("redknot_store_bytes", (("tier", "disk"),))] == 65536
    assert ("redknot_store_budget_bytes", (("tier", "disk"),)) not in v  # disk has no budget here
    assert v[("redknot_store_block_hits_total", (("tier", "host"),))] == 10
    assert v[("redknot_store_class_block_hits_total", (("head_class", "local"), ("tier", "host")))] == 6
    assert "redknot_broken_gauge" not in fams  # a failing gauge read does not fail the scrape
    assert not any(n.endswith("_created") for n, _ in v)


def test_every_series_is_documented_in_readme():
    text = _metrics().render().decode()
    exposed = set()
    for fam in text_string_to_metric_families(text):
        if fam.name == "redknot_broken_gauge":
            continue
        exposed.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    readme = README.read_text()
    section = readme[readme.index("### Metrics (`GET /metrics`)") :]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"^\| `(redknot_[a-z0-9_]+)` \|", section, re.M))
    assert exposed == documented, (sorted(exposed - documented), sorted(documented - exposed))
