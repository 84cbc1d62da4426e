"""The alert rules and the Grafana dashboard of deploy/ name only metrics the server exports (as
a real `ServerMetrics` with telemetry writes them); the dashboard has a panel per figure."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import generate_latest

from reward_server.score_result import ScoreResult
from reward_server.serve.metrics import ServerMetrics
from reward_server.serve.telemetry import Telemetry
from tests.conftest import REPO

RULES = REPO / "deploy" / "prometheus" / "reward-hacking-rules.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "reward-hacking-dashboard.json"
NAME = re.compile(r"reward_server_[a-z_]+")


def exported() -> set[str]:
    """Metric sample names of a server whose telemetry saw a combination past its first window."""
    tel = Telemetry(max_items=10)
    metrics = ServerMetrics()
    metrics.add_telemetry(tel)
    for i in range(25):
        r = ScoreResult(
            score=float(i), head_scores={"a": float(i), "b": -float(i)}, num_tokens=i,
            truncated=False,
        )  # fmt: skip
        tel.observe("both", "default", [r], ("a", "b"))
    names = set()
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line)[0])
    return names


def test_the_rules_name_exported_metrics_and_are_valid() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == {
        "RewardLengthCorrelationHigh",
        "RewardLengthCorrelationRising",
        "RewardScoreDrift",
        "RewardMemberDisagreement",
    }
    have = exported()
    for r in rules:
        assert set(r) >= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
        for name in NAME.findall(r["expr"]):
            assert name in have, (r["alert"], name)


def test_the_dashboard_is_valid_json_with_a_panel_per_figure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    have = exported()
    for e in exprs:
        for name in NAME.findall(e):
            assert name in have, name
    used = {n for e in exprs for n in NAME.findall(e)}
    for figure in (
        "reward_server_score_mean",
        "reward_server_score_std",
        "reward_server_score_drift_sigma",
        "reward_server_score_length_correlation",
        "reward_server_member_rank_correlation",
        "reward_server_scores_bucket",
    ):
        assert figure in used, figure
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model", "tenant"}
