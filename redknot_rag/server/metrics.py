"""Prometheus text exposition, written by hand: counters, histograms and gauges read at scrape time.

Names follow Prometheus conventions (`_total` counters, `_seconds` units, cumulative `le`
buckets). Updates come from the event loop and executor threads, so every mutation takes a lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in labels]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


@dataclass
class Counter:
    name: str
    help: str
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values:
            out.append(f"{self.name} 0")
        out += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return out


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    num: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.num += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.num}')
        out += [f"{self.name}_sum {self.total:.6f}", f"{self.name}_count {self.num}"]
        return out


@dataclass
class Gauge:
    name: str
    help: str
    read: Callable[[], float]

    def render(self) -> list[str]:
        try:
            value = float(self.read())
        except Exception:  # a gauge that cannot be read is left out, not a failed scrape
            return []
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {value:g}"]


class Metrics:
    """All series of one server. `observe_request` is called once per finished engine request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests = Counter("redknot_http_requests_total", "HTTP requests by route and status code.")
        self.requests = Counter("redknot_requests_total", "Engine requests finished, by finish reason.")
        self.prompt_tokens = Counter("redknot_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("redknot_generation_tokens_total", "Generated tokens.")
        self.cached_tokens = Counter(
            "redknot_cache_hit_tokens_total", "Prompt tokens served from stored chunk KV (not prefilled)."
        )
        self.rejected = Counter("redknot_rejected_requests_total", "Requests refused, by reason.")
        self.ttft = Histogram("redknot_time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = Histogram("redknot_inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.e2e = Histogram("redknot_e2e_request_latency_seconds", "Engine request latency.", _LATENCY_BUCKETS)
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def count_http(self, route: str, status: int) -> None:
        with self._lock:
            self.http_requests.inc(route=route, code=str(status))

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected.inc(reason=reason)

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
    ) -> None:
        with self._lock:
            self.requests.inc(finish_reason=finish)
            self.prompt_tokens.inc(prompt_tokens)
            self.generation_tokens.inc(output_tokens)
            self.cached_tokens.inc(cached_tokens)
            if ttft is not None:
                self.ttft.observe(ttft)
            for a, b in zip(token_times, token_times[1:]):
                self.itl.observe(b - a)
            if e2e is not None:
                self.e2e.observe(e2e)

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []
            for series in (
                self.http_requests,
                self.requests,
                self.prompt_tokens,
                self.generation_tokens,
                self.cached_tokens,
                self.rejected,
                self.ttft,
                self.itl,
                self.e2e,
            ):
                lines += series.render()
        for g in self.gauges:
            lines += g.render()
        return "\n".join(lines) + "\n"
