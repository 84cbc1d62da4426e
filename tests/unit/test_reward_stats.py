"""The reward-hacking statistics (`reward_server.reward_stats`) against hand-computed values, and
the server's telemetry windows (`reward_server.serve.telemetry`): eviction by count and by time,
the first-window baseline and drift, tenant capping, and the Prometheus export."""

from __future__ import annotations

import math

import pytest

from reward_server.reward_stats import (
    drift_sigma,
    histogram,
    mean_std,
    pearson,
    ranks,
    spearman,
    summarize,
)
from reward_server.score_result import ScoreResult
from reward_server.serve.metrics import ServerMetrics
from reward_server.serve.telemetry import OTHER_TENANT, Telemetry


def test_pearson_by_hand() -> None:
    # x = 1..5, y = 2, 4, 5, 4, 5: mean x 3, mean y 4; sum dx*dy = 6, sum dx^2 = 10,
    # sum dy^2 = 6 -> r = 6 / sqrt(60) = 0.774596...
    assert pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    # undefined: one pair, or a constant series
    assert math.isnan(pearson([1], [2]))
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_pearson_is_exact_for_large_offsets() -> None:
    """Centred sums: a window of large, close values (e.g. lengths ~1e6) loses nothing."""
    xs = [1e9 + v for v in (1, 2, 3, 4, 5)]
    assert pearson(xs, [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60), rel=1e-9)


