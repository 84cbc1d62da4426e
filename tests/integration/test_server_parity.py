"""Server results equal in-process transformers forwards (float32, 1e-5), whatever the batch."""

from __future__ import annotations

import random

import numpy as np
import pytest

from reward_server.client import RewardClient
from reward_server.fingerprint import tokenizer_fingerprint
from tests.helpers import inprocess_logprobs, inprocess_scores

pytestmark = pytest.mark.integration

PAIRS = [
    ("the cat", " is good"),
    ("a", " dog ran fast and far away from the big red house on the hill"),
    ("question: what is the sun?", " the sun is a big yellow star"),
    ("", " one two three"),
    ("helpful answer please", " no"),
]


def test_scores_match_inprocess_for_any_batch_composition(tiny_server, tiny_ckpts):
    expected = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in PAIRS])[:, 0]
    with RewardClient(tiny_server.address) as client:
        together = client.score(PAIRS)
        alone = [client.score([p])[0].score for p in PAIRS]
        rng = random.Random(0)
        shuffled = list(range(len(PAIRS))) * 2
        rng.shuffle(shuffled)
        mixed = client.score([PAIRS[i] for i in shuffled])
    np.testing.assert_allclose([r.score for r in together], expected, atol=1e-5)
    np.testing.assert_allclose(alone, expected, atol=1e-5)
    np.testing.assert_allclose([r.score for r in mixed], expected[shuffled], atol=1e-5)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reward))
    assert [r.num_tokens for r in together] == [len(tok(p + c)["input_ids"]) for p, c in PAIRS]


def test_multihead_scores_and_head_names(tiny_server, tiny_ckpts):
    expected = inprocess_scores(str(tiny_ckpts.multihead_reward), [p + c for p, c in PAIRS])
    with RewardClient(tiny_server.address) as client:
        res = client.score(PAIRS, model="rm2")
    got = np.array([[r.head_scores["helpfulness"], r.head_scores["safety"]] for r in res])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # default rule: the first head
    np.testing.assert_allclose([r.score for r in res], expected[:, 0], atol=1e-5)


def test_chat_messages_use_the_models_template(tiny_server, tiny_ckpts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reward))
    conv = [
        {"role": "user", "content": "is the sun big?"},
        {"role": "assistant", "content": "yes the sun is big"},
    ]
    text = tok.apply_chat_template(conv, tokenize=False)
    expected = inprocess_scores(str(tiny_ckpts.reward), [text])[0, 0]
    with RewardClient(tiny_server.address) as client:
        got = client.score_messages([conv])[0]
    assert abs(got.score - expected) < 1e-5
    assert got.num_tokens == len(tok(text)["input_ids"])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_reference_logprobs_match_inprocess(tiny_server, tiny_ckpts, temperature):
    rng = random.Random(int(temperature * 10))
    seqs = [[rng.randrange(0, 480) for _ in range(rng.randint(2, 120))] for _ in range(12)]
    starts = [rng.randint(1, len(s) - 1) for s in seqs]
    expected = inprocess_logprobs(str(tiny_ckpts.reference), seqs, starts, temperature)
    with RewardClient(tiny_server.address) as client:
        got_all = client.reference_logprobs(seqs, starts, temperature)
        got_one = [
            client.reference_logprobs([s], [st], temperature)[0]
            for s, st in zip(seqs[:3], starts[:3], strict=True)
        ]
        order = list(range(len(seqs)))[::-1]
        got_rev = client.reference_logprobs(
            [seqs[i] for i in order], [starts[i] for i in order], temperature
        )
    for s, st, e, g in zip(seqs, starts, expected, got_all, strict=True):
        assert g.shape == (len(s) - st,)
        np.testing.assert_allclose(g, e, atol=1e-5)
    for e, g in zip(expected[:3], got_one, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
    for i, g in zip(order, got_rev, strict=True):
        np.testing.assert_allclose(g, expected[i], atol=1e-5)


def test_temperature_zero_means_one_and_fingerprint_accepted(tiny_server, tiny_ckpts):
    from transformers import AutoTokenizer

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tiny_ckpts.reference)))
    seqs, starts = [[3, 4, 5, 6, 7]], [2]
    with RewardClient(tiny_server.address) as client:
        a = client.reference_logprobs(seqs, starts, 0.0, tokenizer_fingerprint=fp)[0]
        b = client.reference_logprobs(seqs, starts, 1.0)[0]
        info = client.server_info()
    np.testing.assert_array_equal(a, b)
    ref = [m for m in info.models if m.name == "reference"][0]
    assert ref.tokenizer_fingerprint == fp
