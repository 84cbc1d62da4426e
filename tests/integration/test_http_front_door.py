"""The HTTP/JSON door (`serve --http-port`) of a real server, through a real HTTP client (urllib):
OpenRLHF's exact `/get_reward` payload, the protobuf JSON routes, the error table, bearer
tokens, metrics and the drain; scores and messages compared with the gRPC door's."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import RewardClient, RewardServiceError
from reward_server.fingerprint import tokenizer_fingerprint
from tests.conftest import free_port, start_server
from tests.helpers import inprocess_scores, scrape

pytestmark = pytest.mark.integration
MAX_ITEMS = 8
PROMPTS = ["the cat", "Question: is the dog big?\nAnswer:", "hello", "a river"]
RESPONSES = [" is good", " yes, the dog is big", " there, bird", " of fish"]


def request(
    port: int,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict, Any]:
    """(status, parsed JSON body, response headers) of one HTTP request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def grpc_error(fn) -> RewardServiceError:
    with pytest.raises(RewardServiceError) as ei:
        fn()
    return ei.value


@pytest.fixture(scope="module")
def http_server(tiny_ckpts, tmp_path_factory):
    port = free_port()
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reward-model",
            f"rm2={tiny_ckpts.multihead_reward}",
            "--reference-model",
            f"ref={tiny_ckpts.reference}",
            "--max-items-per-request",
            str(MAX_ITEMS),
            "--max-message-mb",
            "1",
            "--http-port",
            str(port),
        ],
        tmp_path_factory.mktemp("http"),
        metrics=True,
    )
    sp.http_port = port
    yield sp
    sp.stop()


def test_openrlhf_payload_gets_grpc_scores_in_openrlhf_shape(http_server, tiny_ckpts):
    port = http_server.http_port
    queries = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    prompts = list(PROMPTS)
    prompts[3] = "another prompt"  # not a prefix of its query: the whole query is scored
    # exactly what openrlhf/utils/remote_rm_utils.py posts (requests.post(url, json=data,
    # headers={"Content-Type": "application/json"}))
    payload = {"query": queries, "prompts": prompts, "labels": ["a", "b", "c", "d"]}
    status, body, headers = request(port, "/get_reward", payload)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    # OpenRLHF's keys, and the version that answered (OpenRLHF ignores other keys)
    assert set(body) == {"rewards", "scores", "extra_logs", "model_version"}
    assert len(body["model_version"]) == 12
    with RewardClient(http_server.address) as c:
        want = c.score(list(zip(PROMPTS, RESPONSES, strict=True)))
    np.testing.assert_allclose(body["rewards"], [r.score for r in want], rtol=1e-6, atol=1e-7)
    assert body["scores"] == body["rewards"]
    # OpenRLHF concatenates each value across requests and splits it per sample: one per query
    assert body["extra_logs"]["num_tokens"] == [float(r.num_tokens) for r in want]
    assert body["extra_logs"]["truncated"] == [0.0] * 4
    assert all(len(v) == len(queries) for v in body["extra_logs"].values())
    # the older client sends the query alone: the whole text is scored, the same numbers
    status, alone, _ = request(port, "/get_reward", {"query": queries})
    assert status == 200 and alone["rewards"] == body["rewards"]
    expected = inprocess_scores(str(tiny_ckpts.reward), queries)[:, 0]
    np.testing.assert_allclose(body["rewards"], expected, atol=1e-4)


def test_get_reward_names_a_model_and_logs_its_heads(http_server):
    port = http_server.http_port
    queries = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    status, body, _ = request(port, "/get_reward?model=rm2", {"query": queries})
    assert status == 200
    with RewardClient(http_server.address) as c:
        want = c.score([("", q) for q in queries], model="rm2")
    np.testing.assert_allclose(body["rewards"], [r.score for r in want], rtol=1e-6, atol=1e-7)
    heads = sorted(want[0].head_scores)
    assert len(heads) == 2
    for h in heads:
        np.testing.assert_allclose(
            body["extra_logs"][f"head/{h}"], [r.head_scores[h] for r in want], rtol=1e-6
        )
    long = "word " * 400
    status, body, _ = request(port, "/get_reward?truncation=left", {"query": [long]})
    assert status == 200 and body["extra_logs"]["truncated"] == [1.0]


