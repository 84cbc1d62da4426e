"""Prometheus metrics of the service (served on --metrics-port). Implements `BatchObserver`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LAT = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class ServerMetrics:
    """All metrics in one registry (so several servers in one process do not collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "reward_server_requests", "RPCs by method and status code", ["rpc", "code"], registry=r
        )
        self.items = Counter(
            "reward_server_items", "Items (or sequences) received, by RPC", ["rpc"], registry=r
        )
        self.queue_depth = Gauge(
            "reward_server_queue_depth", "Items waiting in the batcher queue", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "reward_server_batch_size",
            "Items per forward",
            ["model"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.batch_tokens = Histogram(
            "reward_server_batch_tokens",
            "Padded tokens per forward",
            ["model"],
            registry=r,
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
        )
        self.real_tokens = Counter(
            "reward_server_real_tokens", "Unpadded tokens forwarded", ["model"], registry=r
        )
        self.padded_tokens = Counter(
            "reward_server_padded_tokens", "Padded tokens forwarded", ["model"], registry=r
        )
        self.padding_eff = Gauge(
            "reward_server_padding_efficiency",
            "Real / padded tokens of the last forward",
            ["model"],
            registry=r,
        )
        self.forwards = Counter("reward_server_forwards", "Batches run", ["model"], registry=r)
        self.dropped = Counter(
            "reward_server_dropped_items",
            "Items dropped before the forward",
            ["model", "reason"],
            registry=r,
        )
        self.queue_time = Histogram(
            "reward_server_queue_seconds",
            "Time items wait in the queue",
            ["model"],
            registry=r,
            buckets=_LAT,
        )
        self.inference_time = Histogram(
            "reward_server_inference_seconds",
            "Forward time per batch",
            ["model"],
            registry=r,
            buckets=_LAT,
        )
        self.request_time = Histogram(
            "reward_server_request_seconds",
            "Server-side time per RPC",
            ["rpc"],
            registry=r,
            buckets=_LAT,
        )
        self.tokenize_time = Histogram(
            "reward_server_tokenize_seconds",
            "Tokenisation time per Score request",
            ["model"],
            registry=r,
            buckets=_LAT,
        )
        self.inflight = Gauge("reward_server_inflight_requests", "RPCs being handled", registry=r)

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

    def on_queue_time(self, model: str, seconds: float) -> None:
        self.queue_time.labels(model).observe(seconds)

    def on_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def on_dropped(self, model: str, reason: str, count: int) -> None:
        self.dropped.labels(model, reason).inc(count)
