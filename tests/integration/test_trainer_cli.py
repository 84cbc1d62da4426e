"""The PPO trainer against a real `reward-server serve` process on loopback, tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from policy_trainer.cli import main
from policy_trainer.config import load_config
from policy_trainer.remote import RemoteRewards
from policy_trainer.run_logging import REQUIRED_KEYS, read_metrics
from policy_trainer.trainer import PPOTrainer
from policy_trainer.update import minibatch_losses
from tests.conftest import REPO, start_server

pytestmark = pytest.mark.integration

PROMPTS = [
    "the cat and the dog",
    "a big red car on the road",
    "the answer to the question is",
    "one two three",
    "a happy bird in a tree",
    "the model is helpful and safe",
]


def write_config(path: Path, ckpts: Any, address: str, run_dir: Path, **sections: dict) -> Path:
    """A small run config on the tiny models; ``sections`` update its sections."""
    cfg: dict[str, dict] = {
        "model": {"policy": str(ckpts.reference)},
        "data": {"prompts": PROMPTS, "max_prompt_tokens": 16},
        "rollout": {
            "prompts_per_iteration": 2,
            "samples_per_prompt": 2,
            "chunk_size": 2,
            "max_new_tokens": 8,
        },
        "server": {"address": address, "timeout": 10.0, "retry_budget_seconds": 30.0},
        "ppo": {"epochs": 2, "minibatch_size": 2, "lr": 1e-4},
        "run": {
            "output_dir": str(run_dir),
            "iterations": 2,
            "seed": 0,
            "progress": False,
            "num_threads": 1,
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


SERVER_ENV = {"OMP_NUM_THREADS": "1"}
"""Tiny models run far faster single-threaded on a shared machine (no OpenMP spinning)."""


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """In-process runs set run.num_threads=1; give the rest of the session its threads back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reference-model",
            str(tiny_ckpts.reference),
            "--max-wait-ms",
            "5",
        ],
        tmp_path_factory.mktemp("trainer-srv"),
        env=SERVER_ENV,
    )
    yield sp
    sp.stop()


def test_two_iterations_through_the_cli(server, tiny_ckpts, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_ckpts,
        "127.0.0.1:1",
        run_dir,
        ppo={"adaptive_kl": True},
        run={"iterations": 5},  # the --run.iterations flag below wins over the file
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "policy_trainer.cli", "ppo", "--config", str(cfg), "--server", server.address, "--run.iterations", "2"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        missing = [k for k in REQUIRED_KEYS if k not in m]
        assert not missing, missing
        for k in REQUIRED_KEYS:
            assert isinstance(m[k], (int, float)) and math.isfinite(m[k]), (k, m[k])
        assert 0.0 <= m["eos_rate"] <= 1.0 and 0.0 <= m["clipfrac"] <= 1.0
        assert 0 < m["response_length_mean"] <= 8
        assert m["rpc_wait_seconds"] >= 0 and m["iteration_seconds"] > 0
        assert m["valid_fraction"] > 0 and m["entropy"] > 0
        # reward-hacking telemetry of the run's own rollouts (no combination: no member key)
        assert math.isfinite(m["telemetry/score_mean"]) and m["telemetry/score_std"] >= 0
        corr = m["telemetry/length_corr"]  # None when every response had the same length
        assert corr is None or -1.0 <= corr <= 1.0
        assert "telemetry/member_rank_corr" not in m
    first = metrics[0]
    # the first iteration is the drift baseline
    assert first["telemetry/score_drift_sigma"] in (0.0, None)
    m2 = metrics[1]
    want = (m2["telemetry/score_mean"] - first["telemetry/score_mean"]) / first[
        "telemetry/score_std"
    ]
    assert m2["telemetry/score_drift_sigma"] == pytest.approx(want)
    # policy == reference before any update: the server's log-probs equal the trainer's
    assert abs(first["kl_mean"]) < 1e-4
    assert first["first_ratio_max_abs_dev"] < 1e-5 and first["first_clipfrac"] == 0.0
    assert first["beta"] == 0.05
    # Ziegler controller: KL ~ 0 < target, so beta shrinks by (1 - 0.2 * 4 / 10000)
    assert first["beta_next"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10000), rel=1e-9)
    assert metrics[1]["beta"] == first["beta_next"]
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").is_file()
    ckpt = run_dir / "checkpoints" / "iter_000002"
    assert (ckpt / "trainer_state.pt").is_file() and (
        ckpt / "policy" / "model.safetensors"
    ).is_file()
    assert (ckpt / "value_head.pt").is_file()
    assert "done after iteration 2" in proc.stderr
    print(f"2 PPO iterations through the CLI (with interpreter start): {elapsed:.1f}s")


