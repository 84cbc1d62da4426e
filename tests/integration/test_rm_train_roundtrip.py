"""Round trip: a checkpoint written by `reward-server train` is served by `reward-server serve`, and
the scores over gRPC equal the trained model's in-process scores (float32, CPU)."""

from __future__ import annotations

import json

import pytest

from reward_server.client import RewardClient
from reward_server.models.text_format import render_messages, render_pair
from tests.conftest import start_server
from tests.integration.test_rm_train_learning import run_cli, synthetic_preferences, write_jsonl

pytestmark = pytest.mark.integration

PAIRS = [
    ("question: is it good? answer:", " good good the cat"),
    ("question: x answer:", " red blue green"),
    ("", " one two three good"),
    ("a long prompt with many words in it before the answer:", " no"),
]
CONVERSATIONS = [
    [{"role": "user", "content": "is the sun big?"}, {"role": "assistant", "content": "good yes"}],
    [
        {"role": "system", "content": "be helpful"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the dog ran"},
    ],
]


@pytest.fixture(scope="module")
def trained_rm(tiny_ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_roundtrip")
    recs = synthetic_preferences(40, 4, seed=11)
    conv = {
        "chosen": CONVERSATIONS[0],
        "rejected": CONVERSATIONS[0][:1] + [{"role": "assistant", "content": "no"}],
    }
    data = write_jsonl(d / "d.jsonl", recs + [conv] * 4)
    out = d / "rm"
    rc, _, err = run_cli(["--data", data, "--base-model", str(tiny_ckpts.reference), "--output", str(out),
                          "--batch-size", "8", "--lr", "1e-3", "--max-length", "128", "--seed", "0",
                          "--eval-fraction", "0.2"])  # fmt: skip
    assert rc == 0, err
    return out


def test_served_scores_equal_inprocess_scores(trained_rm, tmp_path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward_server.training.modeling import score_texts

    tok = AutoTokenizer.from_pretrained(trained_rm)
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    texts = [render_pair(tok, p, c) for p, c in PAIRS] + [
        render_messages(tok, m) for m in CONVERSATIONS
    ]
    with torch.no_grad():  # one unpadded forward per text
        alone = [float(model(**tok(t, return_tensors="pt")).logits[0, 0]) for t in texts]
    batched = score_texts(model, tok, texts, max_length=128)  # the trainer's own scorer
    assert batched == pytest.approx(alone, abs=1e-5)
    stats = json.loads((trained_rm / "config.json").read_text())["reward_normalization"]

    server = start_server(
        ["--reward-model", f"trained={trained_rm}", "--dtype", "float32"], tmp_path
    )
    try:
        with RewardClient(server.address) as client:
            got = client.score(PAIRS) + client.score_messages(CONVERSATIONS)
            info = client.server_info()
    finally:
        server.stop()
    assert [r.score for r in got] == pytest.approx(alone, abs=1e-5)
    for r, expected in zip(got, alone, strict=True):
        assert r.normalized_score is not None
        assert r.normalized_score == pytest.approx(
            (expected - stats["mean"]) / stats["std"], abs=1e-4
        )
    assert [r.num_tokens for r in got] == [len(tok(t)["input_ids"]) for t in texts]
    assert "trained" in str(info)
