"""The performance shortcuts give exactly what the plain paths give."""

from __future__ import annotations

import random

import numpy as np
import pytest

from reward_server.models.reward import EncodedItem, fast_encoder, pad_right


@pytest.fixture(scope="module")
def tokenizer():
    from reward_server.tiny import train_tokenizer

    return train_tokenizer(vocab_size=300)


def test_fast_tokenisation_equals_the_transformers_call(tokenizer):
    encode = fast_encoder(tokenizer)
    assert encode is not None
    rng = random.Random(0)
    alphabet = "abc xyz\t\n\u00e9\u4f60\U0001f600<|endoftext|><pad> "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(50)]
    conv = [{"role": "user", "content": "is it big?"}, {"role": "assistant", "content": "yes"}]
    texts.append(tokenizer.apply_chat_template(conv, tokenize=False))
    assert encode(texts) == tokenizer(texts, add_special_tokens=True)["input_ids"]


def test_fast_tokenisation_is_refused_when_it_would_differ(tokenizer):
    class Lying:
        backend_tokenizer = tokenizer.backend_tokenizer
        chat_template = None

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[0] for _ in texts]}

    assert fast_encoder(Lying()) is None
    assert fast_encoder(object()) is None


def test_pad_right_keeps_tokens_at_positions_0_to_n():
    ids, mask = pad_right([EncodedItem([5, 6, 7], False), EncodedItem([8], False)], pad_id=1)
    assert ids.dtype == np.int64 and ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_logprobs_response_from_lists_equals_from_arrays():
    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
    from reward_server.engine.engine import Timing
    from reward_server.serve import convert

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1, 7, 512)]
    got = convert.logprobs_response("ref", arrays, Timing(), "rid")
    slow = pb.ReferenceLogProbsResponse(
        model="ref", results=[pb.SequenceLogProbs(logprobs=a) for a in arrays]
    )
    for g, s, a in zip(got.results, slow.results, arrays, strict=True):
        assert list(g.logprobs) == list(s.logprobs)
        np.testing.assert_array_equal(np.asarray(g.logprobs, dtype=np.float32), a)
