"""Remote reward functions for TRL's ``GRPOTrainer`` and ``RLOOTrainer``::

    from reward_server.integrations.trl import RemoteReward

    trainer = GRPOTrainer(model=..., reward_funcs=[RemoteReward("rm-host:50051")], ...)

The contract, as TRL 1.16 calls a custom reward function (``_calculate_rewards`` in
https://github.com/huggingface/trl/blob/v1.16.0/trl/trainer/grpo_trainer.py, the same in
rloo_trainer.py): keyword arguments ``prompts``, ``completions``, ``completion_ids``, every other
dataset column (one value per sample), ``trainer_state``, ``log_extra``, ``log_metric``; it returns
one float per completion, or None where the function does not score a sample (TRL turns it into
NaN and leaves it out of that function's mean and of the weighted sum). A callable whose
``__call__`` is ``async def`` is awaited on TRL's own event loop, next to the other async reward
functions (``is_async_callable`` in trl/trainer/utils.py). TRL logs each function's reward as
``rewards/<__name__>/mean`` and ``/std``.

Plain-text samples (prompt and completion strings) are scored as ``prompt``/``completion``;
conversational ones (lists of role/content messages) as ``messages`` = the prompt's messages
followed by the completion's, so the reward model's own chat template renders them, as TRL does
for a local reward model (``p + c``, then ``apply_chat_template``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from reward_server.client import (
    AsyncRewardClient,
    ItemResults,
    PairLike,
    RewardClient,
    RewardServiceError,
    ScoreResult,
    abatch_or_per_item,
    batch_or_per_item,
)

log = logging.getLogger("reward_server.integrations.trl")

Prompt = str | Sequence[dict[str, Any]]
"""A plain-text prompt, or chat messages (TRL's conversational format)."""


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of content blocks
    (TRL's multimodal format, {"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type", "text") == "text")


def _messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m.get("role", "")), "content": _text(m.get("content"))} for m in messages]


