"""Client library for the reward service. Imports grpcio, protobuf and numpy only (no torch).

`RewardClient` (blocking) and `AsyncRewardClient` (asyncio) are two faces of one core
(`core.Api`): the same methods, signatures and behaviour.

- every call has a deadline (``timeout`` seconds, retries included);
- UNAVAILABLE and RESOURCE_EXHAUSTED are retried with jittered exponential backoff (`RetryPolicy`):
  by gRPC within the channel for one address, on the next address for ``"h1:p,h2:p"``;
  ``dns:///name:port`` resolves to every address of the name, balanced by gRPC's round_robin
  (a headless Kubernetes Service);
- ``budget_seconds`` keeps retrying a call (DEADLINE_EXCEEDED too) in rounds of ``timeout`` until
  that much time is spent, waiting for SERVING in between when there is one address;
- batches larger than the server's advertised ``max_items_per_request`` are split and the parts
  sent concurrently; results come back in input order;
- `batch_or_per_item` / `abatch_or_per_item` (per_item.py) retry a batch the server rejected
  (INVALID_ARGUMENT, INTERNAL) item by item, for callers that would rather lose one item.

Which of this gRPC does itself: docs/ARCHITECTURE.md ("The client layer").
"""

from reward_server.client.aio import AsyncRewardClient
from reward_server.client.blocking import RewardClient
from reward_server.client.channels import split_targets
from reward_server.client.core import API, DEFAULT_CHUNK
from reward_server.client.messages import Conversation, PairLike, ScoreResult, chunks
from reward_server.client.per_item import (
    PER_ITEM,
    ItemResults,
    abatch_or_per_item,
    batch_or_per_item,
)
from reward_server.client.retry import RETRYABLE, RetryPolicy, RewardServiceError

__all__ = [
    "API",
    "DEFAULT_CHUNK",
    "PER_ITEM",
    "RETRYABLE",
    "AsyncRewardClient",
    "Conversation",
    "ItemResults",
    "PairLike",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ScoreResult",
    "abatch_or_per_item",
    "batch_or_per_item",
    "chunks",
    "split_targets",
]
