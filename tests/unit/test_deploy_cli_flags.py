"""Every command line in the Dockerfiles, the compose file and the manifests exists in the CLIs.

The invocations are parsed out of the files (ENTRYPOINT+CMD and HEALTHCHECK, compose commands and
healthchecks, container commands, exec probes, torchrun launches followed into the module they
run) and each option is checked against the real argparse parsers through their ``--help``. The
config file each one points at must be baked into its image or mounted, and must load with the
real config loaders. A test skips only when its CLI module does not exist; a missing flag fails.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import deploy_checks

REPO = Path(__file__).resolve().parents[2]


_checks = deploy_checks


inv_mod = _checks("invocations")
cli = _checks("cli_help")


def _need_cli(program: str) -> None:
    module = cli.CLI_MODULES[program]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")


def _expanded() -> list[Any]:
    """All invocations with torchrun launches followed (their errors are checked elsewhere)."""
    invocations, _ = cli.expand(inv_mod.all_invocations())
    return invocations


def test_invocations_are_found_in_every_kind_of_file() -> None:
    found = inv_mod.all_invocations()
    kinds = {(i.program, i.subcommand) for i in found}
    assert {("reward-server", "serve"), ("reward-server", "health"), ("torchrun", None)} <= kinds
    assert ("policy-trainer", "ppo") in kinds  # the compose demo
    sources = {i.where.split()[0].split("/")[1] for i in found}
    assert sources == {"docker", "compose", "k8s"}
    health_checks = [i for i in found if i.subcommand == "health"]
    assert any("HEALTHCHECK" in i.where for i in health_checks)
    assert any("readinessProbe" in i.where for i in health_checks)  # the TLS overlays


def _errors_for(program: str) -> list[str]:
    _, errors = cli.expand(inv_mod.all_invocations())
    return [e for e in errors if f": {program} " in e or e.endswith(f": {program}")]


def test_reward_server_invocations_match_its_parser() -> None:
    _need_cli("reward-server")
    serves = [i for i in _expanded() if i.program == "reward-server"]
    assert len(serves) >= 10
    errors = _errors_for("reward-server")
    assert not errors, "\n".join(errors)


def test_policy_trainer_invocations_match_its_parser() -> None:
    _need_cli("policy-trainer")
    ppo = [i for i in _expanded() if i.program == "policy-trainer" and i.subcommand == "ppo"]
    assert any("torchrun" in i.where for i in ppo), "the Job's torchrun launch is followed"
    errors = _errors_for("policy-trainer")
    assert not errors, "\n".join(errors)


def test_torchrun_invocations_match_torchrun() -> None:
    pytest.importorskip("torch.distributed.run")
    runs = [i for i in inv_mod.all_invocations() if i.program == "torchrun"]
    assert runs
    errors = []
    for run in runs:
        errs, nested = cli.check_invocation(run)
        errors += errs
        assert [n.program for n in nested] == ["policy-trainer"], run.where
    assert not errors, "\n".join(errors)


def test_the_flag_check_catches_mistakes() -> None:
    """A typo, a bad choice, a stray positional and an unknown subcommand are each reported."""
    pytest.importorskip("torch.distributed.run")
    make = inv_mod.Invocation
    errs, _ = cli.check_invocation(
        make("torchrun", ["--nproc-per-node", "1", "--start-method", "threads", "x.py"], "t")
    )
    assert any("--start-method 'threads' not in" in e for e in errs)
    errs, _ = cli.check_invocation(make("torchrun", ["--nproc-per-nodes", "1", "x.py"], "t"))
    assert any("unknown option --nproc-per-nodes" in e for e in errs)
    if importlib.util.find_spec("reward_server.cli") is not None:
        errs, _ = cli.check_invocation(make("reward-server", ["serve", "--grace-second", "3"], "t"))
        assert errs[0] == "t: reward-server serve --grace-second 3: unknown option --grace-second"
        errs, _ = cli.check_invocation(make("reward-server", ["health", "localhost:1"], "t"))
        assert any("unexpected positional 'localhost:1'" in e for e in errs)
        errs, _ = cli.check_invocation(make("reward-server", ["serv"], "t"))
        assert any("unknown subcommand 'serv'" in e for e in errs)


# ---- the config files the commands point at -----------------------------------------------------


def test_every_file_a_command_names_is_baked_in_or_mounted() -> None:
    """Configs, tokens, certificates: each /etc/ path on a command line reaches the container."""
    checked = 0
    for invocation in inv_mod.all_invocations():
        for arg in invocation.args:
            value = arg.split("=", 1)[-1]
            if value.startswith("/etc/"):
                assert value in invocation.files, f"{invocation.where}: {value} is not provided"
                checked += 1
    assert checked >= 10


def _materialize(value: Any, files: dict[str, str], tmp: Path, where: str) -> Any:
    """Replace container paths under /etc/ by local copies; each must be provided to the command."""
    if isinstance(value, dict):
        return {k: _materialize(v, files, tmp, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, files, tmp, where) for v in value]
    if isinstance(value, str) and value.startswith("/etc/"):
        assert value in files, f"{where}: {value} is neither baked into the image nor mounted"
        local = tmp / value.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        content = files[value]
        if value.endswith((".yaml", ".yml")):
            content = yaml.safe_dump(_materialize(yaml.safe_load(content), files, tmp, where))
        local.write_text(content)
        return str(local)
    return value


def test_server_configs_are_provided_and_load(tmp_path: Path) -> None:
    _need_cli("reward-server")
    from reward_server.cli import build_parser, config_from_args

    serves = [i for i in _expanded() if i.program == "reward-server" and i.subcommand == "serve"]
    assert len(serves) >= 5
    for n, serve in enumerate(serves):
        assert serve.option("--config"), f"{serve.where}: no --config"
        args = _materialize(serve.args, serve.files, tmp_path / str(n), serve.where)
        config = config_from_args(build_parser().parse_args(args))  # validates, or raises
        assert config.reward_models and config.reference_models, serve.where
        assert config.metrics_port > 0, f"{serve.where}: metrics are off"


def test_trainer_configs_are_provided_and_load(tmp_path: Path) -> None:
    _need_cli("policy-trainer")
    from policy_trainer.cli import build_parser, config_from_args

    ppos = [i for i in _expanded() if i.program == "policy-trainer" and i.subcommand == "ppo"]
    assert len(ppos) >= 2
    for n, ppo in enumerate(ppos):
        args = build_parser().parse_args(
            _materialize(ppo.args, ppo.files, tmp_path / str(n), ppo.where)
        )
        config = config_from_args(args)  # the file, overrides and flags, as `ppo` loads them
        assert config.server.address.startswith("dns:///"), "round_robin over resolved addresses"
