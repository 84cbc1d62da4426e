"""`AsyncRewardClient(score_stream=True)`: Score requests multiplexed over one ScoreStream per
server (reward_server.client.stream_mux), through real servers on loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from reward_server.client import AsyncRewardClient, RewardClient, RewardServiceError
from reward_server.local_server import LocalServer
from tests.conftest import start_server

pytestmark = pytest.mark.integration

WORDS = "the cat dog bird fish tree river good bad big".split()
PAIRS = [(f"p{i}", " " + " ".join(WORDS[: 1 + i % 10])) for i in range(64)]


@pytest.fixture(scope="module")
def two_servers(tiny_ckpts, tmp_path_factory) -> Iterator[list[LocalServer]]:
    tmp = tmp_path_factory.mktemp("stream_client")
    args = ["--reward-model", str(tiny_ckpts.reward), "--max-wait-ms", "5"]
    servers = [start_server(args, tmp, metrics=True) for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def count(server: LocalServer, rpc: str) -> float:
    m = server.metrics()
    return m.get(f'reward_server_requests_total{{code="OK",rpc="{rpc}"}}', 0.0)


def test_concurrent_single_items_go_over_one_stream_and_score_as_unary_calls(two_servers):
    server = two_servers[0]
    with RewardClient(server.address) as c:
        expected = [r.score for r in c.score(PAIRS)]
    before_stream, before_unary = count(server, "ScoreStream"), count(server, "Score")

    async def main() -> list[float]:
        async with AsyncRewardClient(server.address, score_stream=True) as c:
            results = await asyncio.gather(*(c.score([p]) for p in PAIRS))
        return [r[0].score for r in results]

    got = asyncio.run(main())
    assert got == pytest.approx(expected, abs=1e-5)
    assert count(server, "ScoreStream") - before_stream == len(PAIRS)  # one request per item
    assert count(server, "Score") == before_unary  # and no unary call


def test_a_refused_request_raises_its_own_status_and_the_stream_goes_on(two_servers):
    server = two_servers[0]

    async def main() -> tuple[RewardServiceError, RewardServiceError, float]:
        async with AsyncRewardClient(server.address, score_stream=True, max_retries=0) as c:
            with pytest.raises(RewardServiceError) as missing:
                await c.score(PAIRS[:2], model="no-such-model")
            with pytest.raises(RewardServiceError) as foreign:
                await c.score_ids([[5, 6, 7]], tokenizer_fingerprint="another-vocabulary")
            ok = await c.score(PAIRS[:1])
        return missing.value, foreign.value, ok[0].score

    missing, foreign, score = asyncio.run(main())
    assert missing.code == grpc.StatusCode.INVALID_ARGUMENT and "no-such-model" in str(missing)
    assert foreign.code == grpc.StatusCode.FAILED_PRECONDITION and "another-vocabulary" in str(
        foreign
    )
    with RewardClient(server.address) as c:
        assert score == pytest.approx(c.score(PAIRS[:1])[0].score, abs=1e-6)


def test_a_server_lost_mid_stream_fails_over_to_the_next_replica(tiny_ckpts, tmp_path):
    args = ["--reward-model", str(tiny_ckpts.reward), "--max-wait-ms", "5"]
    doomed, survivor = (start_server(args, tmp_path) for _ in range(2))
    try:

        async def main() -> list[float]:
            address = f"{doomed.address},{survivor.address}"
            async with AsyncRewardClient(address, score_stream=True, timeout=10) as c:
                first = await asyncio.gather(*(c.score([p]) for p in PAIRS[:8]))
                doomed.proc.kill()  # SIGKILL: its stream breaks with calls in flight or not
                doomed.proc.wait()
                rest = await asyncio.gather(*(c.score([p]) for p in PAIRS[8:32]))
            return [r[0].score for r in [*first, *rest]]

        got = asyncio.run(main())
        with RewardClient(survivor.address) as c:
            expected = [r.score for r in c.score(PAIRS[:32])]
        assert got == pytest.approx(expected, abs=1e-5)
    finally:
        survivor.stop()
        doomed.stop()


@pytest.mark.parametrize(("setting", "rpc"), [(None, "ScoreStream"), ("0", "Score")])
def test_verl_compute_score_goes_over_the_stream_by_default(two_servers, setting, rpc):
    from reward_server.integrations.verl import compute_score

    server = two_servers[1]
    before = count(server, rpc)

    async def main() -> list[dict]:
        return await asyncio.gather(
            *(
                compute_score(
                    "src",
                    c,
                    None,
                    {"prompt": p},
                    address=server.address,
                    score_stream=setting,
                )
                for p, c in PAIRS[:8]
            )
        )

    out = asyncio.run(main())
    assert all(r["rm_scored"] == 1.0 for r in out)
    assert count(server, rpc) - before == 8
