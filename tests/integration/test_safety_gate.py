"""The safety-gated combination through a real server with two reward models: both branches of
the gate, the wire field that marks a safety prompt, and a request without it (old clients)."""

from __future__ import annotations

import math

import grpc
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        [
            "--reward-model",
            f"help={tiny_ckpts.reward}",
            "--reward-model",
            f"safe={tiny_ckpts.multihead_reward}",
            "--head-combine",
            "safe=head:safety",
            "--combination",
            "gate=safety_gate:safety=safe,helpful=help,threshold=0.5",
            "--combination",
            "gate15=safety_gate:safety=safe,helpful=help",
            "--max-wait-ms",
            "5",
        ],
        tmp_path_factory.mktemp("gate-srv"),
        env={"OMP_NUM_THREADS": "1"},
    )
    yield sp
    sp.stop()


def test_both_branches_and_the_safety_flag(server) -> None:
    pairs = fixed_pairs(24, seed=3)
    with RewardClient(server.address) as client:
        helpful = [r.score for r in client.score(pairs, model="help")]
        safety = [r.score for r in client.score(pairs, model="safe")]
        marked = {0, 5, 11}
        items = [
            {"prompt": p, "completion": c, "safety_prompt": i in marked}
            for i, (p, c) in enumerate(pairs)
        ]
        gated = client.score(items, model="gate")
        plain = client.score(pairs, model="gate")
    below = [i for i, s in enumerate(safety) if 1 / (1 + math.exp(-s)) < 0.5]
    assert 0 < len(below) < len(pairs), "the test needs items on both sides of the gate"
    for i, r in enumerate(gated):
        assert r.head_scores == pytest.approx({"help": helpful[i], "safe": safety[i]}, abs=1e-5)
        expect = safety[i] if (i in below or i in marked) else helpful[i]
        assert r.score == pytest.approx(expect, abs=1e-5), i
        assert r.normalized_score is None  # the tiny models carry no statistics
    for i, r in enumerate(plain):  # unmarked: only the score decides
        assert r.score == pytest.approx(safety[i] if i in below else helpful[i], abs=1e-5)
    assert any(i not in below for i in marked)  # the flag changed at least one item's branch


def test_old_style_request_and_default_threshold(server) -> None:
    """A ScoreItem built without the new field (what an old client sends) gets the score branch;
    with the paper's 0.15 the tiny safety model (scores near 0) never gates."""
    pairs = fixed_pairs(6, seed=4)
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        items = [pb.ScoreItem(prompt=p, completion=c) for p, c in pairs]
        resp = stub.Score(pb.ScoreRequest(model="gate15", items=items), timeout=30)
        helpful = stub.Score(pb.ScoreRequest(model="help", items=items), timeout=30)
        safe = stub.Score(pb.ScoreRequest(model="safe", items=items), timeout=30)
        marked = [pb.ScoreItem(prompt=p, completion=c, safety_prompt=True) for p, c in pairs]
        as_safety = stub.Score(pb.ScoreRequest(model="gate15", items=marked), timeout=30)
        # a model that is not a gate ignores the flag
        help_marked = stub.Score(pb.ScoreRequest(model="help", items=marked), timeout=30)
    assert all(1 / (1 + math.exp(-s.score)) >= 0.15 for s in safe.scores)
    for r, h, s, m, hm in zip(
        resp.scores, helpful.scores, safe.scores, as_safety.scores, help_marked.scores, strict=True
    ):
        assert r.score == pytest.approx(h.score, abs=1e-5)
        assert dict(r.head_scores) == pytest.approx({"help": h.score, "safe": s.score}, abs=1e-5)
        assert m.score == pytest.approx(s.score, abs=1e-5)
        assert hm.score == pytest.approx(h.score, abs=1e-5)


def test_bad_gate_rule_is_refused_at_start(tiny_ckpts, tmp_path) -> None:
    sp = start_server(
        [
            "--reward-model",
            f"help={tiny_ckpts.reward}",
            "--combination",
            "gate=safety_gate:safety=nope,helpful=help",
        ],
        tmp_path,
        wait=False,
    )
    try:
        assert sp.proc.wait(timeout=60) != 0
    finally:
        sp.stop()
    assert "unknown member" in sp.log()
