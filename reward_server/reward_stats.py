"""Reward-hacking statistics of a set of scored items: the score distribution (mean, std,
histogram), the Pearson correlation of score with length, the Spearman rank correlation between
the members of a combination, and the drift of the mean in units of a baseline's std.

Pure (standard library only): the server's sliding windows (`reward_server.serve.telemetry`) and
the PPO trainer's per-iteration figures (`policy_trainer.trainer`) call the same functions, so the
two sides report the same numbers for the same items. A figure that is undefined (fewer than two
items, a constant series) is NaN.

Why these figures: a policy that games its reward model typically drifts to what the model
over-rewards, length first (Singhal et al. 2023, "A Long Way to Go: Investigating Length
Correlations in RLHF", https://arxiv.org/abs/2310.03716), and the proxy score keeps rising past
the point where the true reward falls (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", https://arxiv.org/abs/2210.10760); the members of an ensemble disagree more on
out-of-distribution samples (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization", https://arxiv.org/abs/2310.02743).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

NAN = float("nan")
HISTOGRAM_BINS = 10
"""Bins of `histogram`: equal widths over the items' [min, max] (adaptive)."""


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (two passes); NaN, NaN for no items."""
    n = len(xs)
    if n == 0:
        return NAN, NAN
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / n
    return mean, math.sqrt(var)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's correlation coefficient of paired series (centred sums, so exact for a window of
    shifted values); NaN with fewer than two pairs or when either series is constant."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"pearson: {n} x values but {len(ys)} y values")
    if n < 2:
        return NAN
    mx = math.fsum(xs) / n
    my = math.fsum(ys) / n
    dx = [x - mx for x in xs]
    dy = [y - my for y in ys]
    sxx = math.fsum(d * d for d in dx)
    syy = math.fsum(d * d for d in dy)
    if sxx <= 0.0 or syy <= 0.0:
        return NAN
    r = math.fsum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as Spearman's rho with ties needs)."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = avg
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's of the ranks (ties averaged); NaN as `pearson`."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} x values but {len(ys)} y values")
    if len(xs) < 2:
        return NAN
    return pearson(ranks(xs), ranks(ys))


def histogram(xs: Sequence[float], bins: int = HISTOGRAM_BINS) -> tuple[list[float], list[int]]:
    """``bins`` equal-width bins over [min, max] of the items: (bins + 1 edges, bins counts); the
    last bin includes its right edge. All items equal: one bin. No items: ([], [])."""
    if not xs:
        return [], []
    lo, hi = min(xs), max(xs)
    if hi <= lo:
        return [lo, hi], [len(xs)]
    width = (hi - lo) / bins
    counts = [0] * bins
    for x in xs:
        counts[min(bins - 1, int((x - lo) / width))] += 1
    return [lo + width * i for i in range(bins)] + [hi], counts


def drift_sigma(mean: float, baseline_mean: float, baseline_std: float) -> float:
    """How far ``mean`` lies from the baseline's mean, in baseline standard deviations; NaN
    without a baseline or with a zero baseline std."""
    if not (baseline_std > 0.0) or math.isnan(mean) or math.isnan(baseline_mean):
        return NAN
    return (mean - baseline_mean) / baseline_std


def member_rank_correlations(
    members: Sequence[str], rows: Sequence[Sequence[float]]
) -> dict[tuple[str, str], float]:
    """Spearman's rho between the scores of every pair of members over items whose scores are
    ``rows[i][k]`` (member ``members[k]``); rows with a non-finite value are left out."""
    if len(members) < 2:
        return {}
    kept = [row for row in rows if all(math.isfinite(v) for v in row)]
    cols = [[row[k] for row in kept] for k in range(len(members))]
    return {
        (members[a], members[b]): spearman(cols[a], cols[b])
        for a in range(len(members))
        for b in range(a + 1, len(members))
    }


def min_correlation(corr: dict[tuple[str, str], float]) -> float:
    """The lowest defined pairwise correlation (the most disagreeing pair); NaN if none."""
    vals = [v for v in corr.values() if not math.isnan(v)]
    return min(vals) if vals else NAN


@dataclass
class ScoreStats:
    """The figures of one set of scored items (a server window, or one trainer iteration)."""

    items: int
    """Items with a finite score."""
    mean: float
    std: float
    minimum: float
    maximum: float
    length_mean: float
    """Mean length (tokens) of the items."""
    length_correlation: float
    """Pearson's r of score against length."""
    histogram_edges: list[float] = field(default_factory=list)
    histogram_counts: list[int] = field(default_factory=list)
    member_rank_correlations: dict[tuple[str, str], float] = field(default_factory=dict)
    """Spearman's rho between the scores of each pair of members (a combination only)."""

    @property
    def min_member_rank_correlation(self) -> float:
        """The lowest pairwise member correlation (the most disagreeing pair); NaN if none."""
        return min_correlation(self.member_rank_correlations)


def summarize(
    scores: Sequence[float],
    lengths: Sequence[float],
    members: Sequence[str] = (),
    member_scores: Sequence[Sequence[float]] = (),
    bins: int = HISTOGRAM_BINS,
) -> ScoreStats:
    """The figures of items i = 0..n-1 with score ``scores[i]``, length ``lengths[i]`` and, for a
    combination, one score per member ``member_scores[i][k]`` (member ``members[k]``). Items
    whose score (or a member's score) is not finite are left out (a lost RPC is NaN)."""
    if len(scores) != len(lengths):
        raise ValueError(f"summarize: {len(scores)} scores but {len(lengths)} lengths")
    keep = [i for i, s in enumerate(scores) if math.isfinite(s)]
    s = [float(scores[i]) for i in keep]
    ln = [float(lengths[i]) for i in keep]
    mean, std = mean_std(s)
    edges, counts = histogram(s, bins)
    rows = [member_scores[i] for i in keep] if member_scores else []
    corr = member_rank_correlations(members, rows)
    return ScoreStats(
        items=len(s),
        mean=mean,
        std=std,
        minimum=min(s) if s else NAN,
        maximum=max(s) if s else NAN,
        length_mean=mean_std(ln)[0],
        length_correlation=pearson(s, ln),
        histogram_edges=edges,
        histogram_counts=counts,
        member_rank_correlations=corr,
    )