def test_v1_routes_take_and_return_the_protobuf_json_mapping(http_server, tiny_ckpts):
    port = http_server.http_port
    items = [{"prompt": p, "completion": r} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    body = {"model": "rm2", "items": [*items, {"messages": chat}], "request_id": "req-7"}
    status, resp, _ = request(port, "/v1/score", body)
    assert status == 200
    with RewardClient(http_server.address) as c:
        want = c.score(list(zip(PROMPTS, RESPONSES, strict=True)), model="rm2")
        want += c.score_messages([chat], model="rm2")
        seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
        want_lp = c.reference_logprobs(seqs, [2, 1], temperature=0.7, model="ref")
    assert resp["model"] == "rm2" and resp["requestId"] == "req-7"
    assert set(resp["timing"]) == {"queueMs", "tokenizeMs", "inferenceMs", "totalMs"}
    got = resp["scores"]
    assert [s["numTokens"] for s in got] == [r.num_tokens for r in want]
    np.testing.assert_allclose([s["score"] for s in got], [r.score for r in want], rtol=1e-6)
    assert got[0]["headScores"].keys() == want[0].head_scores.keys()
    assert all(s["truncated"] is False for s in got)  # zero values are present, not omitted

    fp = tokenizer_fingerprint(_tokenizer(tiny_ckpts.reference))
    ref_body = {
        "model": "ref",
        "sequences": [
            {"token_ids": seqs[0], "response_start": 2},
            {"tokenIds": seqs[1], "responseStart": 1},  # both spellings of the mapping
        ],
        "temperature": 0.7,
        "tokenizer_fingerprint": fp,
    }
    status, lp, _ = request(port, "/v1/reference_logprobs", ref_body)
    assert status == 200 and lp["model"] == "ref"
    for got_seq, exp in zip(lp["results"], want_lp, strict=True):
        np.testing.assert_allclose(got_seq["logprobs"], exp, rtol=1e-6)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_errors_have_the_grpc_code_and_message_as_json(http_server):
    port = http_server.http_port
    one = {"prompt": "a", "completion": " b"}

    def error(path: str, body: Any = None, **kw: Any) -> tuple[int, str, str]:
        status, resp, _ = request(port, path, body, **kw)
        assert set(resp) == {"error"}, resp
        return status, resp["error"]["code"], resp["error"]["message"]

    with RewardClient(http_server.address, max_retries=0) as c:
        unknown = grpc_error(lambda: c.score([("a", " b")], model="nope"))
        wrong_role = grpc_error(lambda: c.score([("a", " b")], model="ref"))
        empty = grpc_error(lambda: c.score([("a", "")]))
        fp = grpc_error(lambda: c.reference_logprobs([[1, 2, 3]], [1], tokenizer_fingerprint="x"))
    with grpc.insecure_channel(http_server.address) as channel:  # the client would split it
        stub = pb_grpc.RewardServiceStub(channel)
        items = [pb.ScoreItem(prompt="a", completion=" b")] * (MAX_ITEMS + 1)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Score(pb.ScoreRequest(items=items))
        too_many = ei.value
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT
    assert wrong_role.code == grpc.StatusCode.FAILED_PRECONDITION
    assert fp.code == grpc.StatusCode.FAILED_PRECONDITION

    assert error("/v1/score", {"model": "nope", "items": [one]}) == (
        400,
        "INVALID_ARGUMENT",
        unknown.details,
    )
    assert error("/get_reward?model=nope", {"query": ["a b"]})[2] == unknown.details
    assert error("/v1/score", {"items": [one] * (MAX_ITEMS + 1)})[2] == too_many.details()
    assert error("/get_reward", {"query": ["a b"] * (MAX_ITEMS + 1)})[:2] == (
        400,
        "INVALID_ARGUMENT",
    )
    assert error("/v1/score", {"model": "ref", "items": [one]}) == (
        412,
        "FAILED_PRECONDITION",
        wrong_role.details,
    )
    assert error("/v1/score", {"items": [{"prompt": "a", "completion": ""}]})[2] == empty.details
    assert error("/get_reward", {"query": [""]})[2] == empty.details
    ref = {"sequences": [{"token_ids": [1, 2, 3], "response_start": 1}]}
    assert error("/v1/reference_logprobs", {**ref, "tokenizer_fingerprint": "x"}) == (
        412,
        "FAILED_PRECONDITION",
        fp.details,
    )
    # bodies the door itself refuses
    status, code, msg = error("/get_reward", raw=b'{"query": ["a b"')
    assert (status, code) == (400, "INVALID_ARGUMENT") and "malformed JSON" in msg
    assert error("/v1/score", raw=b"\xff\xfe")[:2] == (400, "INVALID_ARGUMENT")
    assert "'query' is missing" in error("/get_reward", {"prompts": ["a"]})[2]
    assert "list of strings" in error("/get_reward", {"query": "a b"})[2]
    assert "list of strings" in error("/get_reward", {"query": ["a", 3]})[2]
    assert "'prompts' has 1 entries" in error("/get_reward", {"query": ["a", "b"], "prompts": ["a"]})[2]  # fmt: skip
    assert error("/get_reward", ["a b"])[:2] == (400, "INVALID_ARGUMENT")
    assert "truncation" in error("/get_reward?truncation=middle", {"query": ["a b"]})[2]
    status, code, msg = error("/v1/score", {"itemz": [one]})
    assert (status, code) == (400, "INVALID_ARGUMENT") and "rlhf.v1.ScoreRequest" in msg
    assert error("/v1/score", [one])[:2] == (400, "INVALID_ARGUMENT")
    assert "X-Request-Timeout" in error("/v1/score", {"items": [one]}, headers={"X-Request-Timeout": "soon"})[2]  # fmt: skip
    # a deadline that has passed before the forward: DEADLINE_EXCEEDED, as over gRPC
    status, code, _ = error("/v1/score", {"items": [one]}, headers={"X-Request-Timeout": "1e-9"})
    assert (status, code) == (504, "DEADLINE_EXCEEDED")
    # over --max-message-mb (1 MiB): 413, code RESOURCE_EXHAUSTED
    big = {"query": ["x" * (1 << 20)]}
    status, code, msg = error("/get_reward", big)
    assert (status, code) == (413, "RESOURCE_EXHAUSTED") and "1 MiB" in msg
    assert error("/v2/score", {"items": [one]})[:2] == (404, "NOT_FOUND")
    assert error("/get_reward", method="GET")[:2] == (405, "UNIMPLEMENTED")
    # and the server keeps serving
    assert request(port, "/get_reward", {"query": ["still here"]})[0] == 200

    m = scrape(http_server.metrics_port)
    assert m['reward_server_requests_total{code="OK",rpc="/get_reward"}'] >= 1
    assert m['reward_server_requests_total{code="FAILED_PRECONDITION",rpc="/v1/score"}'] == 1
    assert m['reward_server_requests_total{code="DEADLINE_EXCEEDED",rpc="/v1/score"}'] == 1
    assert m['reward_server_requests_total{code="RESOURCE_EXHAUSTED",rpc="/get_reward"}'] == 1
    assert m['reward_server_requests_total{code="INVALID_ARGUMENT",rpc="Score"}'] >= 3  # gRPC
    assert m['reward_server_request_seconds_count{rpc="/v1/reference_logprobs"}'] >= 1


def test_health_is_200_only_while_serving(http_server):
    status, body, _ = request(http_server.http_port, "/health", method="GET")
    assert (status, body) == (200, {"status": "SERVING"})


def test_bearer_tokens_are_the_grpc_doors(tiny_ckpts, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("s3cret-token\n")
    port = free_port()
    args = ["--reward-model", str(tiny_ckpts.reward), "--auth-token-file", str(token_file)]
    sp = start_server(
        [*args, "--http-port", str(port)], tmp_path, ready_kwargs={"token": "s3cret-token"}
    )
    try:
        body = {"query": ["the cat is good"]}
        status, resp, headers = request(port, "/get_reward", body)
        assert status == 401 and resp["error"]["code"] == "UNAUTHENTICATED"
        assert "missing bearer token" in resp["error"]["message"]
        assert headers["WWW-Authenticate"] == "Bearer"
        status, resp, _ = request(
            port, "/v1/score", {"items": []}, headers={"Authorization": "Bearer wrong"}
        )
        assert status == 401 and "invalid bearer token" in resp["error"]["message"]
        assert request(port, "/health", method="GET")[0] == 401  # no --open-health
        ok = {"Authorization": "Bearer s3cret-token"}
        status, resp, _ = request(port, "/get_reward", body, headers=ok)
        assert status == 200 and len(resp["rewards"]) == 1
        assert request(port, "/health", method="GET", headers=ok)[0] == 200
    finally:
        sp.stop()
    assert "s3cret-token" not in sp.log() and "wrong" not in sp.log()


def test_open_health_answers_without_a_token(tiny_ckpts, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("tok\n")
    port = free_port()
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--auth-token-file",
            str(token_file),
            "--open-health",
            "--http-port",
            str(port),
        ],
        tmp_path,
        ready_kwargs={"token": "tok"},
    )
    try:
        assert request(port, "/health", method="GET")[:2] == (200, {"status": "SERVING"})
        assert request(port, "/get_reward", {"query": ["a b"]})[0] == 401
    finally:
        sp.stop()


WORDS = "the cat dog bird fish tree river good bad big small".split()
LONG = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(900)) for i in range(4)]


