"""Prefix sharing through the real server: the same scores and log-probs with sharing on as off
(float32, 1e-4) for GPT-2, a Llama-shaped model with a BOS token and a chat-template reward
model, on groups, groups of one, ungrouped items, truncation and tokens merged across the
prompt/completion boundary; the metrics count the tokens saved."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reward_server.client import RewardClient
from reward_server.tiny import WORDS
from tests.conftest import ServerProcess, start_server
from tests.helpers import scrape

pytestmark = pytest.mark.integration
MODELS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def servers(tiny_ckpts, tiny_llama, tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    """The same models served twice: prefix sharing on (the default) and off."""
    args = [
        f"--reward-model=gpt2={tiny_ckpts.multihead_reward}",
        f"--reward-model=llama={tiny_llama.multihead_reward}",
        f"--reference-model=gpt2_ref={tiny_ckpts.reference}",
        f"--reference-model=llama_ref={tiny_llama.reference}",
        "--max-wait-ms=30",
        "--max-input-tokens=160",
        "--dtype=float32",
    ]
    on = start_server(args, tmp_path_factory.mktemp("share_on"), metrics=True)
    off = start_server([*args, "--no-prefix-sharing"], tmp_path_factory.mktemp("share_off"))
    yield {"on": on, "off": off}
    on.stop()
    off.stop()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _pairs(seed: int) -> list[tuple[str, str]]:
    """A mixed request: a group of 6, a group of 3, a group of one, ungrouped items, completions
    that merge with the prompt's last characters when tokenised, one over the token limit."""
    rng = random.Random(seed)
    prompt, other = _words(rng, 50), _words(rng, 30)
    pairs = [(prompt, " " + _words(rng, rng.randint(1, 15))) for _ in range(6)]
    pairs += [(other, " " + _words(rng, rng.randint(1, 8))) for _ in range(3)]
    pairs += [(_words(rng, 20), " lonely answer")]
    pairs += [(prompt, "s good"), (prompt, "es"), (prompt + " ca", "t")]  # boundary merges
    pairs += [("short", " x"), (prompt + " " + _words(rng, 90), " long tail")]
    return pairs


def _scores(server: ServerProcess, model: str, pairs, truncation: str) -> np.ndarray:
    with RewardClient(server.address) as client:
        res = client.score(pairs, model=model, truncation=truncation)
    return np.array([[r.head_scores["helpfulness"], r.head_scores["safety"]] for r in res])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("truncation", ["right", "left"])
def test_scores_equal_with_and_without_sharing(servers, model, truncation):
    pairs = _pairs(seed=len(model) + len(truncation))
    on = _scores(servers["on"], model, pairs, truncation)
    off = _scores(servers["off"], model, pairs, truncation)
    np.testing.assert_allclose(on, off, atol=1e-4)
    assert np.ptp(on[:, 0]) > 1e-3  # the items really differ: the comparison means something


@pytest.mark.parametrize("model", MODELS)
def test_chat_template_scores_equal_with_and_without_sharing(servers, model):
    rng = random.Random(7)
    history = [
        {"role": "system", "content": _words(rng, 30)},
        {"role": "user", "content": _words(rng, 20)},
    ]
    convs = [[*history, {"role": "assistant", "content": _words(rng, k)}] for k in (1, 4, 9, 2)]
    convs.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    got = {}
    for key in ("on", "off"):
        with RewardClient(servers[key].address) as client:
            got[key] = [r.score for r in client.score_messages(convs, model=model)]
    np.testing.assert_allclose(got["on"], got["off"], atol=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_reference_logprobs_equal_with_and_without_sharing(servers, model):
    rng = random.Random(3)
    prompt = [rng.randrange(3, 480) for _ in range(60)]
    seqs, starts = [], []
    for _ in range(8):  # a group of 8: prompt + a completion of 1..30 tokens
        seqs.append(prompt + [rng.randrange(3, 480) for _ in range(rng.randint(1, 30))])
        starts.append(len(prompt))
    seqs += [prompt[:40] + [7, 8, 9], prompt[:40] + [7, 8]]  # share beyond response_start
    starts += [20, 41]
    seqs += [[rng.randrange(3, 480) for _ in range(25)], [1, 2]]  # ungrouped
    starts += [5, 1]
    got = {}
    for key in ("on", "off"):
        with RewardClient(servers[key].address) as client:
            got[key] = client.reference_logprobs(seqs, starts, 0.8, model=f"{model}_ref")
    for a, b, s, st in zip(got["on"], got["off"], seqs, starts, strict=True):
        assert len(a) == len(s) - st
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_samples_sent_one_request_each_are_grouped_in_a_window(servers):
    """A client sending one request per sample: the batching window gathers them, and the
    answers are the unshared ones."""
    rng = random.Random(11)
    prompt = _words(rng, 60)
    pairs = [(prompt, " " + _words(rng, rng.randint(1, 10))) for _ in range(12)]
    got = {}
    for key in ("on", "off"):
        with RewardClient(servers[key].address) as client, ThreadPoolExecutor(12) as pool:
            got[key] = list(
                pool.map(lambda p, c=client: c.score([p], model="gpt2")[0].score, pairs)
            )
    np.testing.assert_allclose(got["on"], got["off"], atol=1e-4)


def test_metrics_count_the_tokens_saved(servers):
    def saved(model: str) -> float:
        m = scrape(servers["on"].metrics_port)
        return m.get(f'reward_server_prefix_tokens_saved_total{{model="{model}"}}', 0.0)

    before = saved("gpt2")
    rng = random.Random(5)
    prompt = _words(rng, 60)
    with RewardClient(servers["on"].address) as client:
        client.score([(prompt, " " + _words(rng, 3)) for _ in range(4)], model="gpt2")
    # 4 samples of a ~60-token prompt: at least 3 x 50 prompt tokens not recomputed
    assert saved("gpt2") - before >= 150
    m = scrape(servers["on"].metrics_port)
    assert m['reward_server_prefix_group_size_count{model="gpt2"}'] >= 1
    for name in ("llama", "gpt2_ref", "llama_ref"):  # every family took the shared path above
        assert m.get(f'reward_server_prefix_tokens_saved_total{{model="{name}"}}', 0.0) > 0
