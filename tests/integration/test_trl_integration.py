"""TRL's real GRPOTrainer with `reward_funcs` = the remote reward functions of
`reward_server.integrations.trl`, against a real server: the rewards TRL logs are the scores the
client gets for the same texts."""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import pytest

from reward_server.client import RewardClient
from reward_server.integrations.trl import AsyncRemoteReward, RemoteReward

pytestmark = pytest.mark.integration
trl = pytest.importorskip("trl")

PROMPTS = ["the cat sat on", "a dog ran to", "one two three", "the sun is a"]


def _recording(cls: type) -> type:
    """`cls` that also keeps what TRL passed and what it returned (one entry per call)."""
    if cls is AsyncRemoteReward:

        class AsyncRecording(AsyncRemoteReward):
            async def __call__(self, prompts, completions, completion_ids=None, **kwargs):
                out = await super().__call__(prompts, completions, completion_ids, **kwargs)
                self.calls.append((list(prompts), list(completions), out, sorted(kwargs)))
                return out

        return AsyncRecording

    class Recording(RemoteReward):
        def __call__(self, prompts, completions, completion_ids=None, **kwargs):
            out = super().__call__(prompts, completions, completion_ids, **kwargs)
            self.calls.append((list(prompts), list(completions), out, sorted(kwargs)))
            return out

    return Recording


def _remote(cls: type, address: str, model: str = "", **kw: Any) -> Any:
    fn = _recording(cls)(address, model, timeout=20, **kw)
    fn.calls = []
    return fn


def _train(tiny_ckpts, tmp_path: Path, reward_funcs: list, conversational: bool = False, **cfg):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_ckpts.reference)
    policy = AutoModelForCausalLM.from_pretrained(tiny_ckpts.reference)
    rows = (
        [{"prompt": [{"role": "user", "content": p}], "topic": "t"} for p in PROMPTS]
        if conversational
        else [{"prompt": p, "topic": "t"} for p in PROMPTS]
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        **cfg,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if any(k.startswith("rewards/") for k in h)]


def _client_scores(address: str, model: str, prompts: list, completions: list) -> list[float]:
    """What the client gets for the same texts (NaN where a completion is empty)."""
    with RewardClient(address, timeout=20) as client:
        out = []
        for p, c in zip(prompts, completions, strict=True):
            if isinstance(c, list):
                if not c[0]["content"]:
                    out.append(math.nan)
                    continue
                (res,) = client.score_messages([[*p, *c]], model=model)
            elif not c:
                out.append(math.nan)
                continue
            else:
                (res,) = client.score([(p, c)], model=model)
            out.append(res.score)
        return out


def _nanmean(xs: list[float]) -> float:
    kept = [x for x in xs if not math.isnan(x)]
    return sum(kept) / len(kept)


def _check_logged(logs: list[dict], fn: Any, address: str, model: str) -> list[list[float]]:
    """Each step's logged rewards/<name>/mean equals the mean of the client's scores of the texts
    TRL passed in that step; returns those scores."""
    assert len(fn.calls) == 2 and len(logs) == 2  # 2 steps, 1 generation batch each
    per_call = []
    for (prompts, completions, returned, kwargs), entry in zip(fn.calls, logs, strict=True):
        assert {"trainer_state", "log_metric", "topic"} <= set(kwargs)  # TRL's contract
        expected = _client_scores(address, model, prompts, completions)
        got = [math.nan if r is None else r for r in returned]
        assert got == pytest.approx(expected, abs=1e-5, nan_ok=True)
        assert entry[f"rewards/{fn.__name__}/mean"] == pytest.approx(_nanmean(expected), abs=1e-5)
        frac = sum(math.isnan(x) for x in expected) / len(expected)
        assert entry[f"rewards/{fn.__name__}/unscored_frac"] == pytest.approx(frac)
        per_call.append(expected)
    return per_call


def test_grpo_logs_the_remote_scores_sync(tiny_server, tiny_ckpts, tmp_path: Path) -> None:
    fn = _remote(RemoteReward, tiny_server.address)
    assert fn.__name__ == "remote_rm"
    logs = _train(tiny_ckpts, tmp_path, [fn])
    _check_logged(logs, fn, tiny_server.address, "")
    assert isinstance(fn.calls[0][1][0], str)  # plain text went as prompt/completion
    client = fn.client
    assert fn.client is client  # one client for every call
    fn.close()