@pytest.fixture(scope="module")
def slow_ckpts(tmp_path_factory):
    """Wider models with 1024 positions, so a long batch takes a noticeable time on CPU."""
    from reward_server.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(
        tmp_path_factory.mktemp("slow"), n_layer=6, n_embd=384, n_head=6, n_positions=1024
    )


def _slow_server(slow_ckpts, tmp_path, *extra: str):
    port = free_port()
    sp = start_server(
        [
            "--reward-model",
            str(slow_ckpts.reward),
            "--max-batch-tokens",
            "8192",
            "--max-batch-items",
            "8",
            "--max-wait-ms",
            "2",
            "--http-port",
            str(port),
            *extra,
        ],
        tmp_path,
    )
    sp.http_port = port
    return sp


def test_full_queue_is_429(slow_ckpts, tmp_path):
    sp = _slow_server(slow_ckpts, tmp_path, "--max-queue-items", "8")
    port = sp.http_port
    try:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(request, port, "/get_reward", {"query": LONG})
            time.sleep(0.3)
            queued = pool.submit(request, port, "/get_reward", {"query": LONG * 2})
            time.sleep(0.3)
            status, resp, _ = request(port, "/get_reward", {"query": ["x y"]})
            assert (status, resp["error"]["code"]) == (429, "RESOURCE_EXHAUSTED")
            assert "max_queue_items 8" in resp["error"]["message"]
            assert busy.result(60)[0] == 200 and queued.result(60)[0] == 200
        assert request(port, "/get_reward", {"query": ["x y"]})[0] == 200
    finally:
        sp.stop()


