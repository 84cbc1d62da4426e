"""ScoreStream ordering, the asyncio client, sliced log-probs and PEFT adapters."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import AsyncRewardClient, RewardClient
from tests.conftest import start_server
from tests.helpers import inprocess_logprobs, inprocess_scores

pytestmark = pytest.mark.integration


def test_score_stream_answers_in_request_order(tiny_server, tiny_ckpts):
    words = "the cat dog bird fish tree river good bad big".split()
    reqs = [
        pb.ScoreRequest(
            items=[
                pb.ScoreItem(prompt=f"q{i}", completion=" " + " ".join(words[: 1 + (i * 7) % 10]))
            ]
            * (1 + i % 3),
            request_id=f"r{i}",
        )
        for i in range(12)
    ]
    with grpc.insecure_channel(tiny_server.address) as ch:
        resps = list(pb_grpc.RewardServiceStub(ch).ScoreStream(iter(reqs), timeout=60))
    assert [r.request_id for r in resps] == [f"r{i}" for i in range(12)]
    texts = [r.items[0].prompt + r.items[0].completion for r in reqs]
    expected = inprocess_scores(str(tiny_ckpts.reward), texts)[:, 0]
    for req, resp, e in zip(reqs, resps, expected, strict=True):
        assert len(resp.scores) == len(req.items)
        assert abs(resp.scores[0].score - e) < 1e-5


def test_score_stream_bad_message_is_answered_with_its_code(tiny_server):
    """A bad request no longer ends the stream: its response carries the code (more cases in
    test_malformed_and_streams.py)."""
    reqs = [pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", completion=" b")]), pb.ScoreRequest()]
    with grpc.insecure_channel(tiny_server.address) as ch:
        resps = list(pb_grpc.RewardServiceStub(ch).ScoreStream(iter(reqs), timeout=30))
    assert len(resps) == 2 and len(resps[0].scores) == 1 and not resps[0].HasField("status")
    assert resps[1].status.name == "INVALID_ARGUMENT" and resps[1].status.code == 3


def test_async_client_scores_and_logprobs_with_splitting(tiny_server, tiny_ckpts):
    pairs = [(f"p{i}", f" answer {i} the cat") for i in range(150)]  # > 64 per request: split in 3
    seqs = [[5 + (i % 50), 6, 7, 8 + i % 9, 9] for i in range(70)]

    async def main():
        async with AsyncRewardClient(tiny_server.address) as c:
            await c.wait_until_ready(10)
            scores = await c.score(pairs)
            lps = await c.reference_logprobs(seqs, [2] * len(seqs), 0.8)
            info = await c.server_info()
            return scores, lps, info

    scores, lps, info = asyncio.run(main())
    assert info.max_items_per_request == 64
    with RewardClient(tiny_server.address) as c:
        sync_scores = [r.score for r in c.score(pairs)]
    np.testing.assert_allclose([r.score for r in scores], sync_scores, atol=1e-6)
    expected = inprocess_logprobs(str(tiny_ckpts.reference), seqs[:5], [2] * 5, 0.8)
    for got, e in zip(lps[:5], expected, strict=True):
        np.testing.assert_allclose(got, e, atol=1e-5)
    assert len(lps) == 70


def test_logprobs_in_many_small_slices_equal_the_full_computation(tiny_ckpts):
    from reward_server.models.reference import ReferenceRunner, RefSequence

    runner = ReferenceRunner(
        "ref", str(tiny_ckpts.reference), device="cpu", dtype=None, slice_bytes=4096 * 3
    )
    assert runner.slice_rows < 5  # a 487-token vocabulary: two rows per slice
    seqs = [[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    got = runner.forward([RefSequence(s, 1, 1.3) for s in seqs])
    expected = inprocess_logprobs(str(tiny_ckpts.reference), seqs, [1, 1], 1.3)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_peft_adapter_is_merged_at_load(tiny_ckpts, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_ckpts.reward))
    peft_model = get_peft_model(
        base,
        LoraConfig(r=4, target_modules=["c_attn"], task_type="SEQ_CLS", init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()
    sp = start_server(
        ["--reward-model", f"rm={tiny_ckpts.reward}", "--adapter", f"rm={tmp_path / 'adapter'}"],
        tmp_path,
    )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reward))
        with torch.no_grad():
            exp = merged(**tok("the cat is good", return_tensors="pt")).logits.item()
            plain = AutoModelForSequenceClassification.from_pretrained(str(tiny_ckpts.reward))(
                **tok("the cat is good", return_tensors="pt")
            ).logits.item()
        with RewardClient(sp.address) as c:
            got = c.score([("the cat", " is good")])[0].score
        assert abs(got - exp) < 1e-5
        assert abs(got - plain) > 1e-4  # the adapter changed the scores
    finally:
        sp.stop()