def test_first_rollout_invariants(server, tiny_ckpts, tmp_path: Path) -> None:
    """At the first iteration, before any update: policy log-probs == server reference log-probs
    (KL 0), ratio 1 and clipfrac 0 in the first loss."""
    path = write_config(
        tmp_path / "run.yaml",
        tiny_ckpts,
        server.address,
        tmp_path / "run",
        rollout={"temperature": 0.8},
    )
    trainer = PPOTrainer(load_config(path))
    try:
        trainer.connect()
        batch, timing = trainer.collect(trainer.sampler.next_indices())
        assert batch.valid.all()
        mask = batch.response_mask.bool()
        diff = (batch.old_logprobs - batch.ref_logprobs).abs()[mask]
        assert diff.max().item() < 1e-4, diff.max()
        assert (batch.ref_logprobs[~mask] == 0).all()
        from policy_trainer.experience import make_experience

        exp = make_experience(batch, trainer.cfg.ppo, 0.05, 2, 1.0)
        assert abs(exp.stats["kl_mean"]) < 1e-4
        out = minibatch_losses(
            trainer.model, batch, exp, torch.arange(len(batch)), trainer.cfg.ppo, 0.8, True
        )
        assert out.ratio_max_abs_dev.item() < 1e-5
        assert out.clipfrac.item() == 0.0 and out.approx_kl.item() < 1e-10
        assert timing["rpc_wait_seconds"] >= 0
    finally:
        trainer.close()


def test_rpcs_overlap_and_bad_items_are_masked(server, tiny_ckpts, tmp_path: Path) -> None:
    """submit() returns before the RPCs finish; time spent elsewhere is not counted as waiting;
    an item the server rejects comes back missing while the rest of its batch is scored."""
    from reward_server.client import RewardClient

    cfg = load_config(
        write_config(tmp_path / "r.yaml", tiny_ckpts, server.address, tmp_path / "run")
    )
    with RewardClient(server.address, timeout=10) as client:
        remote = RemoteRewards(client, cfg.server, 1.0, None)
        seqs = [[5, 6, 7, 8], [9, 10, 11], [5, 99999, 7]]  # the last id is out of vocabulary
        t0 = time.perf_counter()
        rpcs = remote.submit([("the cat", " sat"), ("a dog", ""), ("one", " two")], seqs, [1, 1, 1])
        assert time.perf_counter() - t0 < 0.05  # returned at once
        time.sleep(1.0)  # "generating the next chunk"
        scores, refs = remote.collect(rpcs)
        assert remote.pop_wait_seconds() < 0.5  # the RPCs finished during the sleep
        assert np.isfinite(scores[0]) and np.isfinite(scores[2])
        assert np.isnan(scores[1])  # empty completion: not scoreable, masked (not 0)
        direct = client.score([("the cat", " sat")])[0].score
        assert scores[0] == pytest.approx(direct, abs=1e-5)
        assert refs[2] is None and remote.failed_items == 1
        assert len(refs[0]) == 3 and len(refs[1]) == 2
        ref_direct = client.reference_logprobs([seqs[0]], [1])[0]
        np.testing.assert_allclose(refs[0], ref_direct, atol=1e-5)
        remote.close()


