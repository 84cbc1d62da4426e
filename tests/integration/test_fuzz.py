"""Property-based fuzzing of every RPC through the real server (hypothesis, derandomised: the
same cases every run). Every answer has a documented code (never UNKNOWN or INTERNAL), an OK
answer holds only finite numbers, and afterwards a known item still gets its known score. The
inputs come from `bench.fuzz.fuzz_case` (`python -m bench fuzz` runs 100,000 of them)."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import DOCUMENTED, call, fuzz_case, non_finite
from reward_server.client import RewardClient
from tests.conftest import start_server

pytestmark = pytest.mark.integration
SEEN: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzzed(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        [
            "--reward-model", f"reward={tiny_ckpts.reward}",
            "--reward-model", f"rm2={tiny_ckpts.multihead_reward}",
            "--reference-model", f"reference={tiny_ckpts.reference}",
        ],
        tmp_path_factory.mktemp("fuzz"),
    )  # fmt: skip
    with RewardClient(sp.address) as c:
        ref = next(m for m in c.server_info().models if m.name == "reference")
        known = c.score([("the cat", " sat on the mat")])[0].score
    ch = grpc.insecure_channel(sp.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield sp, ch, ref.vocab_size, ref.tokenizer_fingerprint
    ch.close()
    try:
        with RewardClient(sp.address) as c:
            assert c.score([("the cat", " sat on the mat")])[0].score == known
        assert sum(SEEN.values()) >= 300 and SEEN.get("OK", 0) > 0, SEEN
    finally:
        sp.stop()


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.randoms(use_true_random=False))
def test_every_answer_is_documented_and_finite(fuzzed, rng: random.Random) -> None:
    _, ch, vocab, fingerprint = fuzzed
    rpc, request = fuzz_case(rng, vocab, fingerprint)
    code, resp = call(ch, rpc, request)
    SEEN[code] = SEEN.get(code, 0) + 1
    assert code in DOCUMENTED, (rpc, code, resp, request if isinstance(request, bytes) else "")
    if code == "OK":
        assert not non_finite(rpc, resp), (rpc, non_finite(rpc, resp), request)
