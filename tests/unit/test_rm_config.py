"""`reward-server train` configuration: YAML plus flags, validation, CLI wiring."""

from __future__ import annotations

import argparse

import pytest

from reward_server.config_base import ConfigError, load_config
from reward_server.training.cli import add_train_parser, config_from_args, main, run_train
from reward_server.training.config import TrainConfig


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reward-server")
    parser.add_argument("--device", help="a global option of the host parser")  # must not leak
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    return parser.parse_args(argv)


BASE = ["train", "--data", "a.jsonl,b.parquet", "--base-model", "m", "--output", "o"]


def test_flags_give_a_typed_config_with_defaults() -> None:
    args = parse(
        BASE + ["--lr", "3e-4", "--lora-r", "8", "--margin-from-data", "--on-error", "skip"]
    )
    assert callable(args.func)
    cfg = config_from_args(args)
    assert cfg.data == ["a.jsonl", "b.parquet"]
    assert (cfg.lr, cfg.lora_r, cfg.margin_from_data, cfg.on_error) == (3e-4, 8, True, "skip")
    assert (cfg.epochs, cfg.batch_size, cfg.eval_batch_size, cfg.max_length) == (1, 8, 8, 256)
    assert cfg.device == "auto"  # the host parser's own --device did not leak in
    assert cfg.disable_dropout and cfg.progress


def test_yaml_then_flags_override(tmp_path) -> None:
    y = tmp_path / "train.yaml"
    y.write_text(
        "data: [x.jsonl, y.jsonl]\nbase-model: base\noutput: out\nbatch_size: 4\n"
        "epochs: 3\ncenter_coef: 0.01\nprogress: false\n"
    )
    cfg = config_from_args(
        parse(["train", "--config", str(y), "--epochs", "2", "--load-in-4bit", "--lora-r", "4"])
    )
    assert cfg.data == ["x.jsonl", "y.jsonl"] and cfg.base_model == "base"
    assert (cfg.batch_size, cfg.epochs, cfg.center_coef) == (4, 2, 0.01)
    assert cfg.quantization == "4bit" and cfg.progress is False


def test_list_flags_split_on_commas_and_repeat() -> None:
    cfg = config_from_args(
        parse(BASE + ["--data", "c.jsonl", "--lora-target-modules", "q,v", "--no-progress"])
    )
    assert cfg.data == ["a.jsonl", "b.parquet", "c.jsonl"]
    assert cfg.lora_target_modules == ["q", "v"] and cfg.progress is False
    assert config_from_args(parse(BASE + ["--keep-dropout"])).disable_dropout is False


@pytest.mark.parametrize(
    "yaml_text,fragment",
    [
        ("bogus_key: 1\n", "unknown key 'bogus_key' in {file}; valid keys: data, base_model"),
        ("batch_sise: 4\n", "unknown key 'batch_sise' in {file}; did you mean 'batch_size'?"),
        ("epochs: '3'\n", "{file}: epochs must be an integer, got '3'"),
        ("lr: -1\n", "lr must be > 0"),
        ("on_error: ignore\n", "{file}: on_error must be one of skip, stop, got 'ignore'"),
        ("margin_from_data: 1\n", "margin_from_data must be true or false"),
        ("eval_fraction: 0\n", "eval_fraction must be in (0, 1)"),
        ("quantization: 8bit\n", "trains LoRA adapters only"),
        ("data: 5\n", "data must be a list"),
        ("- a\n", "expected a mapping at the top level"),
    ],
)
def test_bad_values_are_named(tmp_path, yaml_text: str, fragment: str) -> None:
    y = tmp_path / "t.yaml"
    y.write_text(yaml_text)
    overrides = {"data": ["d.jsonl"], "base_model": "m", "output": "o"}
    if yaml_text.startswith("data"):
        overrides.pop("data")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, str(y), overrides)
    assert fragment.format(file=y) in str(info.value)


def test_missing_required_and_cpu_only_options() -> None:
    with pytest.raises(ConfigError, match="--data"):
        load_config(TrainConfig, None, {"base_model": "m", "output": "o"})
    with pytest.raises(ConfigError, match="precision bf16 needs CUDA"):
        load_config(
            TrainConfig,
            None,
            {"data": ["d"], "base_model": "m", "output": "o", "precision": "bf16", "device": "cpu"},
        )


def test_bad_flag_values_are_argparse_errors(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse(BASE + ["--precision", "fp16"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision: precision must be one of auto, fp32, bf16, got 'fp16'" in err
    with pytest.raises(SystemExit):
        parse(BASE + ["--epochs", "two"])
    assert "argument --epochs: epochs must be an integer, got 'two'" in capsys.readouterr().err


def test_cli_reports_errors_without_traceback(tmp_path, capsys) -> None:
    assert main(["train", "--base-model", "m", "--output", "o"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "reward-server train: error: give training data: --data FILE[,FILE]"
    missing = str(tmp_path / "nope.jsonl")
    rc = main(
        ["train", "--data", missing, "--base-model", str(tmp_path), "--output", str(tmp_path / "o")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "reward-server train: error:" in err and "Traceback" not in err


def test_wired_into_reward_server_cli() -> None:
    cli = pytest.importorskip("reward_server.cli")
    args = cli.build_parser().parse_args(BASE + ["--epochs", "2"])
    assert args.func is run_train
    assert config_from_args(args).epochs == 2
