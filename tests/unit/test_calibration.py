"""The batcher's cost model: the warm-up fit of a forward's fixed cost and its refit from the
forwards served (reward_server.engine.calibration)."""

from __future__ import annotations

import asyncio
import math
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_server.engine import calibration
from reward_server.engine.calibration import (
    OverheadLearner,
    bucket_medians,
    overhead_from_fit,
)
from reward_server.models.reward import EncodedItem


def cost(tokens: int) -> float:
    """2 ms fixed + 10 us per padded token: a fixed cost of 200 tokens."""
    return 0.002 + 1e-5 * tokens


def test_fit_through_several_points_is_exact_on_a_line_and_refuses_no_spread():
    assert overhead_from_fit([(x, cost(x)) for x in (64, 128, 256, 512)]) == pytest.approx(200)
    assert overhead_from_fit([(64, 0.01), (64, 0.02)]) == math.inf  # no spread in tokens
    assert overhead_from_fit([(64, 0.02), (512, 0.01)]) == math.inf  # slope <= 0
    assert overhead_from_fit([(64, 0.001), (512, 0.01)]) == 0.0  # negative intercept: clamped


def test_bucket_medians_ignore_a_burst_of_slow_forwards():
    pts = [(100, cost(100))] * 9 + [(100, 1.0)] + [(400, cost(400))] * 10
    assert overhead_from_fit(bucket_medians(pts)) == pytest.approx(200)
    # plain least squares through the same points is thrown far off by the two outliers
    assert abs(overhead_from_fit(pts) - 200) > 100


def test_learner_follows_the_machine_from_a_wrong_warmup_value():
    rng = random.Random(0)
    learner = OverheadLearner(initial=0.0, window=256, every=32)
    values = []
    for i in range(512):
        n, length = rng.randint(1, 8), rng.randint(16, 256)
        t = cost(n * length) * rng.uniform(0.95, 1.05)
        if i % 17 == 0:
            t *= 20  # contention spikes
        values.append(learner.observe(n * length, t))
    assert values[30] == 0.0  # not refitted before `every` forwards
    assert values[-1] == pytest.approx(200, rel=0.15)
    # the load changes: the fixed cost triples; the window forgets the old points
    for _ in range(512):
        n, length = rng.randint(1, 8), rng.randint(16, 256)
        values.append(learner.observe(n * length, 0.006 + 1e-5 * n * length))
    assert values[-1] == pytest.approx(600, rel=0.05)


def test_learner_keeps_its_value_when_every_forward_has_the_same_size():
    learner = OverheadLearner(initial=123.0, every=4)
    for _ in range(16):
        learner.observe(256, 0.01)
    assert learner.value == 123.0


class LinearRunner:
    """A fake runner whose forward costs nothing but reports `cost` for its padded tokens."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def warmup_items(self, budget: int, max_items: int) -> list[EncodedItem]:
        n = max(1, min(max_items, budget // 64))
        return [EncodedItem([i + 1] + [5] * (budget // n - 1), False) for i in range(n)]

    def forward(self, items: list[EncodedItem]) -> list[float]:
        self.batches.append(len(items))
        return [0.0] * len(items)


def test_warmup_measures_batches_of_1_2_4_8_items_of_one_length(monkeypatch):
    runner = LinearRunner()
    batches = calibration.calibration_batches(runner, 2048, 64)
    assert [len(b) for b in batches] == [1, 2, 4, 8]
    assert {len(it.input_ids) for b in batches for it in b} == {64}
    # the budget and the item cap bound the sizes
    assert [len(b) for b in calibration.calibration_batches(runner, 256, 64)] == [1, 2, 4]
    assert [len(b) for b in calibration.calibration_batches(runner, 2048, 2)] == [1, 2]

    # the fit runs on the timings of those batches, fastest of the interleaved rounds
    clock = iter(range(10**6))
    fake: dict[str, float] = {"now": 0.0}

    def perf_counter() -> float:
        return fake["now"]

    def forward(items: list[EncodedItem]) -> list[float]:
        slow = 5.0 if next(clock) % 7 == 0 else 1.0  # some rounds are slowed down
        fake["now"] += cost(len(items) * 64) * slow
        return [0.0] * len(items)

    runner.forward = forward  # type: ignore[method-assign]
    monkeypatch.setattr(calibration.time, "perf_counter", perf_counter)

    async def main() -> float:
        with ThreadPoolExecutor(1) as pool:
            return await calibration.measure_overhead_tokens(runner, 2048, 64, pool, 1)

    assert asyncio.run(main()) == pytest.approx(200)


@pytest.mark.parametrize("operator_value", [None, 0.0])
def test_warmup_hands_the_batcher_a_learner_unless_the_operator_set_the_cost(
    tiny_ckpts, operator_value
):
    from reward_server.config import ServerConfig
    from reward_server.engine.engine import Engine

    extra = {} if operator_value is None else {"batch_overhead_tokens": operator_value}
    engine = Engine(ServerConfig(reward_models={"rm": str(tiny_ckpts.reward)}, **extra))
    engine.load()

    async def main() -> tuple[float, object]:
        engine.start()
        try:
            await engine.warmup()
            b = engine.batchers["rm"]
            return b.overhead_tokens, b.overhead_learner
        finally:
            await engine.stop()

    overhead, learner = asyncio.run(main())
    if operator_value is None:
        assert isinstance(learner, OverheadLearner)
        assert learner.value == overhead and math.isfinite(overhead)
    else:
        assert learner is None and overhead == 0.0


def test_a_reloaded_model_keeps_the_fixed_cost_and_refits_it(tiny_ckpts, tmp_path):
    from reward_server.config import ServerConfig
    from reward_server.engine.engine import Engine
    from reward_server.tiny import build_tiny_checkpoints

    other = build_tiny_checkpoints(tmp_path / "v2", seed=1)
    engine = Engine(ServerConfig(reward_models={"rm": str(tiny_ckpts.reward)}))
    engine.load()

    async def main() -> tuple[object, object, float, float]:
        engine.start()
        try:
            await engine.warmup()
            old = engine.batchers["rm"]
            result = await engine.reload("rm", str(other.reward))
            assert result.status == "reloaded"
            new = engine.served["rm"].batcher
            return old, new, old.overhead_tokens, new.overhead_tokens
        finally:
            await engine.stop()

    old, new, before, after = asyncio.run(main())
    assert new is not old
    assert after == before
    assert isinstance(new.overhead_learner, OverheadLearner)
    assert new.overhead_learner is not old.overhead_learner
