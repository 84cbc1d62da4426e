"""The one configuration mechanism: loader, type checks, generated flags, help, precedence.

Runs against the three real configs (serve, train, the PPO trainer) and their real parsers, so a
new field without a docstring or a flag, or a flag that drifts from its key, fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from policy_trainer.config import TrainerConfig
from reward_server.config import ServerConfig
from reward_server.config_base import (
    ConfigError,
    add_config_flags,
    config_keys,
    field_docs,
    flag_name,
    flag_overrides,
    format_default,
    load_config,
)
from reward_server.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]

HAND_WRITTEN = {
    "reward_models": "--reward-model",
    "reference_models": "--reference-model",
    "adapters": "--adapter",
    "combinations": "--combination",
    "head_combine": "--head-combine",
    "input_formats": "--input-format",
    "tenant_shares": "--tenant-share",
    "tenant_quotas": "--tenant-quota",
}
"""Serve's mapping fields, set by repeated hand-written ``NAME=VALUE`` flags."""


@dataclass
class Inner:
    """A nested section."""

    rate: float = 0.5
    """A rate."""
    names: list[str] | None = None
    """Some names."""


@dataclass
class Sample:
    """A config exercising every supported annotation."""

    mode: Literal["fast", "slow"] = "fast"
    """How to run."""
    count: int = 3
    """How many."""
    flag: bool = True
    """On or off."""
    label: str | None = None
    """An optional label."""
    files: list[str] = field(default_factory=list)
    """Input files."""
    models: dict[str, str] = field(default_factory=dict)
    """Name -> path."""
    inner: Inner = field(default_factory=Inner)
    """The section."""


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sample")
    add_config_flags(parser, Sample, skip=("models",))
    return parser


def test_file_keys_values_and_sections_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"mode": "slow", "inner": {"rate": "3e-6"}, "files": "a,b"}))
    cfg = load_config(Sample, f, {"models": {"x": 1}})
    assert cfg == Sample(mode="slow", files=["a", "b"], models={"x": "1"}, inner=Inner(3e-6))
    y = tmp_path / "s.yaml"
    y.write_text("inner:\n  rat: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Sample, y)
    assert str(e.value) == f"unknown key 'inner.rat' in {y}; did you mean 'inner.rate'?"
    assert (e.value.key, e.value.file) == ("inner.rat", str(y))
    y.write_text("mode: medium\n")
    with pytest.raises(ConfigError) as e:
        load_config(Sample, y)
    assert str(e.value) == f"{y}: mode must be one of fast, slow, got 'medium'"
    with pytest.raises(ConfigError, match=r"^count must be an integer, got True$"):
        load_config(Sample, None, {"count": True})
    with pytest.raises(ConfigError, match=r"^inner.rate must be a number, got nan$"):
        load_config(Sample, None, {"inner.rate": float("nan")})


def test_generated_flags_types_and_precedence(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("count: 7\nlabel: from-file\nfiles: [a]\nmodels: {m: /a}\n")
    args = _sample_parser().parse_args(
        ["--label", "none", "--files", "b,c", "--files", "d", "--no-flag", "--inner.rate", "2"]
    )
    given = flag_overrides(args)
    assert given == {"label": None, "files": ["b", "c", "d"], "flag": False, "inner.rate": 2.0}
    cfg = load_config(Sample, f, {**given, "models": {"n": "/b"}})
    assert (cfg.count, cfg.label, cfg.files, cfg.flag, cfg.inner.rate) == (
        7,  # the file over the default
        None,  # flags over the file
        ["b", "c", "d"],
        False,
        2.0,
    )
    assert cfg.models == {"m": "/a", "n": "/b"}  # mapping fields merge, flags winning per name
    assert flag_overrides(_sample_parser().parse_args([])) == {}  # nothing given, nothing set


def test_bad_flag_values_name_the_key(capsys: pytest.CaptureFixture) -> None:
    for argv, message in (
        (["--mode", "medium"], "argument --mode: mode must be one of fast, slow, got 'medium'"),
        (["--count", "x"], "argument --count: count must be an integer, got 'x'"),
        (["--inner.rate", "fast"], "argument --inner.rate: inner.rate must be a number"),
    ):
        with pytest.raises(SystemExit):
            _sample_parser().parse_args(argv)
        assert message in capsys.readouterr().err


CONFIGS = [ServerConfig, TrainConfig, TrainerConfig]


def _dataclasses(cls: type) -> list[type]:
    """A config class and every section class under it."""
    out = [cls]
    for hint in typing.get_type_hints(cls).values():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += _dataclasses(hint)
    return out


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls: type) -> None:
    for section in _dataclasses(cls):
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
        assert not missing, f"{section.__name__}: fields without a docstring: {missing}"
    assert len(_dataclasses(TrainerConfig)) == 8  # the trainer's sections are all reached


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError(f"no subcommand {name}")


def _parsers() -> dict[str, tuple[type, argparse.ArgumentParser]]:
    from policy_trainer.cli import build_parser as trainer_parser
    from reward_server.cli import build_parser as server_parser

    server = server_parser()
    return {
        "serve": (ServerConfig, _subparser(server, "serve")),
        "train": (TrainConfig, _subparser(server, "train")),
        "ppo": (TrainerConfig, _subparser(trainer_parser(), "ppo")),
    }


def _expected_flags(cls: type) -> dict[str, str]:
    return {k: HAND_WRITTEN.get(k, flag_name(k)) for k in config_keys(cls)}


@pytest.mark.parametrize("command", ["serve", "train", "ppo"])
def test_every_field_has_a_flag(command: str) -> None:
    cls, parser = _parsers()[command]
    options = {s for a in parser._actions for s in a.option_strings}
    expected = _expected_flags(cls)
    missing = {k: f for k, f in expected.items() if f not in options}
    assert not missing, f"{command}: keys without a flag: {missing}"
    assert len(expected) >= {"serve": 40, "train": 33, "ppo": 75}[command]


def test_precedence_through_the_real_parsers(tmp_path: Path) -> None:
    """defaults < file < flag, for each command, with its real parser and loader."""
    from policy_trainer.cli import build_parser as trainer_parser
    from policy_trainer.cli import config_from_args as trainer_config
    from reward_server.cli import build_parser, config_from_args
    from reward_server.training.cli import config_from_args as train_config

    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text("reward_models: {a: /m/a}\nmax_wait_ms: 9\nport: 1234\n")
    cfg = config_from_args(
        build_parser().parse_args(
            ["serve", "--config", str(serve_yaml), "--port", "99", "--reward-model", "b=/m/b"]
        )
    )
    assert (cfg.port, cfg.max_wait_ms, cfg.max_batch_items) == (99, 9.0, 64)
    assert cfg.reward_models == {"a": "/m/a", "b": "/m/b"}

    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("data: [x.jsonl]\nbase-model: m\noutput: o\nepochs: 3\nlr: 3e-4\n")
    cfg = train_config(
        build_parser().parse_args(["train", "--config", str(train_yaml), "--lr", "1e-3"])
    )
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 1e-3, 8)

    example = REPO / "examples" / "ppo_tiny.yaml"
    args = trainer_parser().parse_args(
        [
            "ppo",
            "--config",
            str(example),
            "--ppo.lr",
            "3e-6",
            "--no-ppo.adaptive-kl",
            "--server",
            "dns:///rm:50051",
            "ppo.lr=1.0",  # a trailing override loses to the flag ...
            "ppo.epochs=3",  # ... and wins over the file
        ]
    )
    cfg = trainer_config(args)
    assert (cfg.ppo.lr, cfg.ppo.epochs, cfg.ppo.adaptive_kl) == (3e-6, 3, False)
    assert (cfg.ppo.kl_coef, cfg.ppo.cliprange) == (0.05, 0.2)  # file, default
    assert cfg.server.address == "dns:///rm:50051" and cfg.run.iterations == 5


