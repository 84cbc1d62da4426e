"""Per-model input formats through the real server: a BERT-shaped cross-encoder reward model
trained on text pairs is served with `tokenizer(prompt, completion)` (detected), a decoder with
one concatenated string, and `--input-format NAME=chat` renders pairs through the chat template;
GetServerInfo says which."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory):
    from reward_server.tiny import build_tiny_bert_rm

    return build_tiny_bert_rm(tmp_path_factory.mktemp("bert") / "bert")


def inprocess(path, pairs, as_pair: bool) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for p, c in pairs:
            enc = tok(p, c, return_tensors="pt") if as_pair else tok(p + c, return_tensors="pt")
            out.append(float(model(**enc).logits[0, 0]))
    return np.array(out)


def test_text_pair_encoder_is_detected_and_scored_as_trained(bert_rm, tiny_ckpts, tmp_path):
    pairs = fixed_pairs(16, seed=9)
    sp = start_server(
        [
            "--reward-model", f"bert={bert_rm}",
            "--reward-model", f"bert_text={bert_rm}",
            "--input-format", "bert_text=text",
            "--reward-model", f"gpt={tiny_ckpts.reward}",
            "--reward-model", f"gpt_chat={tiny_ckpts.reward}",
            "--input-format", "gpt_chat=chat",
            "--reference-model", f"ref={tiny_ckpts.reference}",
        ],
        tmp_path,
    )  # fmt: skip
    try:
        with RewardClient(sp.address) as c:
            info = {m.name: m.input_format for m in c.server_info().models}
            as_pair = np.array([r.score for r in c.score(pairs, model="bert")])
            as_text = np.array([r.score for r in c.score(pairs, model="bert_text")])
            chat = np.array([r.score for r in c.score(pairs, model="gpt_chat")])
            chat_msgs = np.array(
                [
                    r.score
                    for r in c.score_messages(
                        [
                            [{"role": "user", "content": p}, {"role": "assistant", "content": x}]
                            for p, x in pairs
                        ],
                        model="gpt_chat",
                    )
                ]
            )
            text = np.array([r.score for r in c.score(pairs, model="gpt")])
    finally:
        sp.stop()
    assert info == {
        "bert": "pair",
        "bert_text": "text",
        "gpt": "text",
        "gpt_chat": "chat",
        "ref": "",
    }, info
    want_pair, want_text = inprocess(bert_rm, pairs, True), inprocess(bert_rm, pairs, False)
    np.testing.assert_allclose(as_pair, want_pair, rtol=1e-5, atol=1e-5)  # padded batches
    np.testing.assert_allclose(as_text, want_text, rtol=1e-5, atol=1e-5)
    assert np.abs(want_pair - want_text).max() > 1e-3  # the two formats really differ here
    np.testing.assert_allclose(chat, chat_msgs, atol=1e-6)  # pairs as user/assistant messages
    assert np.abs(chat - text).max() > 1e-4


def test_bad_input_format_is_refused_at_start(tiny_ckpts, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    for args, words in (
        (["--input-format", "rm=pairs"], "must be one of auto, text, pair, chat, got 'pairs'"),
        (["--input-format", "rm=pair"], "input format 'pair' needs a tokenizer with a separator"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "reward_server.cli", "serve", "--device", "cpu",
             "--reward-model", f"rm={tiny_ckpts.reward}", "--port", "0", *args],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode != 0 and words in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
