"""Scores and reference log-probs from the reward service, concurrently and with a retry budget.

``submit`` starts a chunk's Score and ReferenceLogProbs RPCs on worker threads and returns at
once, so the caller generates the next chunk meanwhile (NeMo-Aligner's futures pattern);
``collect`` blocks for the results and counts the blocked time as ``wait_seconds``.

Failure policy: UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / ABORTED are retried with
backoff until ``server.retry_budget_seconds`` is spent, then ``ServerUnavailableError``;
INVALID_ARGUMENT / INTERNAL on a batch are retried item by item and the items that still fail
come back as NaN scores / None log-probs (masked out by the trainer, never replaced by zero);
anything else (FAILED_PRECONDITION, UNAUTHENTICATED, ...) is ``ServerRejectedError``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from policy_trainer.config import ServerConfig
from reward_server.client import RewardClient, RewardServiceError

log = logging.getLogger(__name__)
R = TypeVar("R")

RETRIABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
PER_ITEM = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL}


class ServerUnavailableError(RuntimeError):
    """The server stayed unreachable (or overloaded) for the whole retry budget."""


class ServerRejectedError(RuntimeError):
    """The server refused the work for a reason retrying cannot fix."""


ScoreItem = tuple[str, str] | list[dict[str, str]]
"""(prompt, completion), or a whole conversation whose last message is the response."""


def _completion(item: ScoreItem) -> str:
    return item[1] if isinstance(item, tuple) else item[-1]["content"]


@dataclass
class ChunkRPCs:
    """The in-flight RPCs of one chunk."""

    scores: Future
    ref_logprobs: Future


class RemoteRewards:
    """Thread-pool front of a ``RewardClient`` for one trainer rank."""

    def __init__(
        self,
        client: RewardClient,
        cfg: ServerConfig,
        temperature: float,
        tokenizer_fingerprint: str | None,
        max_items_per_request: int = 0,
        workers: int = 4,
    ):
        self.client, self.cfg, self.temperature = client, cfg, temperature
        self.fingerprint = tokenizer_fingerprint
        self.max_items = max_items_per_request
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-rpc")
        self.wait_seconds = 0.0
        self._lock = threading.Lock()
        self.failed_items = 0
        self._closed = False

    # ------------------------------------------------------------------ public
    def submit(
        self, items: list[ScoreItem], token_ids: list[list[int]], response_starts: list[int]
    ) -> ChunkRPCs:
        """Start both RPCs of a chunk; returns immediately."""
        return ChunkRPCs(
            scores=self.pool.submit(self._scores, items),
            ref_logprobs=self.pool.submit(self._ref_logprobs, token_ids, response_starts),
        )

    def collect(self, rpcs: ChunkRPCs) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Block for a chunk's results: (scores [n] float32 with NaN where missing, log-probs)."""
        t0 = time.perf_counter()
        try:
            scores = rpcs.scores.result()
            refs = rpcs.ref_logprobs.result()
        finally:
            self.wait_seconds += time.perf_counter() - t0
        return scores, refs

    def pop_wait_seconds(self) -> float:
        """Blocked time since the last call."""
        w, self.wait_seconds = self.wait_seconds, 0.0
        return w

    def close(self) -> None:
        """Stop: queued RPCs are cancelled, retry loops in flight give up at their next turn."""
        self._closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ workers
    def _with_retries(self, fn: Callable[[], R], what: str) -> R:
        start = time.monotonic()
        delay = 0.25
        while True:
            try:
                return fn()
            except RewardServiceError as e:
                if e.code in RETRIABLE:
                    elapsed = time.monotonic() - start
                    if self._closed or elapsed + delay > self.cfg.retry_budget_seconds:
                        raise ServerUnavailableError(
                            f"{what}: the reward server at {self.cfg.address} did not answer for "
                            f"{elapsed:.1f}s (last error {e.code.name}: {e.details}); retry budget "
                            f"server.retry_budget_seconds={self.cfg.retry_budget_seconds:g} spent"
                        ) from None
                    log.warning(
                        "%s: %s (%s), retrying in %.2fs", what, e.code.name, e.details, delay
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, 4.0)
                    self._wait_until_serving(start + self.cfg.retry_budget_seconds)
                    continue
                if e.code in PER_ITEM:
                    raise
                raise ServerRejectedError(
                    f"{what}: the reward server at {self.cfg.address} refused the request "
                    f"({e.code.name}: {e.details})"
                ) from None

    def _wait_until_serving(self, deadline: float) -> None:
        """After a connection failure, poll the health service until SERVING (or the deadline)
        so a restarting server is not sent work before its models are loaded. Only with one
        target: with several, another replica may serve and the retry goes there."""
        if len(self.client.targets) != 1:
            return
        while time.monotonic() < deadline and not self._closed:
            left = deadline - time.monotonic()
            if self.client.health(timeout=min(2.0, max(0.1, left))) == "SERVING":
                return
            time.sleep(0.2)

    def _split(self, n: int) -> list[slice]:
        step = self.max_items if self.max_items > 0 else n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _batched_or_per_item(
        self, n: int, call: Callable[[slice], list[R]], what: str
    ) -> list[R | None]:
        out: list[R | None] = []
        for sl in self._split(n):
            try:
                out.extend(self._with_retries(lambda sl=sl: call(sl), what))
                continue
            except RewardServiceError as e:
                log.warning(
                    "%s: batch rejected (%s: %s); retrying item by item",
                    what,
                    e.code.name,
                    e.details,
                )
            errors = []
            for i in range(sl.start, sl.stop):
                try:
                    out.extend(self._with_retries(lambda i=i: call(slice(i, i + 1)), what))
                except RewardServiceError as e:
                    log.warning("%s: item %d left out (%s: %s)", what, i, e.code.name, e.details)
                    errors.append(e)
                    out.append(None)
            if len(errors) > 1 and len(errors) == sl.stop - sl.start:
                # every item of a batch refused: the server, not the items, is the problem
                raise ServerRejectedError(
                    f"{what}: the reward server at {self.cfg.address} rejected every item of a "
                    f"batch ({errors[0].code.name}: {errors[0].details})"
                )
            with self._lock:
                self.failed_items += len(errors)
        return out

    def _scores(self, items: list[ScoreItem]) -> np.ndarray:
        # An empty completion (the response was only EOS) is not scoreable text: the server
        # rejects it, so it is not sent and stays NaN (masked out) instead of failing a batch.
        nonempty = [i for i, it in enumerate(items) if _completion(it).strip()]
        plain = [i for i in nonempty if isinstance(items[i], tuple)]
        chat = [i for i in nonempty if not isinstance(items[i], tuple)]
        scores = np.full(len(items), np.nan, dtype=np.float32)
        model = self.cfg.reward_model
        for idx, method in ((plain, self.client.score), (chat, self.client.score_messages)):
            if not idx:
                continue
            sub = [items[i] for i in idx]
            results = self._batched_or_per_item(
                len(sub), lambda sl, sub=sub, method=method: method(sub[sl], model=model), "Score"
            )
            for i, res in zip(idx, results, strict=True):
                if res is None:
                    continue
                value = res.normalized_score if self.cfg.use_normalized_score else res.score
                scores[i] = np.nan if value is None else value
        return scores

    def _ref_logprobs(
        self, token_ids: list[list[int]], starts: list[int]
    ) -> list[np.ndarray | None]:
        def call(sl: slice) -> list[np.ndarray]:
            return self.client.reference_logprobs(
                token_ids[sl],
                starts[sl],
                temperature=self.temperature,
                model=self.cfg.reference_model,
                tokenizer_fingerprint=self.fingerprint,
            )

        refs = self._batched_or_per_item(len(token_ids), call, "ReferenceLogProbs")
        for i, (r, ids, s) in enumerate(zip(refs, token_ids, starts, strict=True)):
            if r is not None and len(r) != len(ids) - s:
                raise ServerRejectedError(
                    f"ReferenceLogProbs: sequence {i} got {len(r)} log-probs, expected {len(ids) - s}"
                )
        return refs


