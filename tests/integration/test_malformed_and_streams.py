"""Bytes that are not a valid message get INVALID_ARGUMENT on every RPC (not gRPC's UNKNOWN),
counted under that code; a bad request in a ScoreStream is answered in the stream with its own
status while the stream goes on; cancelling a stream drops its queued items."""

from __future__ import annotations

import time

import grpc
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from tests.conftest import start_server
from tests.helpers import inprocess_scores, scrape

pytestmark = pytest.mark.integration

METHODS = {
    "Score": "rlhf.v1.ScoreRequest",
    "ReferenceLogProbs": "rlhf.v1.ReferenceLogProbsRequest",
    "GetServerInfo": "rlhf.v1.GetServerInfoRequest",
    "GetStats": "rlhf.v1.GetStatsRequest",
}
BAD_BYTES = {
    "corrupt wire format": b"\xff\xff\xff\xff\xff",
    "invalid UTF-8 in a string field": b"\x0a\x02\xff\xfe",  # field 1 (model), bytes ff fe
    "truncated length": b"\x12\x40\x0a",  # a nested message claiming 64 bytes, holding 1
}


def cases(method: str) -> dict[str, bytes]:
    """GetServerInfoRequest has no fields: its field 1 is an unknown field, kept as bytes."""
    if method == "GetServerInfo":
        return {k: v for k, v in BAD_BYTES.items() if "UTF-8" not in k}
    return BAD_BYTES


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        ["--reward-model", str(tiny_ckpts.reward), "--reference-model", str(tiny_ckpts.reference)],
        tmp_path_factory.mktemp("malformed"),
        metrics=True,
    )
    yield sp
    sp.stop()


def raw_unary(ch: grpc.Channel, method: str):
    return ch.unary_unary(f"/rlhf.v1.RewardService/{method}")  # bytes in, bytes out


def known_score_is_unchanged(ch: grpc.Channel, ckpts) -> None:
    req = pb.ScoreRequest(items=[pb.ScoreItem(prompt="the cat", completion=" sat on the mat")])
    resp = pb.ScoreResponse.FromString(raw_unary(ch, "Score")(req.SerializeToString(), timeout=30))
    want = inprocess_scores(str(ckpts.reward), ["the cat sat on the mat"])[0, 0]
    assert abs(resp.scores[0].score - want) < 1e-5


def test_malformed_bytes_get_invalid_argument_on_every_rpc(server, tiny_ckpts):
    before = scrape(server.metrics_port)
    seen = 0
    with grpc.insecure_channel(server.address) as ch:
        for method, message in METHODS.items():
            for kind, data in cases(method).items():
                with pytest.raises(grpc.RpcError) as ei:
                    raw_unary(ch, method)(data, timeout=10)
                err = ei.value
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, kind, err)
                assert f"could not be parsed as {message}" in err.details(), err.details()
                seen += 1
        known_score_is_unchanged(ch, tiny_ckpts)
    after = scrape(server.metrics_port)
    for method in METHODS:
        key = f'reward_server_requests_total{{code="INVALID_ARGUMENT",rpc="{method}"}}'
        assert after.get(key, 0) - before.get(key, 0) == len(cases(method)), key
    assert not [k for k in after if 'code="UNKNOWN"' in k or 'code="INTERNAL"' in k]
    assert seen == 11


def test_a_bad_request_is_answered_in_the_stream_and_the_stream_goes_on(server, tiny_ckpts):
    good = [
        pb.ScoreRequest(
            items=[pb.ScoreItem(prompt="a dog", completion=f" ran {i}")], request_id=f"g{i}"
        )
        for i in range(3)
    ]
    msgs = [
        good[0].SerializeToString(),
        pb.ScoreRequest(request_id="empty").SerializeToString(),  # no items: INVALID_ARGUMENT
        BAD_BYTES["invalid UTF-8 in a string field"],
        good[1].SerializeToString(),
        pb.ScoreRequest(
            model="nope", items=good[0].items, request_id="unknown-model"
        ).SerializeToString(),
        good[2].SerializeToString(),
    ]
    with grpc.insecure_channel(server.address) as ch:
        stream = ch.stream_stream("/rlhf.v1.RewardService/ScoreStream")
        resps = [pb.ScoreResponse.FromString(b) for b in stream(iter(msgs), timeout=30)]
    assert [r.request_id for r in resps] == ["g0", "empty", "", "g1", "unknown-model", "g2"]
    ok = [resps[i] for i in (0, 3, 5)]
    want = inprocess_scores(str(tiny_ckpts.reward), [f"a dog ran {i}" for i in range(3)])[:, 0]
    for r, w in zip(ok, want, strict=True):
        assert not r.HasField("status") and len(r.scores) == 1 and abs(r.scores[0].score - w) < 1e-5
    for i, words in ((1, "empty batch"), (2, "could not be parsed"), (4, "nope")):
        st = resps[i].status
        assert (st.code, st.name) == (3, "INVALID_ARGUMENT") and words in st.message, st
        assert len(resps[i].scores) == 0


def test_cancelling_a_stream_drops_its_queued_items(server):
    """A stream sends far more work than the server does in a moment, reads one answer and
    cancels: the queued items are dropped (counted as cancelled), not scored for nobody."""
    long = " the cat sat on the mat and the dog ran" * 12  # ~170 tokens per item
    reqs = [
        pb.ScoreRequest(items=[pb.ScoreItem(prompt=f"q{i}", completion=long)] * 32)
        for i in range(32)
    ]
    before = scrape(server.metrics_port)
    with grpc.insecure_channel(server.address) as ch:
        call = ch.stream_stream(
            "/rlhf.v1.RewardService/ScoreStream",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )(iter(reqs), timeout=120)
        first = next(call)
        assert len(first.scores) == 32
        call.cancel()
    cancelled = 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server sees the cancellation shortly after
        after = scrape(server.metrics_port)
        key = 'reward_server_dropped_items_total{model="reward",reason="cancelled"}'
        cancelled = after.get(key, 0) - before.get(key, 0)
        if cancelled > 0:
            break
        time.sleep(0.2)
    sent = 32 * 32
    key = 'reward_server_items_total{rpc="ScoreStream"}'
    received = after.get(key, 0) - before.get(key, 0)
    assert cancelled > 0, "no queued item was dropped"
    assert received <= sent and cancelled < sent
    # ... and the server still answers.
    with grpc.insecure_channel(server.address) as ch:
        raw_unary(ch, "GetServerInfo")(b"", timeout=10)
