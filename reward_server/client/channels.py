"""Addresses, channel options (load balancing, gRPC's own retries), TLS and the bearer token."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc

from reward_server.client.retry import RetryPolicy

METHODS = ("Score", "ReferenceLogProbs", "GetServerInfo", "GetStats")
"""The RewardService RPCs the client calls."""


def split_targets(address: str) -> list[str]:
    """``"h1:p,h2:p"`` -> two targets; ``dns:///...`` and other URIs stay one target."""
    address = address.strip()
    if not address:
        raise ValueError("empty server address")
    if "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
        return [address]
    return [a.strip() for a in address.split(",") if a.strip()]


def service_config(policy: RetryPolicy) -> dict[str, Any]:
    """round_robin over every address the target resolves to, plus gRPC's retries where the
    policy leaves them to the channel (https://github.com/grpc/grpc/blob/master/doc/service_config.md)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    retry = policy.service_config_retry()
    if retry is not None:
        names = [{"service": "rlhf.v1.RewardService", "method": m} for m in METHODS]
        config["methodConfig"] = [{"name": names, "retryPolicy": retry}]
    return config


def channel_options(policy: RetryPolicy, max_message_mb: int = 64) -> list[tuple[str, Any]]:
    """Message limits, the service config, and a retry buffer as large as a message (gRPC does
    not retry a call whose request exceeds ``grpc.per_rpc_retry_buffer_size``, 256 KiB by
    default)."""
    size = max_message_mb << 20
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.per_rpc_retry_buffer_size", size),
        ("grpc.service_config", json.dumps(service_config(policy))),
    ]


def credentials(
    tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (mutual TLS when a client certificate is given), or None."""
    if not (tls_ca or tls_cert):
        return None

    def read(p: str | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the bearer token (``token``, else env ``RLHF_AUTH_TOKEN``)."""
    token = token if token is not None else os.environ.get("RLHF_AUTH_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else ()
