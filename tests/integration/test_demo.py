"""`make demo`'s entry point: a scaled-down run (fast) and the full targets (slow, two seeds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
KEYS = [
    "rm_heldout_accuracy",
    "rm_bayes_ceiling",
    "gold_reward_sft",
    "gold_reward_final",
    "proxy_reward_sft",
    "proxy_reward_final",
    "kl_final",
    "eos_rate_final",
    "gold_win_rate_vs_sft",
    "wall_seconds",
]


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_demo(out: Path, *extra: str, timeout: int = 900) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "policy_trainer.demo", "--output", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gold win-rate of final vs SFT" in r.stdout
    return json.loads((out / "summary.json").read_text())


def test_scaled_down_demo_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    s = run_demo(
        out,
        "--iterations",
        "3",
        "--pairs",
        "300",
        "--heldout-pairs",
        "80",
        "--sft-steps",
        "40",
        "--eval-prompts",
        "48",
        "--prompts-per-iteration",
        "8",
        "--rm-epochs",
        "1",
        "--bon-n",
        "1,4",
        "--bon-prompts",
        "6",
    )
    for key in KEYS:
        assert key in s and isinstance(s[key], (int, float)) and math.isfinite(s[key]), key
    # the three methods, each through its own command against the same server
    for method in ("sft", "ppo", "dpo"):
        for key in ("gold_reward", "proxy_reward", "kl", "eos_rate"):
            assert _finite(s[method][key]), (method, key)
    # the reference is the SFT model: KL(SFT || SFT) = 0, but for the server's full-softmax
    # reference log-probs against the policy's under the sampling mask (logprobs_as_sampled):
    # sum -log(1 - pi_ref(masked tokens)) >= 0, small
    assert -1e-4 < s["sft"]["kl"] < 0.1
    for method in ("ppo", "dpo"):
        assert 0.0 <= s[method]["gold_win_rate_vs_sft"] <= 1.0
    assert s["dpo"]["training"]["step"] == 10  # 300 pairs / 32 per step
    # reward-hacking telemetry: the trainer's figures and the server's window of the PPO run
    t = s["telemetry"]
    assert _finite(t["score_mean_first"]) and _finite(t["score_std_final"])
    # every PPO item the server scored (an empty completion is never sent): 3 iterations x 8
    # prompts x 2 samples at most, all in its window
    assert 0 < t["server"]["total_items"] == t["server"]["window_items"] <= 3 * 8 * 2
    assert _finite(t["server"]["score_mean"])
    bon = s["best_of_n"]["points"]
    assert [p["n"] for p in bon] == [1, 4] and all(p["prompts"] == 6 for p in bon)
    assert bon[0]["analytic_kl"] == 0.0 and bon[1]["analytic_kl"] == pytest.approx(
        math.log(4) - 3 / 4
    )
    for p in bon:
        assert _finite(p["gold_reward"]) and _finite(p["proxy_reward"])
    # best-of-4 keeps the highest of its 4 scores; its mean is best_score_mean
    rows = [
        json.loads(x)
        for x in (out / "best_of_n" / "n4" / "best_of_n.jsonl").read_text().splitlines()
    ]
    assert all(r["score"] == max(x for x in r["scores"] if x is not None) for r in rows)
    assert bon[1]["proxy_reward"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))
    c = s["comparison"]
    assert _finite(c["ppo_kl"]) and _finite(c["dpo_gold_win_rate_vs_sft"])
    assert (out / "methods.png").stat().st_size > 10_000
    assert s["server_exit_code"] == 0  # the server was stopped cleanly (SIGTERM drain)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    assert all("gold_reward_mean" in m and "reward_mean" in m and "kl_mean" in m for m in lines)
    assert -1e-4 < lines[0]["kl_mean"] < 0.1  # policy == reference at the start (as above)
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "rm" / "config.json").exists() and (out / "ppo.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_full_demo_meets_its_targets(tmp_path, seed):
    s = run_demo(tmp_path / "demo", "--seed", str(seed))
    assert s["wall_seconds"] < 600
    assert s["rm_heldout_accuracy"] >= 0.65 and s["rm_heldout_loss"] < math.log(2)
    assert s["gold_win_rate_vs_sft"] >= 0.7
    assert s["gold_reward_final"] > s["gold_reward_sft"]
    assert s["kl_final"] < 8.0
    assert s["eos_rate_final"] >= 0.9
    # issue 15's targets that hold for both seeds (docs/ALGORITHMS.md "The demo compares them"):
    # DPO on the RM's pairs beats SFT; best-of-n's gold rises with n
    assert s["dpo"]["gold_win_rate_vs_sft"] >= 0.7
    bon = [p["gold_reward"] for p in s["best_of_n"]["points"]]
    assert bon == sorted(bon)


@pytest.mark.slow
def test_overoptimization_proxy_rises_while_gold_peaks_and_falls(tmp_path):
    out = tmp_path / "over"
    run_demo(out, "--overoptimization")
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    window = 10

    def smooth(key: str) -> list[float]:
        return [sum(x[key] for x in m[i : i + window]) / window for i in range(len(m) - window + 1)]

    gold, proxy = smooth("gold_reward_mean"), smooth("reward_mean")
    peak = max(range(len(gold)), key=gold.__getitem__)
    assert peak < len(gold) - 1, "gold should peak before the end"
    assert gold[-1] < gold[peak] - 1.0, "gold should fall after its peak"
    assert proxy[-1] > proxy[peak], "the proxy keeps rising past the gold peak"
