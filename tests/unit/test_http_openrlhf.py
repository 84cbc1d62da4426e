"""The HTTP door's pure pieces: OpenRLHF's /get_reward body to a ScoreRequest (the split rule),
the ScoreResponse to OpenRLHF's answer, the status table, and the --http-port setting."""

from __future__ import annotations

import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.config import ConfigError, ServerConfig
from reward_server.errors import InvalidArgument
from reward_server.serve.http import openrlhf_request, openrlhf_response, split_query
from reward_server.serve.status import HTTP_STATUS, http_status


@pytest.mark.parametrize(
    ("query", "prompt", "expected"),
    [
        ("User: hi\nBot: hello", "User: hi\n", ("User: hi\n", "Bot: hello")),
        ("User: hi\nBot: hello", None, ("", "User: hi\nBot: hello")),
        ("User: hi\nBot: hello", "", ("", "User: hi\nBot: hello")),
        ("<s>User: hi Bot: hello", "User: hi", ("", "<s>User: hi Bot: hello")),  # not a prefix
        ("User: hi", "User: hi", ("", "User: hi")),  # nothing after the prompt
    ],
)
def test_split_keeps_the_text_and_splits_only_at_a_real_prefix(query, prompt, expected):
    p, c = split_query(query, prompt)
    assert (p, c) == expected
    assert p + c == query  # the model always sees exactly the query


def test_openrlhf_body_becomes_a_score_request():
    body = {"query": ["P1 answer", "other"], "prompts": ["P1", "P2"], "labels": [1, None], "x": 0}
    req = openrlhf_request(body, model="helpful", truncation="left")
    assert req.model == "helpful" and req.truncation == pb.TRUNCATION_LEFT
    assert [(i.prompt, i.completion) for i in req.items] == [("P1", " answer"), ("", "other")]
    assert openrlhf_request({"query": []}).items == []  # the engine says "empty batch"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([], "JSON object"),
        ({"prompts": ["a"]}, "'query' is missing"),
        ({"query": "text"}, "list of strings"),
        ({"query": [1]}, "list of strings"),
        ({"query": ["a", "b"], "prompts": ["a"]}, "'prompts' has 1 entries"),
        ({"query": ["a"], "prompts": [None]}, "list of strings"),
    ],
)
def test_bad_openrlhf_bodies_are_invalid_argument(body, words):
    with pytest.raises(InvalidArgument, match=words):
        openrlhf_request(body)


def test_bad_truncation_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="truncation"):
        openrlhf_request({"query": ["a"]}, truncation="middle")


def test_response_has_one_value_per_query_in_every_list():
    resp = pb.ScoreResponse()
    for score, n, trunc in [(0.5, 3, False), (-1.25, 7, True)]:
        s = resp.scores.add(score=score, num_tokens=n, truncated=trunc)
        s.head_scores.update({"helpful": score, "safe": 2 * score})
    out = openrlhf_response(resp)
    assert out["rewards"] == out["scores"] == [0.5, -1.25]
    assert out["extra_logs"] == {
        "num_tokens": [3.0, 7.0],
        "truncated": [0.0, 1.0],
        "head/helpful": [0.5, -1.25],
        "head/safe": [1.0, -2.5],
    }
    single = pb.ScoreResponse()
    s = single.scores.add(score=1.0, num_tokens=2, normalized_score=0.25, has_normalized_score=True)
    s.head_scores["rm"] = 1.0
    assert openrlhf_response(single)["extra_logs"] == {
        "num_tokens": [2.0],
        "truncated": [0.0],
        "normalized_score": [0.25],
    }


def test_status_table():
    assert HTTP_STATUS == {
        "INVALID_ARGUMENT": 400,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
        "FAILED_PRECONDITION": 412,
        "RESOURCE_EXHAUSTED": 429,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 504,
    }
    assert http_status("SOMETHING_NEW") == 500


def test_http_port_is_checked(tmp_path):
    base = {"reward_models": {"rm": str(tmp_path)}}
    ServerConfig(**base, http_port=8000).validate()
    with pytest.raises(ConfigError, match="http_port out of range"):
        ServerConfig(**base, http_port=70000).validate()
    with pytest.raises(ConfigError, match="also the gRPC or metrics port"):
        ServerConfig(**base, port=8000, http_port=8000).validate()
