"""Config loading/validation and combination rules."""

from __future__ import annotations

import pytest

from reward_server.combine import parse_combiner
from reward_server.config import ConfigError, ServerConfig, parse_named


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward_models: {a: /m/a}\nmax_wait_ms: 9\nport: 1234\n")
    cfg = ServerConfig.from_sources(
        str(f), {"port": 99, "max_wait_ms": None, "reward_models": {"b": "/m/b"}}
    )
    assert cfg.port == 99 and cfg.max_wait_ms == 9
    assert cfg.reward_models == {"a": "/m/a", "b": "/m/b"}
    assert cfg.default_reward_model == "a"
    assert (
        cfg.resolved_max_batch_tokens("cpu") == 2048
        and cfg.resolved_max_batch_tokens("cuda") == 16384
    )


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({}, "at least one model"),
        ({"reward_models": {"a": "x"}, "truncation": "mid"}, "truncation must be one of"),
        ({"reward_models": {"a": "x"}, "dtype": "int3"}, "dtype must be one of"),
        ({"reward_models": {"a": "x"}, "reference_models": {"a": "y"}}, "unique"),
        ({"reward_models": {"a": "x"}, "tls_cert": "c"}, "go together"),
        ({"reward_models": {"a": "x"}, "default_reward_model": "zz"}, "not a served reward model"),
        ({"reward_models": {"a": "x"}, "max_queue_items": 1}, "max_queue_items"),
    ],
)
def test_validation_names_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        ServerConfig.from_sources(None, overrides)


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward_models: {a: x}\nmax_batch_tokenz: 3\n")
    with pytest.raises(ConfigError, match="max_batch_tokenz"):
        ServerConfig.from_sources(str(f), {})


def test_parse_named():
    assert parse_named(["/p/rm", "x=/p/x"], "--reward-model", "reward") == {
        "reward": "/p/rm",
        "x": "/p/x",
    }
    assert parse_named(["org/model"], "--reference-model", "reference") == {
        "reference": "org/model"
    }
    with pytest.raises(ConfigError):
        parse_named(["a=1", "a=2"], "--reward-model", "reward")


def test_combiners():
    vals = {"help": 2.0, "safe": -1.0}
    assert parse_combiner("head:safe", ["help", "safe"]).apply(vals) == -1.0
    assert parse_combiner("min", ["help", "safe"]).apply(vals) == -1.0
    assert parse_combiner("mean", ["help", "safe"]).apply(vals) == 0.5
    assert parse_combiner("weighted:help=1,safe=0.5", ["help", "safe"]).apply(vals) == 1.5
    with pytest.raises(ValueError, match="unknown member"):
        parse_combiner("head:x", ["help"])
    with pytest.raises(ValueError, match="kind must be"):
        parse_combiner("max:help", ["help"])