def score_inputs(
    prompts: Sequence[Prompt], completions: Sequence[Prompt]
) -> tuple[list[PairLike], list[int]]:
    """What to send for each sample TRL hands over, and the indices of those sent.

    A completion whose text is empty (the policy emitted only EOS) is not sent: the service
    rejects an empty completion (INVALID_ARGUMENT), so its reward is None."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    items: list[PairLike] = []
    sent: list[int] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(completion, str):
            if not completion:
                continue
            if not isinstance(prompt, str):  # chat prompt, text completion
                msgs = [*_messages(prompt), {"role": "assistant", "content": completion}]
                items.append({"messages": msgs})
            else:
                items.append((prompt, completion))
        else:
            reply = _messages(completion)
            if not any(m["content"] for m in reply):
                continue
            head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            items.append({"messages": [*_messages(head), *reply]})
        sent.append(i)
    return items, sent


class _RemoteRewardBase:
    """What the blocking and asyncio forms share: options, name, turning results into rewards."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        model: str = "",
        *,
        name: str | None = None,
        token: str | None = None,
        truncation: str = "",
        use_normalized_score: bool = False,
        **client_options: Any,
    ) -> None:
        """Score with reward model (or combination) ``model`` of the service at ``address``
        (``host:port``, ``"h1:p,h2:p"`` for failover, or ``dns:///svc:port``; "" = the server's
        default reward model). ``name`` is the name in TRL's logs (default: ``model``, else
        "remote_rm"); ``token`` the bearer token (default: env RLHF_AUTH_TOKEN); ``truncation``
        "", "error", "left" or "right" (docs/API.md); ``use_normalized_score`` returns the
        checkpoint-normalised score. Other keyword arguments go to the client (`RewardClient`:
        ``timeout``, ``budget_seconds``, ``max_retries``, ``tls_ca``, ...)."""
        self.address = address
        self.model = model
        self.truncation = truncation
        self.use_normalized_score = use_normalized_score
        self.client_options = {"token": token, **client_options}
        self.__name__ = name or model or "remote_rm"
        self.unscored = 0
        """Completions left without a reward so far (empty, or rejected by the service)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.address!r}, model={self.model!r}, name={self.__name__!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (TRL's reward forms are; processes spawned by a launcher get their own
        # client): a client and its channels do not cross processes.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_c")}

    def _value(self, res: ScoreResult) -> float | None:
        return res.normalized_score if self.use_normalized_score else res.score

    def _rewards(
        self,
        n: int,
        sent: list[int],
        out: ItemResults[ScoreResult],
        log_metric: Callable[[str, float], None] | None,
    ) -> list[float | None]:
        """One reward per sample: the score, or None (empty, rejected); warns with the counts."""
        if out.all_rejected:
            first = next(iter(out.rejected.values()))
            raise RewardServiceError(
                first.code,
                f"the reward service at {self.address} rejected every completion of the batch "
                f"(model {self.model or '<default>'!r}): {first.details}",
                "Score",
            )
        rewards: list[float | None] = [None] * n
        for i, res in zip(sent, out.results, strict=True):
            if res is not None:
                rewards[i] = self._value(res)
        empty, rejected = n - len(sent), len(out.rejected)
        if empty or rejected:
            self.unscored += empty + rejected
            reason = next(iter(out.rejected.values())).details if rejected else ""
            log.warning(
                "%s: %d of %d completions got no reward (None): %d empty, %d rejected by the "
                "service%s",
                self.__name__,
                empty + rejected,
                n,
                empty,
                rejected,
                f" (first: {reason})" if reason else "",
            )
        if log_metric is not None and n:
            log_metric(f"rewards/{self.__name__}/unscored_frac", (empty + rejected) / n)
        return rewards


class RemoteReward(_RemoteRewardBase):
    """A TRL reward function that scores completions with the reward service (blocking; one
    `RewardClient`, with its retries and replica list, reused across calls)."""

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Prompt],
        completion_ids: Any = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion (None where it is empty or the service rejected it)."""
        items, sent = score_inputs(prompts, completions)
        out: ItemResults[ScoreResult] = ItemResults([])
        if items:
            client = self.client

            def call(sl: slice) -> list[ScoreResult]:
                return client.score(items[sl], model=self.model, truncation=self.truncation)

            out = batch_or_per_item(len(items), call, f"{self.__name__}: Score")
        return self._rewards(len(prompts), sent, out, kwargs.get("log_metric"))

    @property
    def client(self) -> RewardClient:
        """The client (created at first use, then reused)."""
        if getattr(self, "_client", None) is None:
            with _LOCK:
                if getattr(self, "_client", None) is None:
                    self._client = RewardClient(self.address, **self.client_options)
        return self._client

    def close(self) -> None:
        """Close the client's channels (a later call opens new ones)."""
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()


class AsyncRemoteReward(_RemoteRewardBase):
    """`RemoteReward` for asyncio: TRL awaits it on its event loop, concurrently with its other
    async reward functions. One `AsyncRewardClient`, created in the loop that first calls it."""

    async def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Prompt],
        completion_ids: Any = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion (None where it is empty or the service rejected it)."""
        items, sent = score_inputs(prompts, completions)
        out: ItemResults[ScoreResult] = ItemResults([])
        if items:
            client = self.client

            async def call(sl: slice) -> list[ScoreResult]:
                return await client.score(items[sl], model=self.model, truncation=self.truncation)

            out = await abatch_or_per_item(len(items), call, f"{self.__name__}: Score")
        return self._rewards(len(prompts), sent, out, kwargs.get("log_metric"))

    @property
    def client(self) -> AsyncRewardClient:
        """The client of the running event loop (grpc.aio channels belong to one loop): created
        at first use in a loop, then reused; a call from another loop gets a new one."""
        loop = asyncio.get_running_loop()
        if getattr(self, "_client", None) is None or self._client_loop is not loop:
            self._client = AsyncRewardClient(self.address, **self.client_options)
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the client's channels (call it in the client's loop)."""
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            await client.close()


_LOCK = threading.Lock()
