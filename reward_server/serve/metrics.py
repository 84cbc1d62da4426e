"""Prometheus metrics of the service (served on --metrics-port). Implements `BatchObserver`."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from reward_server.serve.telemetry import SCORE_BUCKETS, Telemetry

_LAT = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
_ITEMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServerMetrics:
    """All metrics in one registry (so several servers in one process do not collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"reward_server_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"reward_server_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, label: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"reward_server_{name}", doc, [label], registry=r, buckets=buckets)

        self.requests = counter("requests", "RPCs by method and status code", "rpc", "code")
        self.items = counter("items", "Items (or sequences) received, by RPC", "rpc")
        self.queue_depth = gauge("queue_depth", "Items waiting in the batcher queue", "model")
        self.batch_size = histogram("batch_size", "Items per forward", "model", _ITEMS)
        self.batch_tokens = histogram("batch_tokens", "Padded tokens per forward", "model", _TOKENS)
        self.real_tokens = counter("real_tokens", "Unpadded tokens forwarded", "model")
        self.padded_tokens = counter("padded_tokens", "Padded tokens forwarded", "model")
        self.padding_eff = gauge(
            "padding_efficiency", "Real / padded tokens of the last forward", "model"
        )
        self.forwards = counter("forwards", "Batches run", "model")
        self.dropped = counter(
            "dropped_items", "Items dropped before the forward", "model", "reason"
        )
        self.queue_time = histogram("queue_seconds", "Time items wait in the queue", "model", _LAT)
        self.inference_time = histogram(
            "inference_seconds", "Forward time per batch", "model", _LAT
        )
        self.request_time = histogram("request_seconds", "Server-side time per RPC", "rpc", _LAT)
        self.tokenize_time = histogram(
            "tokenize_seconds", "Tokenisation time per Score request", "model", _LAT
        )
        self.inflight = gauge("inflight_requests", "RPCs being handled")
        self.prefix_saved = counter(
            "prefix_tokens_saved",
            "Prompt tokens not recomputed thanks to prefix sharing ((k - 1) x prefix per group)",
            "model",
        )
        self.prefix_group_size = histogram(
            "prefix_group_size", "Items per shared-prefix group in a forward", "model", _ITEMS
        )
        # per tenant (docs/API.md, "Tenants"): label values bounded by the token file's names,
        # or by --max-metadata-tenants (then "other") with auth off
        self.tenant_requests = counter(
            "tenant_requests", "RPCs by tenant and status code", "tenant", "code"
        )
        self.tenant_items = counter("tenant_items", "Items (or sequences) received", "tenant")
        self.tenant_tokens = counter(
            "tenant_tokens", "Tokens forwarded (the batcher's cost)", "model", "tenant"
        )
        self.tenant_queue_time = Histogram(
            "reward_server_tenant_queue_seconds",
            "Time a tenant's items wait in the queue",
            ["model", "tenant"],
            registry=r,
            buckets=_LAT,
        )

    def add_telemetry(self, telemetry: Telemetry) -> None:
        """Export the reward-hacking telemetry (`TelemetryCollector`): `reward_server_scores`,
        a histogram of every score by model and tenant, and the sliding windows' figures as
        gauges, all computed at scrape time from the telemetry's windows."""
        self.registry.register(TelemetryCollector(telemetry))

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP."""
        start_http_server(port, addr=host, registry=self.registry)

    # BatchObserver ------------------------------------------------------------
    def on_batch(
        self, model: str, items: int, real_tokens: int, padded_tokens: int, seconds: float
    ) -> None:
        self.batch_size.labels(model).observe(items)
        self.batch_tokens.labels(model).observe(padded_tokens)
        self.real_tokens.labels(model).inc(real_tokens)
        self.padded_tokens.labels(model).inc(padded_tokens)
        self.padding_eff.labels(model).set(real_tokens / max(1, padded_tokens))
        self.forwards.labels(model).inc()
        self.inference_time.labels(model).observe(seconds)

    def on_prefix_groups(self, model: str, saved_tokens: int, sizes: list[int]) -> None:
        """One forward's shared-prefix groups (called from a forward's worker thread)."""
        self.prefix_saved.labels(model).inc(saved_tokens)
        for n in sizes:
            self.prefix_group_size.labels(model).observe(n)

    def on_queue_time(self, model: str, seconds: float) -> None:
        self.queue_time.labels(model).observe(seconds)

    def on_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def on_dropped(self, model: str, reason: str, count: int) -> None:
        self.dropped.labels(model, reason).inc(count)

    def on_tenant_batch(
        self, model: str, tenant: str, items: int, real_tokens: int, queue_seconds: list[float]
    ) -> None:
        self.tenant_tokens.labels(model, tenant).inc(real_tokens)
        hist = self.tenant_queue_time.labels(model, tenant)
        for s in queue_seconds:
            hist.observe(s)


_WINDOW_GAUGES = (
    ("score_window_items", "Items in the telemetry window", lambda w: w.stats.items),
    ("score_mean", "Mean score over the telemetry window", lambda w: w.stats.mean),
    ("score_std", "Standard deviation of the scores over the window", lambda w: w.stats.std),
    (
        "score_length_correlation",
        "Pearson correlation of score with length (tokens) over the window",
        lambda w: w.stats.length_correlation,
    ),
    ("score_baseline_mean", "Mean score of the first full window", lambda w: w.baseline_mean),
    ("score_baseline_std", "Score std of the first full window", lambda w: w.baseline_std),
    (
        "score_drift_sigma",
        "(window mean - first-window mean) / first-window std",
        lambda w: w.drift_sigma,
    ),
)


class TelemetryCollector(Collector):
    """The telemetry windows' figures, computed when Prometheus scrapes (never on the Score
    path). An undefined figure (too few items, a constant series) is left out, not NaN."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        windows = self.telemetry.stats()
        for name, doc, get in _WINDOW_GAUGES:
            fam = GaugeMetricFamily(f"reward_server_{name}", doc, labels=["model", "tenant"])
            for w in windows:
                value = float(get(w))
                if math.isfinite(value):
                    fam.add_metric([w.model, w.tenant], value)
            yield fam
        hist = HistogramMetricFamily(
            "reward_server_scores",
            "Scores returned since the start, by reward model (or combination) and tenant",
            labels=["model", "tenant"],
        )
        bounds = [*(str(b) for b in SCORE_BUCKETS), "+Inf"]
        for w in windows:
            cum, buckets = 0, []
            for bound, n in zip(bounds, w.bucket_counts, strict=True):
                cum += n
                buckets.append((bound, cum))
            hist.add_metric([w.model, w.tenant], buckets, None)
            # _count and _sum as prometheus_client's own Histogram writes them (add_metric
            # leaves them out when a bucket bound is negative, an OpenMetrics rule)
            labels = {"model": w.model, "tenant": w.tenant}
            hist.samples.append(Sample("reward_server_scores_count", labels, float(cum)))
            hist.samples.append(Sample("reward_server_scores_sum", labels, w.score_sum))
        yield hist
        fam = GaugeMetricFamily(
            "reward_server_member_rank_correlation",
            "Spearman rank correlation between two members of a combination over the window",
            labels=["model", "tenant", "member_a", "member_b"],
        )
        for w in windows:
            for (a, b), rho in w.stats.member_rank_correlations.items():
                if math.isfinite(rho):
                    fam.add_metric([w.model, w.tenant, a, b], rho)
        yield fam