def test_drain_answers_503_and_lets_in_flight_requests_finish(slow_ckpts, tmp_path):
    sp = _slow_server(slow_ckpts, tmp_path, "--grace-seconds", "60")
    port = sp.http_port
    expected = inprocess_scores(str(slow_ckpts.reward), LONG)[:, 0]
    try:
        with ThreadPoolExecutor(4) as pool:
            inflight = [
                pool.submit(request, port, "/get_reward", {"query": LONG}) for _ in range(4)
            ]
            time.sleep(0.5)
            sp.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert request(port, "/health", method="GET")[:2] == (
                503,
                {"status": "NOT_SERVING"},
            )
            status, resp, _ = request(port, "/get_reward", {"query": ["new request"]})
            assert (status, resp["error"]["code"]) == (503, "UNAVAILABLE")
            assert "draining" in resp["error"]["message"]
            with RewardClient(sp.address, max_retries=0) as c:  # the gRPC door says the same
                err = grpc_error(lambda: c.score([("new", " request")]))
            assert err.code == grpc.StatusCode.UNAVAILABLE and err.details.startswith(
                resp["error"]["message"]
            )
            for f in inflight:
                status, resp, _ = f.result(120)
                assert status == 200
                np.testing.assert_allclose(resp["rewards"], expected, atol=1e-4)
        assert sp.proc.wait(60) == 0
        assert "draining" in sp.log() and "stopped" in sp.log()
    finally:
        sp.stop()


def test_tls_and_mutual_tls_cover_the_http_port(tiny_ckpts, tmp_path):
    import ssl

    from tests.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    port = free_port()
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--tls-client-ca",
            str(certs.ca),
            "--http-port",
            str(port),
        ],
        tmp_path,
        ready_kwargs={
            "tls_ca": str(certs.ca),
            "tls_cert": str(certs.client_cert),
            "tls_key": str(certs.client_key),
        },
    )
    body = json.dumps({"query": ["the cat is good"]}).encode()
    url = f"https://127.0.0.1:{port}/get_reward"
    try:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, body, timeout=10, context=ctx)  # no client certificate
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        with urllib.request.urlopen(url, body, timeout=10, context=ctx) as resp:
            assert resp.status == 200 and len(json.loads(resp.read())["rewards"]) == 1
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext on TLS
            urllib.request.urlopen(url.replace("https", "http"), body, timeout=10)
    finally:
        sp.stop()
