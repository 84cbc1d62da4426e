"""``policy-trainer ppo --config run.yaml [--resume] [--server ADDR] [--ppo.lr X ...]
[section.key=value ...]``.

Every config key is also a flag (``ppo.kl_coef`` -> ``--ppo.kl-coef``), generated from the
fields of `TrainerConfig`. Precedence: defaults < the file < trailing ``section.key=value``
overrides < ``--section.key`` flags < ``--server`` / ``--output-dir``.

Exit codes: 0 done, 2 bad config or input, 3 the reward server went away or refused the work (a
checkpoint of the last completed iteration was written when there was one), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2
EXIT_SERVER = 3


def build_parser() -> argparse.ArgumentParser:
    """The ``policy-trainer`` argument parser (tests check deploy manifests against it)."""
    from policy_trainer.config import TrainerConfig
    from reward_server.config_base import PRECEDENCE_NOTE, add_config_file_flag, add_config_flags

    parser = argparse.ArgumentParser(
        prog="policy-trainer", description="PPO trainer client of the reward service"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ppo = sub.add_parser(
        "ppo",
        help="train a policy with PPO against a reward server",
        description="Train a policy with PPO; rewards and reference log-probs come from the server. "
        "Under torchrun every rank runs this command. Trailing section.key=value arguments "
        "(values parsed as YAML, e.g. ppo.lr=3e-6 run.iterations=100) override the file, and "
        "flags override them. " + PRECEDENCE_NOTE,
    )
    add_config_file_flag(ppo, required=True)
    resume = ppo.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    resume.add_argument(
        "--resume-if-present",
        action="store_true",
        help="continue from the latest checkpoint if there is one, else start (safe for retries)",
    )
    ppo.add_argument("--server", help="reward server address (overrides server.address)")
    ppo.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    ppo.add_argument(
        "--log-level", default="WARNING", help="python logging level (default WARNING)"
    )
    ppo.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides (YAML values)"
    )
    add_config_flags(ppo, TrainerConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The validated TrainerConfig of parsed ``ppo`` arguments (see the module docstring)."""
    from policy_trainer.config import load_config
    from reward_server.config_base import flag_overrides

    flags = flag_overrides(args)
    if args.server:
        flags["server.address"] = args.server
    if args.output_dir:
        flags["run.output_dir"] = args.output_dir
    return load_config(args.config, args.overrides, flags)


def run_ppo(args: argparse.Namespace) -> int:
    """Run ``ppo``; returns the exit code (see the module docstring)."""
    from reward_server.config_base import ConfigError

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"policy-trainer: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from policy_trainer.checkpoint import latest_checkpoint
    from policy_trainer.distributed import shutdown_distributed
    from policy_trainer.remote import ServerRejectedError, ServerUnavailableError
    from policy_trainer.trainer import PPOTrainer, TrainingStopped

    trainer = None
    try:
        resume = args.resume or (
            args.resume_if_present and latest_checkpoint(Path(cfg.run.output_dir)) is not None
        )
        trainer = PPOTrainer(cfg, resume=resume)
        last = trainer.run()
        if trainer.dist.is_main:
            what = "done" if last >= cfg.run.iterations else "stopped (continue with --resume)"
            print(
                f"policy-trainer: {what} after iteration {last}; run directory {cfg.run.output_dir}",
                file=sys.stderr,
            )
        return 0
    except ConfigError as e:
        print(f"policy-trainer: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainingStopped as e:
        print(f"policy-trainer: stopped: {e}", file=sys.stderr)
        return EXIT_SERVER
    except (ServerUnavailableError, ServerRejectedError) as e:
        print(f"policy-trainer: reward server error: {e}", file=sys.stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        print("policy-trainer: interrupted", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``policy-trainer`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: the trainer's
    if args.command == "ppo":
        return run_ppo(args)
    return 2  # pragma: no cover - argparse enforces the subcommand


if __name__ == "__main__":
    sys.exit(main())