def test_grpo_logs_the_remote_scores_async_conversational(
    tiny_server, tiny_ckpts, tmp_path: Path
) -> None:
    fn = _remote(AsyncRemoteReward, tiny_server.address, name="rm_async")
    logs = _train(tiny_ckpts, tmp_path, [fn], conversational=True)
    # the completions were messages, scored with the reward model's chat template
    assert isinstance(fn.calls[0][1][0], list) and fn.calls[0][1][0][0]["role"] == "assistant"
    _check_logged(logs, fn, tiny_server.address, "")


def test_two_remote_models_with_reward_weights(tiny_server, tiny_ckpts, tmp_path: Path) -> None:
    rm = _remote(RemoteReward, tiny_server.address, name="rm")
    rm2 = _remote(AsyncRemoteReward, tiny_server.address, "rm2")
    assert rm2.__name__ == "rm2"
    logs = _train(tiny_ckpts, tmp_path, [rm, rm2], reward_weights=[1.0, 0.5])
    s1 = _check_logged(logs, rm, tiny_server.address, "")
    s2 = _check_logged(logs, rm2, tiny_server.address, "rm2")
    for a, b, entry in zip(s1, s2, logs, strict=True):
        # TRL's reward: the weighted sum over functions (NaN = 0), rows with no reward left out
        rows = [
            (0.0 if math.isnan(x) else x) + 0.5 * (0.0 if math.isnan(y) else y)
            for x, y in zip(a, b, strict=True)
            if not (math.isnan(x) and math.isnan(y))
        ]
        assert entry["reward"] == pytest.approx(sum(rows) / len(rows), abs=1e-5)
        assert a != pytest.approx(b, abs=1e-3)  # two different models were asked


# ---------------------------------------------------------------------- the contract, directly
def test_rejected_and_empty_items_are_none_with_a_counted_warning(
    tiny_server, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty completion is not sent; a completion the service rejects (here: too long for the
    model with truncation="error") is retried alone and comes back None; the rest are scored."""
    fn = RemoteReward(tiny_server.address, truncation="error", timeout=20)
    long = " cat" * 400  # past the tiny model's 256 positions
    metrics: dict[str, float] = {}
    with caplog.at_level(logging.WARNING):
        out = fn(
            prompts=["the cat", "a dog", "one", "the sun"],
            completions=[" sat", "", long, " is"],
            completion_ids=None,
            log_metric=metrics.__setitem__,
        )
    expected = _client_scores(tiny_server.address, "", ["the cat", "the sun"], [" sat", " is"])
    assert out[1] is None and out[2] is None
    assert [out[0], out[3]] == pytest.approx(expected, abs=1e-5)
    assert fn.unscored == 2
    assert metrics == {"rewards/remote_rm/unscored_frac": 0.5}
    assert any("2 of 4 completions got no reward" in r.message for r in caplog.records)
    assert any("1 empty, 1 rejected" in r.message for r in caplog.records)
    fn.close()


def test_every_item_rejected_raises(tiny_server) -> None:
    """A batch the service rejects item by item as a whole (an unknown model) is an error, not a
    list of None."""
    from reward_server.client import RewardServiceError

    fn = RemoteReward(tiny_server.address, "no-such-model", timeout=20)
    with pytest.raises(RewardServiceError, match="no-such-model"):
        fn(prompts=["a", "b"], completions=[" x", " y"])
    fn.close()


def test_async_form_is_detected_and_pickles(tiny_server) -> None:
    from trl.trainer.utils import get_callable_name, is_async_callable

    sync, aio = RemoteReward(tiny_server.address), AsyncRemoteReward(tiny_server.address, "rm2")
    assert not is_async_callable(sync) and is_async_callable(aio)
    assert get_callable_name(sync) == "remote_rm" and get_callable_name(aio) == "rm2"
    sync([" a"], [" b"])  # creates the client
    copy = pickle.loads(pickle.dumps(sync))
    assert copy.__name__ == "remote_rm" and copy(["a"], [" b"]) == pytest.approx(
        sync(["a"], [" b"])
    )

    async def twice() -> list:
        return [await aio(prompts=["a"], completions=[" b"]) for _ in range(2)]

    first, second = asyncio.run(twice())
    assert first == second and isinstance(first[0], float)
    sync.close()
    copy.close()


def test_the_example_script_runs(tiny_server, tiny_ckpts, tmp_path: Path) -> None:
    """examples/trl_grpo_remote_reward.py, as docs/INTEGRATIONS.md runs it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    cmd = [
        sys.executable,
        str(REPO / "examples" / "trl_grpo_remote_reward.py"),
        "--server",
        tiny_server.address,
        "--policy",
        str(tiny_ckpts.reference),
        "--max-steps",
        "1",
        "--chat",
        "--use-async",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1: rewards/remote_rm/mean" in out.stdout
