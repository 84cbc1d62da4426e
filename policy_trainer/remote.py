"""Scores and reference log-probs from the reward service, concurrently with the trainer's work.

``submit`` starts a chunk's Score and ReferenceLogProbs RPCs on worker threads and returns at
once, so the caller generates the next chunk meanwhile (NeMo-Aligner's futures pattern);
``collect`` blocks for the results and counts the blocked time as ``wait_seconds``.

Retries, the retry budget, waiting for SERVING and splitting by the server's limits are the
client's (`reward_server.client.RewardClient`, built with ``budget_seconds`` from
``server.retry_budget_seconds``). What is left here is the trainer's failure policy: a call that
still fails with UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED (the budget is spent) is
``ServerUnavailableError``; INVALID_ARGUMENT / INTERNAL on a batch are retried item by item and
the items that still fail come back as NaN scores / None log-probs (masked out by the trainer,
never replaced by zero); anything else (FAILED_PRECONDITION, UNAUTHENTICATED, ...) is
``ServerRejectedError``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from policy_trainer.config import RewardServiceConfig
from reward_server.client import (
    PER_ITEM,
    RETRYABLE,
    RewardClient,
    RewardServiceError,
    batch_or_per_item,
)

R = TypeVar("R")
log = logging.getLogger(__name__)

UNAVAILABLE = RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
"""Codes left when the client gave up retrying (or was closed): the server is not there."""


class ServerUnavailableError(RuntimeError):
    """The server stayed unreachable (or overloaded) for the whole retry budget."""


class ServerRejectedError(RuntimeError):
    """The server refused the work for a reason retrying cannot fix."""


class ModelVersionChangedError(ServerRejectedError):
    """The server answers with another model version than the run pinned at start (a reload or
    a rolling update changed the reward or reference model under the run)."""


VERSION_MISMATCH = "model version mismatch"
"""How the server's FAILED_PRECONDITION message for a pinned version starts."""
VERSIONS_FILE = "model_versions.json"
"""The run directory's record of the model versions the run pinned."""


RewardInput = tuple[str, str] | list[dict[str, str]]
"""What the reward model scores: (prompt, completion), or a whole conversation whose last
message is the response."""


