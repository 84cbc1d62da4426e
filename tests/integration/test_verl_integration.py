"""`reward_server.integrations.verl.compute_score`, loaded and called the way veRL's reward loop
does (verl/trainer/ppo/reward.py `get_custom_reward_fn`; reward_manager/naive.py), against a real
server."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from functools import partial
from typing import Any

import pytest

from reward_server.client import RewardClient, RewardServiceError
from reward_server.integrations import verl as verl_integration

pytestmark = pytest.mark.integration


def _load_like_verl(path: str, name: str, reward_kwargs: dict[str, Any]) -> Any:
    """What veRL does with custom_reward_function.path/.name/.reward_kwargs
    (verl.utils.import_utils.load_module): import "pkg://module.name", or the file as a module of
    its own; take the function; merge reward_kwargs into every call's kwargs."""
    if path.startswith("pkg://"):
        module = importlib.import_module(path[len("pkg://") :])
    else:
        spec = importlib.util.spec_from_file_location("custom_module", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["custom_module"] = module
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules["custom_module"]
    raw_fn = getattr(module, name)
    assert inspect.iscoroutinefunction(raw_fn)  # veRL awaits it instead of using a thread

    async def call_with_kwargs_async(raw_fn, extra_kwargs, *args, **kwargs):
        return await raw_fn(*args, **{**kwargs, **extra_kwargs})

    return partial(call_with_kwargs_async, raw_fn, reward_kwargs)


ROWS = [
    ("the cat sat on", " the mat", {"question": "the cat sat on", "index": 0}),
    ("a dog ran to", " the park", {"question": "a dog ran to", "index": 1}),
    ("one two three", " four five", {"prompt": "one two three", "split": "train"}),
]


@pytest.mark.parametrize("path", ["pkg://reward_server.integrations.verl", "file"])
def test_compute_score_as_verl_calls_it(tiny_server, path: str) -> None:
    path = verl_integration.__file__ if path == "file" else path
    fn = _load_like_verl(path, "compute_score", {"address": tiny_server.address})

    async def reward_loop() -> list[dict]:
        # RewardLoopWorker.compute_score_batch: one task per item, gathered; NaiveRewardManager
        # passes these keywords (+ reward_router_address/reward_model_tokenizer with its own RM)
        tasks = [
            fn(
                data_source="gsm8k",
                solution_str=resp,
                ground_truth="42",
                extra_info=info,
                reward_router_address=None,
                reward_model_tokenizer=None,
            )
            for _, resp, info in ROWS
        ]
        return await asyncio.gather(*tasks)

    out = asyncio.run(reward_loop())
    with RewardClient(tiny_server.address) as client:
        expected = [r.score for r in client.score([(p, c) for p, c, _ in ROWS])]
    assert [o["score"] for o in out] == pytest.approx(expected, abs=1e-5)
    assert all(o["rm_scored"] == 1.0 for o in out)


def test_chat_prompt_model_and_env_settings(tiny_server, monkeypatch) -> None:
    """A chat prompt in extra_info is scored as messages (the reward model's chat template);
    the address and model can come from the environment."""
    monkeypatch.setenv("RLHF_REWARD_ADDRESS", tiny_server.address)
    monkeypatch.setenv("RLHF_REWARD_MODEL", "rm2")
    chat = [{"role": "user", "content": "is the sun a star?"}]
    out = asyncio.run(
        verl_integration.compute_score(
            data_source="x",
            solution_str="yes it is",
            ground_truth=None,
            extra_info={"prompt": chat},
        )
    )
    with RewardClient(tiny_server.address) as client:
        (as_chat,) = client.score_messages(
            [[*chat, {"role": "assistant", "content": "yes it is"}]], model="rm2"
        )
        (as_pair,) = client.score([("is the sun a star?", "yes it is")], model="rm2")
    assert out["score"] == pytest.approx(as_chat.score, abs=1e-5)
    assert as_chat.score != pytest.approx(as_pair.score, abs=1e-4)  # the form matters


def test_rejected_response_raises_or_gets_failed_score(tiny_server) -> None:
    bound = verl_integration.make_compute_score(tiny_server.address)
    info = {"question": "the cat"}
    with pytest.raises(RewardServiceError, match="completion is empty"):
        asyncio.run(bound("d", "", None, info))
    out = asyncio.run(bound("d", "", None, info, failed_score=-1.0))
    assert out == {"score": -1.0, "rm_scored": 0.0}
    ok = asyncio.run(bound("d", " sat", None, info, failed_score=-1.0))
    assert ok["rm_scored"] == 1.0 and ok["score"] != -1.0


def test_unreachable_server_is_an_error_even_with_failed_score() -> None:
    from reward_server.local_server import free_port

    bound = verl_integration.make_compute_score(
        f"127.0.0.1:{free_port()}", timeout=1.0, failed_score=0.0
    )
    with pytest.raises(RewardServiceError) as err:
        asyncio.run(bound("d", " sat", None, {"question": "the cat"}))
    assert err.value.code.name in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
