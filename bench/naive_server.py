"""The naive baseline: one forward per request, no batching across requests.

This is how several RLHF frameworks serve reward models today (OpenRLHF's
`openrlhf/cli/serve_rm.py`, https://github.com/OpenRLHF/OpenRLHF, runs one forward per HTTP
request). It speaks the same wire API
(`Score` only) so the same load generator drives it, and uses the same runner code
(`RewardRunner.encode` and `.forward`), so the only difference from the real server is the
batching: each request's items are padded together, in arrival order, and forwarded alone on one
worker thread.

    python -m bench.naive_server --model DIR --port 50070
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.models.reward import ScoreInput
from reward_server.serve.metrics import ServerMetrics

log = logging.getLogger("bench.naive_server")


class NaiveServicer(pb_grpc.RewardServiceServicer):
    """Score: tokenise, one padded forward of this request's items, answer."""

    def __init__(self, runner, metrics: ServerMetrics, workers: int = 1) -> None:
        self.runner = runner
        self.metrics = metrics
        self.worker = ThreadPoolExecutor(workers, thread_name_prefix="forward")

    def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        items = [ScoreInput(it.prompt, it.completion) for it in request.items]
        encoded = self.runner.encode(items, "right")
        t0 = time.perf_counter()
        values = self.runner.forward(encoded)
        lengths = [len(e.input_ids) for e in encoded]
        # the same counters as the real server, so benchmarks read both alike
        self.metrics.on_batch(
            "rm", len(lengths), sum(lengths), len(lengths) * max(lengths), time.perf_counter() - t0
        )
        resp = pb.ScoreResponse(model=self.runner.name)
        for enc, v in zip(encoded, values, strict=True):
            resp.scores.add(score=self.runner.combine(v), num_tokens=len(enc.input_ids))
        return resp

    async def Score(self, request, context):  # noqa: N802 - gRPC method name
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, self._score, request)


async def serve(
    model: str,
    host: str,
    port: int,
    backend: str,
    metrics_port: int,
    workers: int = 1,
    threads: int = 0,
    device: str = "cpu",
) -> None:
    """Load, report SERVING, serve until cancelled. `workers` forwards run at once (one request
    each), with `threads` intra-op threads (0 = default). On CUDA the model runs in the dtype the
    real server picks by default (bfloat16 where supported)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if backend == "onnx":
        from reward_server.models.onnx_reward import OnnxRewardRunner

        runner = OnnxRewardRunner(
            "naive",
            model,
            device=device,
            max_input_tokens=0,
            head_combine="",
            intra_op_threads=threads,
        )
    else:
        from reward_server.devices import resolve_dtype
        from reward_server.models.reward import RewardRunner

        runner = RewardRunner("naive", model, device=device, dtype=resolve_dtype("auto", device))
    runner.forward(runner.warmup_items(2048, 64))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    metrics = ServerMetrics()
    if metrics_port:
        metrics.serve_http(metrics_port, host)
    pb_grpc.add_RewardServiceServicer_to_server(NaiveServicer(runner, metrics, workers), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("naive server SERVING on %s:%d", host, port)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="reward model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0 = off)")
    p.add_argument("--workers", type=int, default=1, help="forwards at once (one request each)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(
        serve(a.model, a.host, a.port, a.backend, a.metrics_port, a.workers, a.threads, a.device)
    )


if __name__ == "__main__":
    main()
