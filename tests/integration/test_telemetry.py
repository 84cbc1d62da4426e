"""Reward-hacking telemetry through the real server: items whose scores rise with their length
(one tenant) against items whose scores fall with it (a control tenant), a drifting tenant and a
combination's members; GetStats, `reward-server info --stats` and /metrics report the same
figures as `reward_server.reward_stats` computed here on the responses."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import grpc
import numpy as np
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import RewardClient
from reward_server.reward_stats import mean_std, pearson, spearman
from tests.conftest import REPO, start_server
from tests.helpers import fixed_pairs, scrape

pytestmark = pytest.mark.integration
WINDOW = 40


def score_as(stub, tenant: str | None, pairs, model: str = "rm") -> list[pb.ItemScore]:
    """Score with the `tenant` metadata key (None: no key, the default tenant)."""
    req = pb.ScoreRequest(
        model=model, items=[pb.ScoreItem(prompt=p, completion=c) for p, c in pairs]
    )
    md = (("tenant", tenant),) if tenant is not None else ()
    return list(stub.Score(req, timeout=60, metadata=md).scores)


@pytest.fixture(scope="module")
def run(tiny_ckpts, tmp_path_factory):
    """A server with window 40; four tenants' traffic; the responses kept for the checks."""
    sp = start_server(
        [
            "--reward-model", f"rm={tiny_ckpts.reward}",
            "--reward-model", f"rm2={tiny_ckpts.multihead_reward}",
            "--combination", "both=weighted:rm=1,rm2=1",
            "--telemetry-window-items", str(WINDOW),
            "--max-items-per-request", "200",
        ],
        tmp_path_factory.mktemp("telemetry"),
        metrics=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(sp.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            pool = fixed_pairs(160, seed=11, max_words=40)
            probe = score_as(stub, "probe", pool)  # 160 items: the window keeps the last 40
            s = np.array([r.score for r in probe])
            n = np.array([r.num_tokens for r in probe])
            long_, high = n > np.median(n), s > np.median(s)
            # the hacked tenant: long items that score high, short ones that score low
            hacked = [i for i in range(len(pool)) if long_[i] == high[i]][:WINDOW]
            # the control: the opposite (scores fall with length)
            control = [i for i in range(len(pool)) if long_[i] != high[i]][:WINDOW]
            out = {
                "hacked": score_as(stub, "hacker", [pool[i] for i in hacked]),
                "control": score_as(stub, "control", [pool[i] for i in control]),
            }
            # drift: a first window of mixed items, then the 40 best-scoring ones
            order = np.argsort(s)
            out["drift_first"] = score_as(stub, "drift", pool[:WINDOW])
            out["drift_then"] = score_as(stub, "drift", [pool[i] for i in order[-WINDOW:]])
            out["both"] = score_as(stub, None, pool[:30], model="both")
        yield sp, out
    finally:
        sp.stop()


def _by_tenant(resp: pb.GetStatsResponse, model: str) -> dict[str, pb.ScoreWindowStats]:
    return {w.tenant: w for w in resp.windows if w.model == model}


def test_get_stats_reports_the_length_correlation_per_tenant(run):
    sp, out = run
    with RewardClient(sp.address) as c:
        resp = c.stats()
        only = c.stats(model="rm", tenant="hacker")
    assert resp.enabled and resp.window_max_items == WINDOW and resp.max_tenants == 16
    rm = _by_tenant(resp, "rm")
    assert set(rm) == {"probe", "hacker", "control", "drift"}
    assert [(w.model, w.tenant) for w in only.windows] == [("rm", "hacker")]
    for tenant, key in (("hacker", "hacked"), ("control", "control")):
        items = out[key]
        want = pearson([r.score for r in items], [r.num_tokens for r in items])
        w = rm[tenant]
        assert w.window_items == WINDOW and w.total_items == WINDOW
        assert w.length_correlation == pytest.approx(want, abs=1e-4)
        m, sd = mean_std([r.score for r in items])
        assert w.score_mean == pytest.approx(m, abs=1e-5)
        assert w.score_std == pytest.approx(sd, abs=1e-5)
        assert sum(w.histogram_counts) == WINDOW
        assert len(w.histogram_edges) == len(w.histogram_counts) + 1
        assert w.length_mean == pytest.approx(np.mean([r.num_tokens for r in items]))
    # the hacked tenant's scores rise with length, the control's fall
    assert rm["hacker"].length_correlation > 0.6
    assert rm["control"].length_correlation < -0.6
    # the probe scored 160 items; its window holds the last 40, its baseline the first 40
    assert rm["probe"].total_items == 160 and rm["probe"].window_items == WINDOW


def test_drift_from_the_first_window(run):
    sp, out = run
    with RewardClient(sp.address) as c:
        w = _by_tenant(c.stats(tenant="drift"), "rm")["drift"]
    base_mean, base_std = mean_std([r.score for r in out["drift_first"]])
    now_mean, _ = mean_std([r.score for r in out["drift_then"]])
    assert w.baseline_mean == pytest.approx(base_mean, abs=1e-5)
    assert w.baseline_std == pytest.approx(base_std, abs=1e-5)
    assert w.drift_sigma == pytest.approx((now_mean - base_mean) / base_std, abs=1e-3)
    assert w.drift_sigma > 1.0  # the best-scoring items sit well above the first window
    # a tenant whose window never filled has no baseline yet
    with RewardClient(sp.address) as c:
        both = _by_tenant(c.stats(model="both"), "both")["default"]
    assert math.isnan(both.baseline_mean) and math.isnan(both.drift_sigma)


def test_combination_member_rank_correlation(run):
    sp, out = run
    with RewardClient(sp.address) as c:
        w = _by_tenant(c.stats(model="both"), "both")["default"]
    items = out["both"]
    want = spearman([r.head_scores["rm"] for r in items], [r.head_scores["rm2"] for r in items])
    (pair,) = w.member_rank_correlations
    assert (pair.member_a, pair.member_b) == ("rm", "rm2")
    assert pair.spearman == pytest.approx(want, abs=1e-4)
    assert w.window_items == 30


def test_metrics_expose_the_gauges(run):
    sp, out = run
    with RewardClient(sp.address) as c:
        rm = _by_tenant(c.stats(model="rm"), "rm")
        both = _by_tenant(c.stats(model="both"), "both")["default"]
    m = scrape(sp.metrics_port)
    lab = 'model="rm",tenant="hacker"'
    assert m[f"reward_server_score_length_correlation{{{lab}}}"] == pytest.approx(
        rm["hacker"].length_correlation
    )
    assert m[f"reward_server_score_mean{{{lab}}}"] == pytest.approx(rm["hacker"].score_mean)
    assert m[f"reward_server_score_std{{{lab}}}"] == pytest.approx(rm["hacker"].score_std)
    assert m[f"reward_server_scores_count{{{lab}}}"] == WINDOW
    assert m['reward_server_scores_count{model="rm",tenant="probe"}'] == 160
    drift = 'model="rm",tenant="drift"'
    assert m[f"reward_server_score_drift_sigma{{{drift}}}"] == pytest.approx(
        rm["drift"].drift_sigma
    )
    key = (
        'reward_server_member_rank_correlation{member_a="rm",member_b="rm2",model="both",'
        'tenant="default"}'
    )
    assert m[key] == pytest.approx(both.member_rank_correlations[0].spearman)
    assert m['reward_server_requests_total{code="OK",rpc="GetStats"}'] >= 1


def test_info_stats_prints_the_table_and_json(run):
    sp, out = run
    cmd = [sys.executable, "-m", "reward_server.cli", "info", "--stats", "--server", sp.address]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "tenant", "items", "total"]
    hacker = next(ln.split() for ln in lines if ln.split()[:2] == ["rm", "hacker"])
    with RewardClient(sp.address) as c:
        w = _by_tenant(c.stats(model="rm"), "rm")["hacker"]
        rho = _by_tenant(c.stats(model="both"), "both")["default"].member_rank_correlations[0]
    assert hacker[2] == str(WINDOW)
    assert hacker[8] == f"{w.length_correlation:+.3f}"
    assert hacker[6] == "+0.00"  # its only window is its first: the baseline itself
    assert hacker[9] == "-"  # not a combination
    both = next(ln.split() for ln in lines if ln.split()[:2] == ["both", "default"])
    assert both[6] == "-"  # 30 items: the first window is not full, no baseline
    assert both[9] == f"{rho.spearman:.3f}"
    js = subprocess.run(
        [*cmd, "--json", "--tenant", "control"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    data = json.loads(js.stdout)
    assert [w["tenant"] for w in data["windows"]] == ["control"]
    assert data["windows"][0]["lengthCorrelation"] < -0.6


def test_telemetry_off(tiny_ckpts, tmp_path):
    """--no-telemetry: Score works, GetStats answers enabled false and no windows, /metrics has
    no telemetry gauges, `info --stats` says so."""
    sp = start_server(
        ["--reward-model", f"rm={tiny_ckpts.reward}", "--no-telemetry"], tmp_path, metrics=True
    )
    try:
        with RewardClient(sp.address) as c:
            assert len(c.score(fixed_pairs(4, seed=1))) == 4
            resp = c.stats()
        m = scrape(sp.metrics_port)
        cmd = [sys.executable, "-m", "reward_server.cli", "info", "--stats", "--server", sp.address]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    finally:
        sp.stop()
    assert not resp.enabled and not resp.windows
    assert not [k for k in m if k.startswith(("reward_server_score_", "reward_server_scores"))]
    assert "telemetry is off" in out.stdout
