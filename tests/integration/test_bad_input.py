"""A battery of malformed requests: each gets the documented code and a message naming the
problem, while valid requests sent at the same time are answered correctly."""

from __future__ import annotations

import math
import threading

import grpc
import numpy as np
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import inprocess_scores

pytestmark = pytest.mark.integration
IA, FP, RE = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def item(prompt: str = "p", completion: str = " c") -> pb.ScoreItem:
    return pb.ScoreItem(prompt=prompt, completion=completion)


def seq(ids: list[int], start: int) -> pb.TokenSequence:
    return pb.TokenSequence(token_ids=ids, response_start=start)


LONG = " cat" * 400  # > 256 tokens
CASES = [
    # (name, rpc, request, code, words the message must contain)
    ("empty batch", "Score", pb.ScoreRequest(), IA, ["empty batch"]),
    (
        "empty completion",
        "Score",
        pb.ScoreRequest(items=[item(completion="")]),
        IA,
        ["item 0", "completion is empty"],
    ),
    (
        "empty completion at index 2",
        "Score",
        pb.ScoreRequest(items=[item(), item(), item("x", "")]),
        IA,
        ["item 2"],
    ),
    (
        "oversize, truncation off",
        "Score",
        pb.ScoreRequest(items=[item(completion=LONG)], truncation=pb.TRUNCATION_ERROR),
        IA,
        ["item 0", "limit of 256"],
    ),
    (
        "oversize at index 1 by default",
        "Score",
        pb.ScoreRequest(items=[item(), item(completion=LONG)]),
        IA,
        ["item 1", "256"],
    ),
    (
        "unknown model",
        "Score",
        pb.ScoreRequest(model="nope", items=[item()]),
        IA,
        ["unknown model 'nope'"],
    ),
    (
        "wrong role for Score",
        "Score",
        pb.ScoreRequest(model="reference", items=[item()]),
        FP,
        ["not a reward model"],
    ),
    (
        "too many items",
        "Score",
        pb.ScoreRequest(items=[item()] * 65),
        IA,
        ["65", "max_items_per_request 64"],
    ),
    (
        "empty message content",
        "Score",
        pb.ScoreRequest(items=[pb.ScoreItem(messages=[pb.ChatMessage(role="user", content="")])]),
        IA,
        ["item 0", "message 0", "empty content"],
    ),
    (
        "empty message role",
        "Score",
        pb.ScoreRequest(items=[pb.ScoreItem(messages=[pb.ChatMessage(role="", content="hi")])]),
        IA,
        ["empty role"],
    ),
    ("no sequences", "ReferenceLogProbs", pb.ReferenceLogProbsRequest(), IA, ["empty batch"]),
    (
        "token id out of vocabulary",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2, 100000], 1)]),
        IA,
        ["sequence 0", "token id 100000", "out of vocabulary"],
    ),
    (
        "negative token id",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2], 1), seq([1, -5, 3], 1)]),
        IA,
        ["sequence 1", "token id -5"],
    ),
    (
        "response_start 0",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2, 3], 0)]),
        IA,
        ["response_start 0", "[1, 2]"],
    ),
    (
        "response_start past the end",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2, 3], 3)]),
        IA,
        ["response_start 3", "out of range"],
    ),
    (
        "single-token sequence",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1], 1)]),
        IA,
        ["at least 2 tokens"],
    ),
    (
        "sequence over the length limit",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1] * 300, 1)]),
        IA,
        ["300 tokens", "limit of 256"],
    ),
    (
        "NaN temperature",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2], 1)], temperature=math.nan),
        IA,
        ["temperature", "nan"],
    ),
    (
        "negative temperature",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2], 1)], temperature=-1.0),
        IA,
        ["temperature", "-1"],
    ),
    (
        "infinite temperature",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2], 1)], temperature=math.inf),
        IA,
        ["temperature", "inf"],
    ),
    (
        "fingerprint mismatch",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(
            sequences=[seq([1, 2], 1)], tokenizer_fingerprint="v1:0000000000000000"
        ),
        FP,
        ["fingerprint", "does not match"],
    ),
    (
        "wrong role for ReferenceLogProbs",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(model="reward", sequences=[seq([1, 2], 1)]),
        FP,
        ["not a reference model"],
    ),
    (
        "unknown reference model",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(model="ghost", sequences=[seq([1, 2], 1)]),
        IA,
        ["unknown model 'ghost'"],
    ),
    (
        "too many sequences",
        "ReferenceLogProbs",
        pb.ReferenceLogProbsRequest(sequences=[seq([1, 2], 1)] * 65),
        IA,
        ["max_items_per_request 64"],
    ),
]


def test_bad_input_battery_with_valid_traffic_alongside(tiny_server, tiny_ckpts):
    assert len(CASES) >= 20
    good_pairs = [("the cat", " is good"), ("a dog", " runs")]
    expected = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in good_pairs])[:, 0]
    stop = threading.Event()
    good_results: list[list[float]] = []
    errors: list[BaseException] = []

    def valid_traffic() -> None:
        with RewardClient(tiny_server.address) as c:
            while not stop.is_set():
                try:
                    good_results.append([r.score for r in c.score(good_pairs)])
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

    threads = [threading.Thread(target=valid_traffic) for _ in range(3)]
    for t in threads:
        t.start()
    failures = []
    with grpc.insecure_channel(tiny_server.address) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        for name, rpc, req, code, words in CASES:
            with pytest.raises(grpc.RpcError) as ei:
                getattr(stub, rpc)(req, timeout=10)
            got_code, details = ei.value.code(), ei.value.details() or ""
            if got_code != code or not all(w.lower() in details.lower() for w in words):
                failures.append(
                    f"{name}: got {got_code.name} {details!r}, want {code.name} with {words}"
                )
    stop.set()
    for t in threads:
        t.join()
    assert not failures, "\n".join(failures)
    assert not errors, errors
    assert len(good_results) >= 3
    for row in good_results:
        np.testing.assert_allclose(row, expected, atol=1e-5)


def test_oversize_message_is_refused_and_server_keeps_serving(tiny_ckpts, tmp_path):
    sp = start_server(["--reward-model", str(tiny_ckpts.reward), "--max-message-mb", "1"], tmp_path)
    try:
        opts = [("grpc.max_send_message_length", 8 << 20)]
        with grpc.insecure_channel(sp.address, options=opts) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            big = pb.ScoreRequest(items=[item(completion="x" * (2 << 20))])
            with pytest.raises(grpc.RpcError) as ei:
                stub.Score(big, timeout=10)
            assert ei.value.code() == RE
            ok = stub.Score(pb.ScoreRequest(items=[item()]), timeout=10)
            assert len(ok.scores) == 1
    finally:
        sp.stop()


def test_truncation_left_and_right_keep_the_right_end(tiny_server, tiny_ckpts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reward))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_ckpts.reward)).eval()
    ids = tok("p" + LONG)["input_ids"]
    assert len(ids) > 256
    with torch.no_grad():
        exp_left = model(torch.tensor([ids[-256:]])).logits.item()
        exp_right = model(torch.tensor([ids[:256]])).logits.item()
    with RewardClient(tiny_server.address) as c:
        rl = c.score([("p", LONG)], truncation="left")[0]
        rr = c.score([("p", LONG)], truncation="right")[0]
    assert rl.truncated and rr.truncated and rl.num_tokens == rr.num_tokens == 256
    assert abs(rl.score - exp_left) < 1e-5
    assert abs(rr.score - exp_right) < 1e-5