def _completion(item: RewardInput) -> str:
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
        cfg: RewardServiceConfig,
        temperature: float,
        tokenizer_fingerprint: str | None,
        *,
        workers: int = 4,
    ):
        self.client, self.cfg, self.temperature = client, cfg, temperature
        self.fingerprint = tokenizer_fingerprint
        self.score_fingerprint = ""
        """Set (by `decide_score_input`) to the policy's fingerprint when the reward model shares
        its tokenizer: Score then gets the policy's token ids instead of text."""
        self.score_version = ""
        """The reward model's (combination's) pinned version, sent with every Score ("" = none)."""
        self.ref_version = ""
        """The reference model's pinned version, sent with every ReferenceLogProbs."""
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-rpc")
        self.wait_seconds = 0.0
        self._lock = threading.Lock()
        self.failed_items = 0
        self.members: tuple[str, ...] = ()
        """The reward combination's members, when it is one: each scored item's member scores
        (its ``head_scores``) are kept for the run's telemetry (`pop_member_scores`)."""
        self._member_rows: list[tuple[float, ...]] = []

    # ------------------------------------------------------------------ public
    def submit(
        self,
        items: list[RewardInput],
        token_ids: list[list[int]],
        response_starts: list[int],
        reward_ids: list[list[int] | None] | None = None,
    ) -> ChunkRPCs:
        """Start both RPCs of a chunk; returns immediately. `reward_ids`: each item as the policy's
        token ids (None where it has none), sent to Score instead of the text when
        `score_fingerprint` is set."""
        return ChunkRPCs(
            scores=self.pool.submit(self._scores, items, reward_ids),
            ref_logprobs=self.pool.submit(self._ref_logprobs, token_ids, response_starts),
        )

    def submit_scores(self, items: list[RewardInput]) -> Future:
        """Start one Score call for ``items`` (all of them in one request unless the server's
        limit splits it); returns at once (best-of-n sends a prompt's n completions so)."""
        return self.pool.submit(self._scores, items)

    def collect_scores(self, fut: Future) -> np.ndarray:
        """Block for the scores of `submit_scores` ([n] float32, NaN where missing)."""
        t0 = time.perf_counter()
        try:
            return fut.result()
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def collect(self, rpcs: ChunkRPCs) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Block for a chunk's results: (scores [n] float32 with NaN where missing, log-probs)."""
        t0 = time.perf_counter()
        try:
            scores = rpcs.scores.result()
            refs = rpcs.ref_logprobs.result()
        finally:
            self.wait_seconds += time.perf_counter() - t0
        return scores, refs

    def pop_member_scores(self) -> list[tuple[float, ...]]:
        """The member scores of the items scored since the last call (one tuple per item, in
        the order of `members`; empty unless `members` is set)."""
        with self._lock:
            rows, self._member_rows = self._member_rows, []
        return rows

    def pop_wait_seconds(self) -> float:
        """Blocked time since the last call."""
        w, self.wait_seconds = self.wait_seconds, 0.0
        return w

    def close(self) -> None:
        """Stop: queued RPCs are cancelled; calls in flight end when the client is closed."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ workers
    def _call(self, fn: Callable[[], R], what: str) -> R:
        """``fn()``, with the client's errors mapped to the trainer's (PER_ITEM ones re-raised)."""
        try:
            return fn()
        except RewardServiceError as e:
            if e.code in PER_ITEM:
                raise
            if e.code == grpc.StatusCode.FAILED_PRECONDITION and VERSION_MISMATCH in e.details:
                raise ModelVersionChangedError(
                    f"{what}: the reward server at {self.cfg.address} no longer serves the model "
                    f"version this run pinned at start ({e.details}); a reload or a rolling "
                    f"update changed the model. Resume (--resume) against a server that serves "
                    f"the versions in {VERSIONS_FILE}, or start a new run for the new version"
                ) from None
            if e.code in UNAVAILABLE:
                raise ServerUnavailableError(
                    f"{what}: the reward server at {self.cfg.address} did not answer within the "
                    f"retry budget server.retry_budget_seconds={self.cfg.retry_budget_seconds:g} "
                    f"(last error {e.code.name}: {e.details})"
                ) from None
            raise ServerRejectedError(
                f"{what}: the reward server at {self.cfg.address} refused the request "
                f"({e.code.name}: {e.details})"
            ) from None

    def _batch_or_per_item(
        self, n: int, call: Callable[[slice], list[R]], what: str
    ) -> list[R | None]:
        """All n items in one call (the client splits it by the server's limit); if the server
        rejects it as a whole, item by item, with None for the items it still rejects
        (`reward_server.client.batch_or_per_item`)."""
        out = batch_or_per_item(n, lambda sl: self._call(lambda: call(sl), what), what)
        if out.all_rejected:
            # every item of a batch refused: the server, not the items, is the problem
            first = next(iter(out.rejected.values()))
            raise ServerRejectedError(
                f"{what}: the reward server at {self.cfg.address} rejected every item of a "
                f"batch ({first.code.name}: {first.details})"
            )
        with self._lock:
            self.failed_items += len(out.rejected)
        return out.results

    def _score_ids(self, ids: list[list[int]], *, model: str, model_version: str) -> list[Any]:
        return self.client.score_ids(
            ids,
            tokenizer_fingerprint=self.score_fingerprint,
            model=model,
            model_version=model_version,
        )

    def _scores(
        self, items: list[RewardInput], reward_ids: list[list[int] | None] | None = None
    ) -> np.ndarray:
        # An empty completion (the response was only EOS) is not scoreable text: the server
        # rejects it, so it is not sent and stays NaN (masked out) instead of failing a batch.
        # The same items are skipped whether text or token ids are sent.
        nonempty = [i for i, it in enumerate(items) if _completion(it).strip()]
        if self.score_fingerprint and reward_ids is not None:
            as_ids = [i for i in nonempty if reward_ids[i] is not None]
        else:
            as_ids = []
        sent_ids = set(as_ids)
        plain = [i for i in nonempty if isinstance(items[i], tuple) and i not in sent_ids]
        chat = [i for i in nonempty if not isinstance(items[i], tuple) and i not in sent_ids]
        scores = np.full(len(items), np.nan, dtype=np.float32)
        model = self.cfg.reward_model
        calls: list[tuple[list[int], list[Any], Callable[..., list[Any]]]] = [
            (plain, [items[i] for i in plain], self.client.score),
            (chat, [items[i] for i in chat], self.client.score_messages),
            (as_ids, [reward_ids[i] for i in as_ids] if as_ids else [], self._score_ids),
        ]
        members = self.members
        rows: list[tuple[float, ...]] = []
        for idx, sub, method in calls:
            if not idx:
                continue
            results = self._batch_or_per_item(
                len(sub),
                lambda sl, sub=sub, method=method: method(
                    sub[sl], model=model, model_version=self.score_version
                ),
                "Score",
            )
            for i, res in zip(idx, results, strict=True):
                if res is None:
                    continue
                value = res.normalized_score if self.cfg.use_normalized_score else res.score
                scores[i] = np.nan if value is None else value
                if members:
                    rows.append(tuple(res.head_scores.get(m, np.nan) for m in members))
        if rows:
            with self._lock:
                self._member_rows.extend(rows)
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
                model_version=self.ref_version,
            )

        refs = self._batch_or_per_item(len(token_ids), call, "ReferenceLogProbs")
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


def open_client(cfg: RewardServiceConfig) -> tuple[RewardClient, Any]:
    """A client of ``cfg.address`` once the server reports SERVING, and its GetServerInfo;
    ``ServerUnavailableError`` when it does not within ``cfg.wait_ready_seconds``."""
    import os

    client = RewardClient(
        cfg.address,
        timeout=cfg.timeout,
        max_retries=cfg.max_retries,
        budget_seconds=cfg.retry_budget_seconds,
        tls_ca=cfg.tls_ca,
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        token=os.environ.get(cfg.token_env) or None,
    )
    try:
        client.wait_until_ready(timeout=cfg.wait_ready_seconds)
        info = client.server_info()
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable server"
        client.close()
        raise ServerUnavailableError(
            f"the reward server at {cfg.address} is not ready after {cfg.wait_ready_seconds:g}s: {e}"
        ) from None
    return client, info


def check_reward_model(info: Any, cfg: RewardServiceConfig) -> str:
    """The reward model (or combination) name the run scores with; ServerRejectedError when the
    server does not serve it."""
    by_name = {m.name: m for m in info.models}
    rm_name = cfg.reward_model or info.default_reward_model
    if not rm_name or rm_name not in by_name:
        raise ServerRejectedError(
            f"the server at {cfg.address} serves no reward model {rm_name!r}; it has {sorted(by_name)}"
        )
    if cfg.use_normalized_score and not by_name[rm_name].has_normalization:
        raise ServerRejectedError(
            f"server.use_normalized_score: reward model {rm_name!r} has no normalization statistics"
        )
    return rm_name


def check_reference(info: Any, cfg: RewardServiceConfig, fingerprint: str) -> str:
    """The reference model's name, after checking that it exists, is a reference model and (with
    ``cfg.check_fingerprint``) shares the policy's vocabulary; else ServerRejectedError."""
    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

    by_name = {m.name: m for m in info.models}
    ref_name = cfg.reference_model or info.default_reference_model
    if not ref_name or ref_name not in by_name:
        raise ServerRejectedError(
            f"the server at {cfg.address} serves no reference model {ref_name!r}; it has "
            f"{sorted(by_name)} (start it with --reference-model)"
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
    return ref_name


def reward_members(info: Any, name: str) -> list[Any]:
    """The ModelInfo of reward model `name`, or of each member of a combination."""
    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

    by_name = {m.name: m for m in info.models}
    m = by_name[name]
    if m.role != pb.MODEL_ROLE_REWARD_COMBINATION:
        return [m]
    return [by_name[h] for h in m.heads if h in by_name]


def combination_members(info: Any, cfg: RewardServiceConfig) -> tuple[str, ...]:
    """The member names of the run's reward model when it is a combination, else ()."""
    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

    name = cfg.reward_model or info.default_reward_model
    by_name = {m.name: m for m in info.models}
    m = by_name.get(name)
    if m is None or m.role != pb.MODEL_ROLE_REWARD_COMBINATION:
        return ()
    return tuple(m.heads)


def reward_fingerprint(info: Any, name: str) -> str:
    """The tokenizer fingerprint of reward model `name`; of a combination, its members' common
    fingerprint ("" when they differ: token ids cannot be sent to it)."""
    fps = {m.tokenizer_fingerprint for m in reward_members(info, name)}
    return str(fps.pop()) if len(fps) == 1 else ""


def decide_score_input(
    info: Any, cfg: RewardServiceConfig, policy_fingerprint: str
) -> tuple[str, str, str]:
    """Decided once at start: ``("token_ids" | "text", reward model's fingerprint, reason)``.
    Token ids when ``cfg.score_token_ids`` and the reward model (every member of a combination)
    has the policy's tokenizer fingerprint: the reward model then reads exactly the generated
    tokens, with no decode/re-encode drift and no tokenisation on the server."""
    name = cfg.reward_model or info.default_reward_model
    fp = reward_fingerprint(info, name)
    if not cfg.score_token_ids:
        return "text", fp, "server.score_token_ids is false"
    if not fp:
        return "text", fp, f"the members of {name!r} have different tokenizers"
    if fp != policy_fingerprint:
        return (
            "text",
            fp,
            f"reward model {name!r} has another tokenizer ({fp} != {policy_fingerprint})",
        )
    if any(m.input_format == "pair" for m in reward_members(info, name)):
        return "text", fp, f"reward model {name!r} reads text pairs (input_format pair)"
    return "token_ids", fp, f"reward model {name!r} shares the policy's tokenizer ({fp})"


def check_server(info: Any, cfg: RewardServiceConfig, fingerprint: str) -> None:
    """Check at start that the named models exist with the right roles and that the reference
    model shares the policy's vocabulary."""
    check_reference(info, cfg, fingerprint)
    check_reward_model(info, cfg)


def served_versions(info: Any, cfg: RewardServiceConfig, roles: tuple[str, ...]) -> dict[str, Any]:
    """The versions the server now serves of the models a run uses (`roles`: "reward",
    "reference"): ``{"reward": {"name", "version", "members": {name: version}}, "reference":
    {"name", "version"}}``; members only for a combination."""
    by_name = {m.name: m for m in info.models}
    out: dict[str, Any] = {}
    if "reward" in roles:
        name = cfg.reward_model or info.default_reward_model
        entry: dict[str, Any] = {"name": name, "version": by_name[name].model_version}
        members = reward_members(info, name)
        if len(members) > 1 or members[0].name != name:
            entry["members"] = {m.name: m.model_version for m in members}
        out["reward"] = entry
    if "reference" in roles:
        name = cfg.reference_model or info.default_reference_model
        out["reference"] = {"name": name, "version": by_name[name].model_version}
    return out


def pin_model_versions(
    info: Any,
    cfg: RewardServiceConfig,
    path: Path,
    *,
    resume: bool,
    write: bool,
    roles: tuple[str, ...] = ("reward", "reference"),
) -> dict[str, str]:
    """Pin, at start, the version of every model the run uses: recorded in `path` (the run
    directory's `VERSIONS_FILE`; written by rank 0: `write`), and returned as ``{role: version}`` for the requests
    (empty when ``cfg.pin_model_versions`` is false: then only recorded). On `resume` the
    recorded versions are the pins, and a server that now serves another version is
    `ModelVersionChangedError` before any work."""
    current = served_versions(info, cfg, roles)
    if resume and path.is_file():
        recorded = json.loads(path.read_text())
        for role, entry in current.items():
            old = recorded.get(role)
            if cfg.pin_model_versions and old and old["version"] != entry["version"]:
                raise ModelVersionChangedError(
                    f"--resume: this run pinned {role} model {old['name']!r} version "
                    f"{old['version']} ({path}), but the server at {cfg.address} serves "
                    f"{entry['name']!r} version {entry['version']}. Point server.address to a "
                    "server that serves the pinned version, or start a new run (another "
                    "run.output_dir) to train against the new one"
                )
        current = {**current, **{r: recorded[r] for r in current if r in recorded}}
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")
    line = ", ".join(f"{r} {e['name']!r} {e['version']}" for r, e in current.items())
    log.info("model versions %s: %s", "pinned" if cfg.pin_model_versions else "recorded", line)
    if not cfg.pin_model_versions:
        return {}
    return {role: entry["version"] for role, entry in current.items()}