def describe_server(info: Any) -> str:
    """One line about the server (for the log)."""
    models = ", ".join(f"{m.name}({m.role})" for m in info.models)
    return f"reward server {info.version}: {models}"


def check_server(info: Any, cfg: ServerConfig, fingerprint: str) -> int:
    """Check at start that the named models exist with the right roles and that the reference
    model shares the policy's vocabulary; returns max_items_per_request (0 = no limit)."""
    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

    by_name = {m.name: m for m in info.models}
    ref_name = cfg.reference_model or info.default_reference_model
    rm_name = cfg.reward_model or info.default_reward_model
    if not ref_name or ref_name not in by_name:
        raise ServerRejectedError(
            f"the server at {cfg.address} serves no reference model {ref_name!r}; it has "
            f"{sorted(by_name)} (start it with --reference-model)"
        )
    if not rm_name or rm_name not in by_name:
        raise ServerRejectedError(
            f"the server at {cfg.address} serves no reward model {rm_name!r}; it has {sorted(by_name)}"
        )
    ref = by_name[ref_name]
    if ref.role != pb.MODEL_ROLE_REFERENCE:
        raise ServerRejectedError(f"server model {ref_name!r} is not a reference model")
    if (
        cfg.check_fingerprint
        and ref.tokenizer_fingerprint
        and ref.tokenizer_fingerprint != fingerprint
    ):
        raise ServerRejectedError(
            f"the reference model {ref_name!r} uses another vocabulary than the policy "
            f"(fingerprint {ref.tokenizer_fingerprint} != {fingerprint}); serve the policy's "
            "initial checkpoint as the reference model"
        )
    if cfg.use_normalized_score and not by_name[rm_name].has_normalization:
        raise ServerRejectedError(
            f"server.use_normalized_score: reward model {rm_name!r} has no normalization statistics"
        )
    return int(info.max_items_per_request)