def _help(*argv: str) -> str:
    env = dict(os.environ, COLUMNS="1000")
    proc = subprocess.run(
        [sys.executable, "-m", *argv, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _help_blocks(text: str) -> dict[str, str]:
    """Each option string of a --help -> its help text (which may start on the next line)."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^ {2}(-\S.*?)(?: {2,}(.*))?$", line)
        if m:
            current = [p.split(" ")[0] for p in m.group(1).split(", ")]
            for flag in current:
                blocks[flag] = m.group(2) or ""
        elif line.startswith("   ") and current:
            for flag in current:
                blocks[flag] += " " + line.strip()
    return blocks


def test_help_of_every_command_lists_every_flag_with_its_meaning_and_default() -> None:
    helps = {
        "serve": _help("reward_server.cli", "serve"),
        "train": _help("reward_server.cli", "train"),
        "ppo": _help("policy_trainer.cli", "ppo"),
    }
    for command, (cls, _) in _parsers().items():
        blocks = _help_blocks(helps[command])
        defaults = _defaults(cls)
        for key, flag in _expected_flags(cls).items():
            assert flag in blocks, f"{command} --help lacks {flag}"
            if key in HAND_WRITTEN:
                assert "(repeatable)" in blocks[flag]
                continue
            value, doc = defaults[key]
            assert blocks[flag].strip() == f"{doc} (default: {format_default(value)})", flag
        for action_flag in ("--config", "-h"):
            assert action_flag in blocks
    serve = _help_blocks(helps["serve"])
    assert serve["--max-batch-items"].endswith("(default: 64)")
    assert "(default: true)" in serve["--warmup"] and "--no-warmup" in serve
    assert "(default: error)" in serve["--truncation"]
    ppo = _help_blocks(helps["ppo"])
    assert ppo["--ppo.lr"].endswith("(default: 1e-05)")
    assert "--resume-if-present" in ppo and "--model.lora.target-modules" in ppo
    train = _help_blocks(helps["train"])
    assert "--load-in-4bit" in train and "--keep-dropout" in train
    assert train["--data"].endswith("(default: [])")


def _defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every key (dotted inside sections) -> (its default, its docstring)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_defaults(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (value, field_docs(cls)[f.name])
    return out


def test_the_cli_stays_light() -> None:
    """The CLIs' parsers import neither torch nor transformers (the light client install)."""
    code = (
        "import sys; from reward_server.cli import build_parser; build_parser(); "
        "from policy_trainer.cli import build_parser as b; b(); "
        "print(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
