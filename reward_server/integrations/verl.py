"""An async ``compute_score`` for veRL's reward loop (its custom reward function)::

    reward.custom_reward_function.path=pkg://reward_server.integrations.verl
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.address=rm-host:50051

The contract, as veRL calls a custom reward function (docs/advance/reward_loop.rst and
``verl/experimental/reward_loop/reward_manager/naive.py`` in https://github.com/verl-project/verl):
one call per response, awaited on the reward-loop worker's event loop when the function is a
coroutine function, with the keyword arguments ``data_source``, ``solution_str`` (the decoded
response), ``ground_truth``, ``extra_info`` (the dataset row's ``extra_info`` dict), plus
``reward_router_address`` / ``reward_model_tokenizer`` when veRL runs a reward model of its own,
plus the config's ``custom_reward_function.reward_kwargs`` (``verl/trainer/ppo/reward.py``,
``get_custom_reward_fn``: merged into the call's keyword arguments). ``path`` is loaded by
``verl.utils.import_utils.load_extern_object``: ``pkg://`` + a module name, or a file path (older
versions: a file path only, this module's ``__file__``). It returns a float or a dict
with ``"score"``; the dict's other keys become ``reward_extra_info``.

veRL does not pass the prompt: it is read from ``extra_info`` (``prompt_key``, default: the first of
"prompt" and "question" present; veRL's example preprocessors put the question there). A string is
scored as prompt/completion; a list of chat messages as ``messages`` with the response appended as
the assistant's turn, so the reward model's chat template applies.

Settings, each a keyword argument (``reward_kwargs``) or else an environment variable:
``address`` (RLHF_REWARD_ADDRESS, default 127.0.0.1:50051), ``model`` (RLHF_REWARD_MODEL, "" = the
server's default), ``token`` (RLHF_AUTH_TOKEN), ``timeout`` (RLHF_REWARD_TIMEOUT, seconds, 30),
``budget_seconds`` (RLHF_REWARD_BUDGET_SECONDS), ``truncation`` (RLHF_REWARD_TRUNCATION),
``prompt_key`` (RLHF_REWARD_PROMPT_KEY), ``failed_score`` (RLHF_REWARD_FAILED_SCORE),
``score_stream`` (RLHF_REWARD_STREAM, default on: a worker's calls share one ScoreStream per
server instead of one RPC each, `reward_server.client.stream_mux`; "0" turns it off). veRL needs a
number for every response: a response the service rejects (an empty one, one over the model's
length with truncation "error") raises `RewardServiceError` unless ``failed_score`` is set, in
which case it gets that score and ``rm_scored`` 0 in the extra info. `make_compute_score` binds
the settings in code instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from reward_server.client import PER_ITEM, AsyncRewardClient, PairLike, RewardServiceError

log = logging.getLogger("reward_server.integrations.verl")

DEFAULT_ADDRESS = "127.0.0.1:50051"
PROMPT_KEYS = ("prompt", "question")
_clients: dict[tuple[Any, ...], AsyncRewardClient] = {}
_unscored = 0


def _setting(value: Any, env: str, default: Any = None) -> Any:
    if value is not None:
        return value
    return os.environ.get(env, default)


def _optional_float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def _client(
    address: str, token: str | None, timeout: float, budget: float | None, stream: bool = True
) -> Any:
    """One client per event loop and settings (grpc.aio channels belong to one loop), reused by
    every call: the server batches the concurrent single-item calls of a reward-loop worker."""
    key = (asyncio.get_running_loop(), address, token, timeout, budget, stream)
    client = _clients.get(key)
    if client is None:
        for old in [k for k in _clients if k[0].is_closed()]:  # loops that are gone
            del _clients[old]
        client = _clients[key] = AsyncRewardClient(
            address, token=token, timeout=timeout, budget_seconds=budget, score_stream=stream
        )
    return client


def _item(solution_str: str, extra_info: dict[str, Any] | None, prompt_key: str | None) -> PairLike:
    info = extra_info or {}
    keys = [prompt_key] if prompt_key else [k for k in PROMPT_KEYS if k in info]
    if prompt_key and prompt_key not in info:
        raise KeyError(f"extra_info has no {prompt_key!r} (prompt_key); it has {sorted(info)}")
    prompt = info.get(keys[0]) if keys else None
    if prompt is None:
        log.warning(
            "compute_score: no prompt in extra_info (keys %s; set prompt_key): scoring the "
            "response alone",
            sorted(info),
        )
        return ("", solution_str)
    if isinstance(prompt, str):
        return (prompt, solution_str)
    msgs: Sequence[dict[str, Any]] = list(prompt)  # chat messages (a list or numpy array)
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]
        + [{"role": "assistant", "content": solution_str}]
    }


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    address: str | None = None,
    model: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
    budget_seconds: float | None = None,
    truncation: str | None = None,
    prompt_key: str | None = None,
    failed_score: float | None = None,
    score_stream: bool | str | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """The reward model's score of ``solution_str`` for the prompt in ``extra_info``:
    ``{"score": s, "rm_scored": 1.0}`` (``data_source`` and ``ground_truth`` are not used; a
    reward model needs no reference answer). Settings: the module docstring."""
    global _unscored
    addr = _setting(address, "RLHF_REWARD_ADDRESS", DEFAULT_ADDRESS)
    client = _client(
        addr,
        token,
        float(_setting(timeout, "RLHF_REWARD_TIMEOUT", 30.0)),
        _optional_float(_setting(budget_seconds, "RLHF_REWARD_BUDGET_SECONDS")),
        str(_setting(score_stream, "RLHF_REWARD_STREAM", "1")).lower() not in ("0", "false", "no"),
    )
    fallback = _optional_float(_setting(failed_score, "RLHF_REWARD_FAILED_SCORE"))
    item = _item(solution_str, extra_info, _setting(prompt_key, "RLHF_REWARD_PROMPT_KEY") or None)
    try:
        (res,) = await client.score(
            [item],
            model=_setting(model, "RLHF_REWARD_MODEL", ""),
            truncation=_setting(truncation, "RLHF_REWARD_TRUNCATION", ""),
        )
    except RewardServiceError as err:
        if fallback is None or err.code not in PER_ITEM:
            raise
        _unscored += 1
        log.warning(
            "compute_score: the reward service at %s rejected a response (%s: %s); scored "
            "failed_score=%g (%d responses so far)",
            addr,
            err.code.name,
            err.details,
            fallback,
            _unscored,
        )
        return {"score": fallback, "rm_scored": 0.0}
    return {"score": res.score, "rm_scored": 1.0}


def make_compute_score(
    address: str = DEFAULT_ADDRESS, model: str = "", **settings: Any
) -> Callable[..., Awaitable[dict[str, float]]]:
    """`compute_score` with its settings bound (for a reward file of your own:
    ``compute_score = make_compute_score("rm-host:50051", "rm2", failed_score=0.0)``); the
    result is a coroutine function with veRL's signature."""

    async def bound_compute_score(
        data_source: Any,
        solution_str: str,
        ground_truth: Any,
        extra_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        merged = {"address": address, "model": model, **settings, **kwargs}
        return await compute_score(data_source, solution_str, ground_truth, extra_info, **merged)

    return bound_compute_score
