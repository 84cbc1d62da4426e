"""The batching settings through the real CLI and gRPC: --batch-overhead-tokens (0 = never pad for
company, 1e9 = fill the budget), --no-skip-wait-when-idle and --inline-tokenize-chars."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import scrape

pytestmark = pytest.mark.integration
WORDS = "the cat dog bird fish tree river good bad big small".split()


def burst(address: str, n: int) -> np.ndarray:
    """n single-item Score requests of n different lengths, released together."""
    pairs = [
        ("q", " " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i))) for i in range(n)
    ]
    barrier = threading.Barrier(n)

    def one(i: int) -> float:
        with RewardClient(address) as c:
            barrier.wait()
            return float(c.score([pairs[i]])[0].score)

    with ThreadPoolExecutor(n) as pool:
        return np.array(list(pool.map(one, range(n))))


def tokens(port: int) -> tuple[float, float, float]:
    m = scrape(port)
    key = '{model="reward"}'
    return (
        m.get(f"reward_server_real_tokens_total{key}", 0.0),
        m.get(f"reward_server_padded_tokens_total{key}", 0.0),
        m.get(f"reward_server_batch_size_count{key}", 0.0),
    )


def test_overhead_tokens_zero_never_pads_and_large_fills_batches(tiny_ckpts, tmp_path):
    common = ["--reward-model", str(tiny_ckpts.reward), "--max-wait-ms", "300"]
    tight = start_server(
        [
            *common,
            "--batch-overhead-tokens",
            "0",
            "--no-skip-wait-when-idle",
            "--inline-tokenize-chars",
            "0",
        ],
        tmp_path,
        metrics=True,
    )
    fill = start_server([*common, "--batch-overhead-tokens", "1e9"], tmp_path, metrics=True)
    try:
        before_t, before_f = tokens(tight.metrics_port), tokens(fill.metrics_port)
        s_tight = burst(tight.address, 12)
        s_fill = burst(fill.address, 12)
        real_t, padded_t, forwards_t = np.subtract(tokens(tight.metrics_port), before_t)
        real_f, padded_f, forwards_f = np.subtract(tokens(fill.metrics_port), before_f)
        # 12 different lengths: overhead 0 never adds a longer item to a batch, so no padding
        assert real_t > 0 and padded_t == real_t, (real_t, padded_t)
        assert forwards_t == 12
        # overhead 1e9: the waiting items share forwards, padded to the longest
        assert forwards_f < 12 and padded_f > real_f, (forwards_f, real_f, padded_f)
        assert real_f == real_t
        np.testing.assert_allclose(s_tight, s_fill, atol=1e-5)  # same answers either way
        # the configured value is used as is: no fixed-cost measurement at warm-up
        for sp in (tight, fill):
            assert "fixed cost is" not in sp.log()
    finally:
        tight.stop()
        fill.stop()


def test_bad_batching_settings_fail_with_a_clear_message(tiny_ckpts, tmp_path):
    import subprocess
    import sys

    for flag, value, message in (
        ("--batch-overhead-tokens", "-5", "batch_overhead_tokens must be >= 0, or -1"),
        ("--inline-tokenize-chars", "-1", "inline_tokenize_chars must be >= 0"),
    ):
        cmd = [sys.executable, "-m", "reward_server.cli", "serve", "--device", "cpu"]
        cmd += ["--reward-model", str(tiny_ckpts.reward), flag, value]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_two_forward_streams_answer_like_one(tiny_ckpts, tmp_path):
    """--forward-streams 2 --intra-op-threads 1 reach the engine, and every item gets the same
    score as with one stream (that at most N forwards run at once: tests/unit/test_batcher.py)."""
    args = ["--reward-model", str(tiny_ckpts.reward), "--max-wait-ms", "2"]
    one = start_server(args, tmp_path, metrics=True)
    two = start_server(
        [*args, "--forward-streams", "2", "--intra-op-threads", "1"], tmp_path, metrics=True
    )
    try:
        s_one = burst(one.address, 16)
        s_two = burst(two.address, 16)
        m = scrape(two.metrics_port)
    finally:
        one.stop()
        two.stop()
    np.testing.assert_allclose(s_two, s_one, atol=1e-5)
    assert "2 forward stream(s) on cpu, 1 intra-op thread(s) each" in two.log()
    assert m['reward_server_batch_size_sum{model="reward"}'] == 16  # every item forwarded once
