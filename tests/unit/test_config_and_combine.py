"""Config loading/validation and combination rules."""

from __future__ import annotations

import os

import pytest

from reward_server.config import ServerConfig, parse_named
from reward_server.config_base import ConfigError, load_config
from reward_server.engine.calibration import default_intra_op_threads
from reward_server.engine.combine import parse_combiner


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward_models: {a: /m/a}\nmax_wait_ms: 9\nport: 1234\n")
    cfg = load_config(ServerConfig, str(f), {"port": 99, "reward_models": {"b": "/m/b"}})
    assert cfg.port == 99 and cfg.max_wait_ms == 9.0 and isinstance(cfg.max_wait_ms, float)
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
        (
            {"reward_models": {"a": "x"}, "truncation": "mid"},
            "truncation must be one of error, left, right, got 'mid'",
        ),
        ({"reward_models": {"a": "x"}, "dtype": "int3"}, "dtype must be one of auto, float32"),
        ({"reward_models": {"a": "x"}, "port": "80"}, "port must be an integer, got '80'"),
        ({"reward_models": {"a": "x"}, "adapters": {"zz": "p"}}, "adapter for unknown model"),
        ({"reward_models": {"a": "x"}, "reference_models": {"a": "y"}}, "unique"),
        ({"reward_models": {"a": "x"}, "tls_cert": "c"}, "go together"),
        ({"reward_models": {"a": "x"}, "default_reward_model": "zz"}, "not a served reward model"),
        ({"reward_models": {"a": "x"}, "max_queue_items": 1}, "max_queue_items"),
    ],
)
def test_validation_names_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(ServerConfig, None, overrides)


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward_models: {a: x}\nmax-batch-tokenz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, str(f), {})
    assert str(info.value) == (
        f"unknown key 'max_batch_tokenz' in {f}; did you mean 'max_batch_tokens'?"
    )
    assert (info.value.key, info.value.file) == ("max_batch_tokenz", str(f))


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
    rule = "overall=weighted:helpful=1,safe=0.5"
    assert parse_named([rule], "--combination") == {"overall": "weighted:helpful=1,safe=0.5"}
    with pytest.raises(ConfigError, match="--adapter: expected NAME=VALUE"):
        parse_named(["/no/name"], "--adapter")


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


def test_per_device_defaults_and_explicit_values_win():
    """0 / -1 mean 'per device' (measured on an H200, docs/BENCHMARKS.md "GPU"): CUDA gets two
    forward streams, a filled token budget and 16384 tokens; a CPU one stream, a fixed cost
    measured at warm-up and 2048 tokens. A configured value is used as given on both."""
    auto = ServerConfig(reward_models={"rm": "x"})
    assert (
        auto.resolved_forward_streams("cuda:1") == 2 and auto.resolved_forward_streams("cpu") == 1
    )
    assert auto.resolved_batch_overhead_tokens("cuda") == 1e9
    assert auto.resolved_batch_overhead_tokens("cpu") is None
    assert (auto.resolved_max_batch_tokens("cuda"), auto.resolved_max_batch_tokens("cpu")) == (
        16384,
        2048,
    )
    # --forward-process: one single-threaded worker per usable core
    cores = len(os.sched_getaffinity(0))
    fp = ServerConfig(reward_models={"rm": "x"}, forward_process=True)
    assert fp.resolved_forward_streams("cpu") == cores
    one = ServerConfig(reward_models={"rm": "x"}, forward_process=True, forward_streams=1)
    assert one.resolved_forward_streams("cpu") == 1
    assert default_intra_op_threads(0, cores, "cpu") == (1 if cores > 1 else 0)
    set_ = ServerConfig(
        reward_models={"rm": "x"}, forward_streams=3, batch_overhead_tokens=0, max_batch_tokens=512
    )
    for dev in ("cuda", "cpu"):
        assert set_.resolved_forward_streams(dev) == 3
        assert set_.resolved_batch_overhead_tokens(dev) == 0
        assert set_.resolved_max_batch_tokens(dev) == 512
