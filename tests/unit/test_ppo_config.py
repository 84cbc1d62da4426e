"""Typed trainer config: YAML + overrides, validation with clear messages, CLI exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_trainer.cli import EXIT_CONFIG, main
from policy_trainer.config import ConfigError, TrainerConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ppo_tiny.yaml"


def test_example_config_loads_with_overrides() -> None:
    cfg = load_config(
        EXAMPLE, ["ppo.lr=3e-6", "run.iterations=7", "ppo.kl_clamp=10", "data.prompts=p.jsonl"]
    )
    assert isinstance(cfg, TrainerConfig)
    assert cfg.ppo.lr == 3e-6
    assert cfg.run.iterations == 7
    assert cfg.ppo.kl_clamp == 10.0 and isinstance(cfg.ppo.kl_clamp, float)
    assert cfg.data.prompts == "p.jsonl"
    assert cfg.model.policy == "runs/tiny/reference"
    assert (
        cfg.rollout_batch_size == cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt
    )
    # round trip through a plain dict (what config.yaml in a run directory holds)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.bogus=1"], "unknown key 'ppo.bogus'"),
        (["ppo.iterations=3"], "unknown key 'ppo.iterations'; did you mean 'run.iterations'?"),
        (["ppo.lr=fast"], "ppo.lr must be a number, got 'fast'"),
        (["ppo.epochs=2.5"], "ppo.epochs must be an integer, got 2.5"),
        (["run.tensorboard=maybe"], "run.tensorboard must be true or false, got 'maybe'"),
        (["ppo.kl_estimator=k7"], "ppo.kl_estimator must be one of k1, k2, k3, got 'k7'"),
        (["ppo.kl_clamp=big"], "ppo.kl_clamp must be a number or null, got 'big'"),
        (["model=3"], "model must be a mapping, got 3"),
        (
            [
                "ppo.advantage_estimator=grpo",
                "rollout.samples_per_prompt=1",
                "ppo.minibatch_size=1",
            ],
            "needs rollout.samples_per_prompt >= 2",
        ),
        (["ppo.minibatch_size=3"], "must divide the rollout batch"),
        (["ppo.micro_batch_size=3"], "must be > 0 and divide ppo.minibatch_size"),
        (["model.quantization=4bit"], "only be trained with LoRA"),
        (["model.policy="], "model.policy: required"),
        (["rollout.temperature=0"], "rollout.temperature: must be > 0"),
        (["ppo.gamma=1.5"], "ppo.gamma and ppo.lam"),
        (["noequals"], "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(EXAMPLE, overrides)
    assert message in str(e.value)


def test_unknown_and_bad_keys_in_the_file_name_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(EXAMPLE.read_text() + "\nrollout:\n  max_new_token: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(run)
    assert str(e.value) == (
        f"unknown key 'rollout.max_new_token' in {run}; did you mean 'rollout.max_new_tokens'?"
    )
    assert (e.value.key, e.value.file) == ("rollout.max_new_token", str(run))
    run.write_text("model:\n  value-model: actor\n")
    with pytest.raises(ConfigError) as e:
        load_config(run)
    assert str(e.value) == f"{run}: model.value_model must be one of shared, critic, got 'actor'"


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    seq = tmp_path / "seq.yaml"
    seq.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(seq)


def test_cli_reports_config_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["ppo", "--config", str(EXAMPLE), "ppo.cliprange=-1"])
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG
    assert "config error: ppo.cliprange: must be > 0" in err
    assert "Traceback" not in err


def test_cli_reports_missing_prompt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_ckpts
) -> None:
    rc = main(
        [
            "ppo",
            "--config",
            str(EXAMPLE),
            f"model.policy={tiny_ckpts.reference}",
            f"data.prompts={tmp_path / 'missing.jsonl'}",
            f"run.output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG
    assert "missing.jsonl does not exist" in err
