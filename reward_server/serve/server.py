"""Server lifecycle: bind (gRPC, and HTTP with --http-port), load, warm up, report SERVING,
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.config import ServerConfig
from reward_server.engine.engine import Engine
from reward_server.serve.auth import HEALTH_METHODS, BearerAuthInterceptor, server_credentials
from reward_server.serve.http import HttpDoor
from reward_server.serve.metrics import ServerMetrics
from reward_server.serve.servicer import AdminServicer, RewardServicer, add_to_server
from reward_server.serve.tenants import TenantResolver

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["AdminService"]
ADMIN_METHODS = tuple(f"/{ADMIN_SERVICE.full_name}/{m.name}" for m in ADMIN_SERVICE.methods)
"""AdminService's methods: the scoring tokens' interceptor passes them to `AdminServicer`,
which accepts only the admin tokens."""


def grpc_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Channel options: message limits and connection age (clients re-resolve DNS)."""
    size = cfg.max_message_mb << 20
    opts = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    if cfg.max_connection_age_s:
        opts += [
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(cfg.grace_seconds, 5) * 1000)),
        ]
    return opts


class RewardServer:
    """One running service: gRPC server, health, reflection, metrics, engine, and with
    `http_port` the HTTP/JSON door on the same event loop and engine."""

    def __init__(
        self, cfg: ServerConfig, reread_config: Callable[[], ServerConfig] | None = None
    ) -> None:
        """`reread_config`: how SIGHUP reads the configuration again (the --config file and the
        flags; None when the server was started without a file)."""
        self.cfg = cfg
        self.reread_config = reread_config
        self._sighup: asyncio.Task | None = None
        self.metrics = ServerMetrics()
        self.engine = Engine(cfg, self.metrics)
        self.tenants = TenantResolver(cfg.named_auth_tokens(), cfg.max_metadata_tenants)
        self.servicer = RewardServicer(self.engine, self.metrics, self.tenants)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self._stop = asyncio.Event()
        interceptors = []
        tokens = cfg.auth_tokens()
        admin_tokens = cfg.admin_tokens()
        if tokens:
            opened = (HEALTH_METHODS if cfg.open_health else ()) + ADMIN_METHODS
            interceptors.append(BearerAuthInterceptor(tokens, opened))
        self.server = grpc.aio.server(options=grpc_options(cfg), interceptors=interceptors)
        add_to_server(self.servicer, self.server)
        if admin_tokens:  # off unless configured: unregistered, every call is UNIMPLEMENTED
            self.admin = AdminServicer(self.engine, self.servicer, admin_tokens)
            add_to_server(self.admin, self.server, "AdminService")
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            SERVICE_NAME,
            *((ADMIN_SERVICE.full_name,) if admin_tokens else ()),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        self.auth_enabled = bool(tokens)
        self.http = HttpDoor(cfg, self.servicer, self.metrics) if cfg.http_port else None

    async def _set_health(self, status: int) -> None:
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, status)

    async def start(self) -> None:
        """Bind and start answering (health NOT_SERVING), then load, warm up and go SERVING."""
        cfg = self.cfg
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            self.port = self.server.add_secure_port(
                addr, server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            )
        else:
            self.port = self.server.add_insecure_port(addr)
        await self.server.start()
        log.info(
            "listening on %s:%d (%s%s); loading models",
            cfg.host,
            self.port,
            "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext",
            ", bearer-token auth" if self.auth_enabled else "",
        )
        if self.http is not None:
            await self.http.start()
        if cfg.metrics_port:
            self.metrics.serve_http(cfg.metrics_port, cfg.host)
            log.info("metrics on http://%s:%d/metrics", cfg.host, cfg.metrics_port)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.load)
        self.engine.start()
        if cfg.warmup:
            await self.engine.warmup()
        self.servicer.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "SERVING %d model(s) on %s:%d after %.1fs (device %s, max_batch_tokens %d)",
            len(self.engine.batchers),
            cfg.host,
            self.port,
            time.monotonic() - t0,
            self.engine.device,
            self.engine.max_batch_tokens,
        )

    async def close_http(self) -> None:
        """Stop the HTTP door (if any): it answers 503 while draining, then closes."""
        if self.http is not None:
            await self.http.stop()

    def on_sighup(self) -> None:
        """SIGHUP: re-read the configuration and reload the models whose source or content
        changed (`reload_changed`), in a task; a SIGHUP during one is queued after it."""
        if not self.servicer.ready or self.servicer.draining:
            log.warning("SIGHUP ignored: the server is starting or draining")
            return
        previous = self._sighup

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await self.reload_changed()

        self._sighup = asyncio.get_running_loop().create_task(run(), name="sighup-reload")

    async def reload_changed(self) -> list[str]:
        """Re-read the configuration (when started from a --config file; else keep the current
        sources) and reload every reward and reference model whose source changed or whose
        files now hash to another version. Errors are logged, never raised: a failed reload
        leaves its old version serving. Returns one line per model (also logged)."""
        sources = {**self.cfg.reward_models, **self.cfg.reference_models}
        if self.reread_config is not None:
            try:
                new = self.reread_config()
            except Exception as exc:  # ConfigError, OSError, YAML errors: keep everything
                log.error("SIGHUP: the configuration cannot be read, nothing reloaded: %s", exc)
                return [f"error: {exc}"]
            wanted = {**new.reward_models, **new.reference_models}
            added, removed = sorted(set(wanted) - set(sources)), sorted(set(sources) - set(wanted))
            if added or removed:
                log.warning(
                    "SIGHUP: models added %s / removed %s need a restart; reloading the others",
                    added,
                    removed,
                )
            sources = {n: wanted[n] for n in sources if n in wanted}
        lines = []
        for name, source in sources.items():
            try:
                r = await self.engine.reload(name, source)
                line = f"{name}: {r.status} {r.old_version} -> {r.new_version} ({r.source})"
                log.info("SIGHUP: %s", line)
            except Exception as exc:  # ServiceError from a failed load: the old one serves
                line = f"{name}: reload failed: {exc}"
                log.error("SIGHUP: %s", line)
            lines.append(line)
        return lines

    def request_stop(self) -> None:
        """Begin the drain (signal handlers call this)."""
        self._stop.set()

    async def wait_and_drain(self) -> None:
        """Wait for a stop request, then drain: NOT_SERVING, refuse new work with UNAVAILABLE, let
        in-flight work finish within grace_seconds, stop."""
        await self._stop.wait()
        grace = self.cfg.grace_seconds
        end = time.monotonic() + grace
        log.info("draining: health NOT_SERVING, refusing new work, grace %.1fs", grace)
        await self.health.enter_graceful_shutdown()
        self.servicer.draining = True
        self.engine.close()
        while self.servicer.inflight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.02)
        if self.servicer.inflight:
            log.warning(
                "grace period over with %d request(s) still in flight", self.servicer.inflight
            )
        if self._sighup is not None:
            self._sighup.cancel()
        await self.server.stop(max(0.0, end - time.monotonic()))
        await self.close_http()
        await self.engine.stop()
        log.info("stopped")


async def serve(cfg: ServerConfig, reread_config: Callable[[], ServerConfig] | None = None) -> int:
    """Run until SIGTERM/SIGINT, reloading changed models on SIGHUP; return the exit code."""
    srv = RewardServer(cfg, reread_config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.request_stop)
    loop.add_signal_handler(signal.SIGHUP, srv.on_sighup)
    try:
        await srv.start()
    except BaseException:
        await srv.server.stop(0)
        await srv.close_http()
        raise
    await srv.wait_and_drain()
    return 0