def test_ranks_average_ties() -> None:
    assert ranks([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]
    assert ranks([]) == []


def test_spearman_by_hand() -> None:
    # monotone but not linear: rho 1 where Pearson is below 1
    x = [1, 2, 3, 4, 5]
    y = [1, 4, 9, 16, 100]
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.95
    # ranks of y: 2, 1, 4, 3, 5 -> sum d^2 = 4 -> rho = 1 - 6*4 / (5*24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    # with ties (the Pearson-of-average-ranks definition): ranks x 1,2,3,4; y 1.5,1.5,3,4
    # dx = -1.5,-.5,.5,1.5; dy = -1,-1,.5,1.5 -> sum dx*dy 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert math.isnan(spearman([1], [1]))


def test_mean_std_histogram_drift() -> None:
    assert mean_std([2, 4, 4, 4, 5, 5, 7, 9]) == (5.0, 2.0)  # population std
    assert all(math.isnan(v) for v in mean_std([]))
    edges, counts = histogram([0, 1, 2, 3, 4, 10], bins=5)
    assert edges == [0, 2, 4, 6, 8, 10]
    assert counts == [2, 2, 1, 0, 1]  # 4 falls in [4, 6); 10 is the last bin's right edge
    assert histogram([3, 3], bins=4) == ([3, 3], [2])
    assert histogram([]) == ([], [])
    assert drift_sigma(7.0, 5.0, 2.0) == 1.0
    assert drift_sigma(1.0, 5.0, 2.0) == -2.0
    assert math.isnan(drift_sigma(1.0, 5.0, 0.0))
    assert math.isnan(drift_sigma(1.0, float("nan"), float("nan")))


def test_summarize_drops_lost_items_and_correlates_members() -> None:
    nan = float("nan")
    st = summarize(
        [1.0, 2.0, nan, 3.0, 4.0],
        [10, 20, 99, 30, 40],
        members=("a", "b", "c"),
        member_scores=[(1, 4, 1), (2, 3, 2), (nan, nan, nan), (3, 2, 3), (4, 1, 5)],
    )
    assert st.items == 4
    assert st.mean == 2.5 and st.length_mean == 25.0
    assert st.length_correlation == pytest.approx(1.0)
    assert st.member_rank_correlations[("a", "b")] == pytest.approx(-1.0)
    assert st.member_rank_correlations[("a", "c")] == pytest.approx(1.0)
    assert st.member_rank_correlations[("b", "c")] == pytest.approx(-1.0)
    assert st.min_member_rank_correlation == pytest.approx(-1.0)
    assert sum(st.histogram_counts) == 4
    assert summarize([1.0], [3]).member_rank_correlations == {}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _res(scores, lengths):
    return [
        ScoreResult(score=s, head_scores={}, num_tokens=n, truncated=False)
        for s, n in zip(scores, lengths, strict=True)
    ]


def test_window_evicts_by_count_and_fixes_the_first_window_as_baseline() -> None:
    tel = Telemetry(max_items=4, max_seconds=0.0, max_tenants=4, clock=Clock())
    tel.observe("rm", "t", _res([1, 2, 3], [1, 2, 3]), ())
    (w,) = tel.stats()
    assert w.stats.items == 3 and w.total_items == 3
    assert math.isnan(w.baseline_mean) and math.isnan(w.drift_sigma)  # window not yet full
    tel.observe("rm", "t", _res([4], [4]), ())  # first full window: 1, 2, 3, 4
    (w,) = tel.stats()
    assert w.baseline_mean == 2.5 and w.baseline_std == pytest.approx(math.sqrt(1.25))
    assert w.drift_sigma == 0.0
    tel.observe("rm", "t", _res([10, 10, 10, 10, 10, 10], [5, 6, 7, 8, 9, 10]), ())
    (w,) = tel.stats()
    assert w.stats.items == 4 and w.total_items == 10  # only the last 4 kept
    assert w.stats.mean == 10.0
    assert w.baseline_mean == 2.5  # the baseline stays the first window's
    assert w.drift_sigma == pytest.approx(7.5 / math.sqrt(1.25))
    assert math.isnan(w.stats.length_correlation)  # constant scores: undefined


def test_window_evicts_by_time() -> None:
    clock = Clock()
    tel = Telemetry(max_items=100, max_seconds=10.0, max_tenants=4, clock=clock)
    tel.observe("rm", "t", _res([1, 2], [1, 2]), ())
    clock.t += 6
    tel.observe("rm", "t", _res([3, 4], [3, 4]), ())
    clock.t += 6  # the first two are 12 s old: out of the window, and they made the baseline
    tel.observe("rm", "t", _res([5], [5]), ())
    (w,) = tel.stats()
    assert w.stats.items == 3 and w.stats.mean == 4.0 and w.total_items == 5
    assert w.baseline_mean == 2.5  # the first 10 s: 1, 2, 3, 4
    assert w.span_seconds == 6.0
    clock.t += 30  # nothing new: a read drops what has expired
    (w,) = tel.stats()
    assert w.stats.items == 0 and math.isnan(w.stats.mean)


def test_tenants_are_capped_and_models_kept_apart() -> None:
    tel = Telemetry(max_items=10, max_tenants=2, clock=Clock())
    labels = [tel.observe("rm", t, _res([1.0], [3]), ()) for t in ("a", "b", "c", "d", "a")]
    assert labels == ["a", "b", OTHER_TENANT, OTHER_TENANT, "a"]
    tel.observe("other-rm", "a", _res([2.0], [3]), ())
    keys = [(w.model, w.tenant, w.total_items) for w in tel.stats()]
    assert keys == [("other-rm", "a", 1), ("rm", OTHER_TENANT, 2), ("rm", "a", 2), ("rm", "b", 1)]
    assert [w.tenant for w in tel.stats(model="rm", tenant="a")] == ["a"]


def test_combination_members_and_prometheus_export() -> None:
    tel = Telemetry(max_items=50, clock=Clock())
    members = ("helpful", "safe")
    results = [
        ScoreResult(
            score=float(i),
            head_scores={"helpful": float(i), "safe": float(-i)},
            num_tokens=i,
            truncated=False,
        )
        for i in range(1, 11)
    ]
    tel.observe("overall", "team", results, members)
    (w,) = tel.stats()
    assert w.stats.member_rank_correlations == {("helpful", "safe"): pytest.approx(-1.0)}
    m = ServerMetrics()
    m.add_telemetry(tel)
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    lab = 'model="overall",tenant="team"'
    assert f"reward_server_score_mean{{{lab}}} 5.5" in text
    assert f"reward_server_score_length_correlation{{{lab}}} 1.0" in text
    assert f"reward_server_score_window_items{{{lab}}} 10.0" in text
    assert (
        'reward_server_member_rank_correlation{member_a="helpful",member_b="safe",'
        'model="overall",tenant="team"} -1.0' in text
    )
    assert f"reward_server_scores_count{{{lab}}} 10.0" in text
    assert f'reward_server_scores_bucket{{le="5.0",{lab}}} 5.0' in text  # 1..5 are <= 5
    assert f'reward_server_scores_bucket{{le="3.0",{lab}}} 3.0' in text
    assert f'reward_server_scores_bucket{{le="10.0",{lab}}} 10.0' in text
    assert f'reward_server_scores_bucket{{le="+Inf",{lab}}} 10.0' in text
    assert f"reward_server_scores_sum{{{lab}}} 55.0" in text
    assert "reward_server_score_drift_sigma{" not in text  # no baseline yet: left out, not NaN
