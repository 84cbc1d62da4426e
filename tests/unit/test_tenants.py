"""Tenant names: the token file's NAME:TOKEN lines, the resolver's rule, the tenant config keys."""

from __future__ import annotations

import pytest

from reward_server.config import ConfigError, ServerConfig
from reward_server.config_base import load_config
from reward_server.errors import InvalidArgument
from reward_server.serve.tenants import TenantResolver


def test_token_file_names_tokens_and_keeps_the_old_format(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text("plain-one\n\n# a comment\nalice:tok-a\n  bob : tok-b  \nalice:tok-a2\n")
    monkeypatch.setenv("RLHF_AUTH_TOKENS", "carol:tok-c,env-plain")
    cfg = ServerConfig(reward_models={"rm": "x"}, auth_token_file=str(f))
    assert cfg.named_auth_tokens() == [
        ("token-1", "plain-one"),
        ("alice", "tok-a"),
        ("bob", "tok-b"),
        ("alice", "tok-a2"),  # two tokens, one tenant (rotation)
        ("carol", "tok-c"),
        ("token-6", "env-plain"),
    ]
    assert cfg.auth_tokens() == ["plain-one", "tok-a", "tok-b", "tok-a2", "tok-c", "env-plain"]


def test_a_bad_token_name_is_an_error_that_never_shows_the_token(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_AUTH_TOKENS", raising=False)
    f = tmp_path / "tokens"
    f.write_text("fine\nbad name:s3cret\n")
    cfg = ServerConfig(reward_models={"rm": "x"}, auth_token_file=str(f))
    with pytest.raises(ConfigError, match="auth token #2") as err:
        cfg.named_auth_tokens()
    assert "s3cret" not in str(err.value)


def test_auth_on_the_token_names_the_tenant_and_metadata_is_ignored():
    r = TenantResolver([("alice", "tok-a"), ("bob", "tok-b")])
    assert r.of_metadata([("authorization", "Bearer tok-b"), ("tenant", "alice")]) == "bob"
    assert r.of_metadata([("authorization", "Bearer tok-a")]) == "alice"
    assert r.of_headers("Bearer tok-a", "bob") == "alice"
    assert r.of_metadata([]) == "default"  # an open health check
    assert r.known == ["alice", "bob"]


def test_auth_off_metadata_names_the_tenant_with_a_bounded_number_of_names():
    r = TenantResolver([], max_named=3)
    assert r.of_metadata([("tenant", "job-1")]) == "job-1"
    assert r.of_metadata([("tenant", b"job-2")]) == "job-2"
    assert r.of_metadata([("authorization", "Bearer whatever")]) == "default"
    assert r.of_headers("", "job-3") == "job-3"
    assert r.of_metadata([("tenant", "job-4")]) == "other"  # the 4th distinct name
    assert r.of_metadata([("tenant", "job-1")]) == "job-1"  # known names stay
    with pytest.raises(InvalidArgument, match="not a valid name"):
        r.of_metadata([("tenant", "no spaces please")])
    with pytest.raises(InvalidArgument):
        r.of_claim("x" * 65)


def test_tenant_config_keys_are_checked(tmp_path):
    ok = load_config(
        ServerConfig,
        None,
        {
            "reward_models": {"rm": "x"},
            "tenant_shares": {"a": "3", "b": "0.5"},
            "tenant_quotas": {"a": "10"},
            "tenant_max_queued_items": 100,
        },
    )
    assert ok.shares() == {"a": 3.0, "b": 0.5} and ok.quotas() == {"a": 10}
    for bad, match in [
        ({"tenant_shares": {"a": "0"}}, "tenant_shares"),
        ({"tenant_shares": {"a": "lots"}}, "tenant_shares"),
        ({"tenant_shares": {"a b": "1"}}, "tenant name"),
        ({"tenant_quotas": {"a": "-1"}}, "tenant_quotas"),
        ({"tenant_max_queued_items": -1}, "tenant_max_queued_items"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(ServerConfig, None, {"reward_models": {"rm": "x"}, **bad})