def test_critic_from_reward_model_with_lora(server, tiny_ckpts, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "run.yaml", tiny_ckpts, server.address, run_dir,
        model={"value_model": "critic", "critic_path": str(tiny_ckpts.reward), "lora": {"enabled": True, "r": 4}},
        run={"iterations": 1},
    )  # fmt: skip
    assert main(["ppo", "--config", str(cfg)]) == 0
    (m,) = read_metrics(run_dir / "metrics.jsonl")
    assert abs(m["kl_mean"]) < 1e-4 and m["value_loss"] > 0
    # the critic starts from the reward model, so its initial values are not all zero
    assert m["value_mean"] != 0.0
    ckpt = run_dir / "checkpoints" / "iter_000001"
    assert (ckpt / "policy" / "adapter_model.safetensors").is_file()
    assert (ckpt / "critic" / "model.safetensors").is_file()


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators(server, tiny_ckpts, tmp_path: Path, estimator: str) -> None:
    """Group baselines without a value function; prompts from a JSONL file mixing plain and
    chat prompts (chat ones are scored as conversations through the reward model's template)."""
    run_dir = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "the cat and the dog"},
        {"messages": [{"role": "user", "content": "a big red car"}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(
        tmp_path / "run.yaml", tiny_ckpts, server.address, run_dir,
        data={"prompts": str(prompts)},
        ppo={"advantage_estimator": estimator, "kl_estimator": "k3"}, run={"iterations": 1},
    )  # fmt: skip
    assert main(["ppo", "--config", str(cfg)]) == 0
    (m,) = read_metrics(run_dir / "metrics.jsonl")
    assert m["value_loss"] == 0.0 and "return_mean" not in m
    assert m["valid_fraction"] == 1.0 and m["failed_rpc_items"] == 0
    assert m["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # k3 is >= 0 and ~0 at the start
    assert not (run_dir / "checkpoints" / "iter_000001" / "value_head.pt").exists()


def test_unreachable_server_is_a_clear_error(
    tiny_ckpts, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.conftest import free_port

    cfg = write_config(
        tmp_path / "run.yaml", tiny_ckpts, f"127.0.0.1:{free_port()}", tmp_path / "run",
        server={"wait_ready_seconds": 1.0},
    )  # fmt: skip
    assert main(["ppo", "--config", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "is not ready after 1s" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_qlora_policy_on_a_4bit_base(server, tiny_ckpts, tmp_path: Path, device: str) -> None:
    """QLoRA: a bitsandbytes 4-bit base with LoRA adapters, one PPO iteration against the real
    server. Only the adapters (and the value head) train; the 4-bit weights stay frozen."""
    run_dir = tmp_path / "run"
    cfg = load_config(
        write_config(
            tmp_path / "run.yaml",
            tiny_ckpts,
            server.address,
            run_dir,
            model={"device": device, "quantization": "4bit", "lora": {"enabled": True, "r": 4}},
            run={"iterations": 1},
        )
    )
    trainer = PPOTrainer(cfg)
    model = trainer.model
    kbit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert kbit, "the base is not 4-bit"
    assert not any(p.requires_grad for m in kbit for p in m.parameters(recurse=False))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n or "value" in n for n in trained), sorted(trained)
    assert trainer.run() == 1
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1]
    assert math.isfinite(metrics[0]["policy_loss"]) and metrics[0]["valid_fraction"] > 0
    moved = [
        n for n, p in model.named_parameters() if n in trained and not torch.equal(p, trained[n])
    ]
    assert any("lora" in n for n in moved), "no adapter weight changed"
    assert next(p for p in model.parameters() if p.requires_grad).device.type == device


def test_telemetry_of_a_combination_matches_the_servers(tiny_ckpts, tmp_path: Path) -> None:
    """The trainer's telemetry of its rollouts against a combination, and the server's GetStats
    of the same items (the only traffic of that combination): the same functions, the same
    figures (length aside: the trainer counts completion tokens, the server all tokens)."""
    from reward_server.client import RewardClient

    sp = start_server(
        [
            "--reward-model", f"rm={tiny_ckpts.reward}",
            "--reward-model", f"rm2={tiny_ckpts.multihead_reward}",
            "--combination", "both=weighted:rm=1,rm2=0.5",
            "--reference-model", str(tiny_ckpts.reference),
            "--max-wait-ms", "5",
        ],
        tmp_path,
        env=SERVER_ENV,
    )  # fmt: skip
    try:
        run_dir = tmp_path / "run"
        cfg = write_config(
            tmp_path / "run.yaml",
            tiny_ckpts,
            sp.address,
            run_dir,
            server={"reward_model": "both"},
            rollout={"prompts_per_iteration": 4, "chunk_size": 8, "max_new_tokens": 8},
            run={"iterations": 1},
        )
        proc = subprocess.run(
            [sys.executable, "-m", "policy_trainer.cli", "ppo", "--config", str(cfg)],
            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        with RewardClient(sp.address) as c:
            (w,) = c.stats(model="both").windows
    finally:
        sp.stop()
    (m,) = read_metrics(run_dir / "metrics.jsonl")
    assert 2 <= w.window_items == w.total_items <= 8  # this run's items, nothing else
    assert m["telemetry/score_mean"] == pytest.approx(w.score_mean, abs=1e-5)
    assert m["telemetry/score_std"] == pytest.approx(w.score_std, abs=1e-5)
    (pair,) = w.member_rank_correlations
    assert m["telemetry/member_rank_corr"] == pytest.approx(pair.spearman, abs=1e-6)
    assert -1.0 <= pair.spearman <= 1.0
