"""``policy-trainer ppo|dpo|best-of-n --config run.yaml [--resume] [--server ADDR] [--ppo.lr X ...]
[section.key=value ...]``.

Every config key is also a flag (``ppo.kl_coef`` -> ``--ppo.kl-coef``), generated from the
fields of the command's config (`TrainerConfig`, `DPOConfig`, `BestOfNConfig`). Precedence: defaults < the file < trailing ``section.key=value``
overrides < ``--section.key`` flags < ``--server`` / ``--output-dir``.

Exit codes: 0 done, 2 bad config or input, 3 the reward server went away or refused the work (a
checkpoint of the last completed iteration was written when there was one), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2
EXIT_SERVER = 3


def _add_run_flags(sub: argparse.ArgumentParser, cls: type, resume: bool = True) -> None:
    """The flags every subcommand shares: --config, --resume, --server, --output-dir,
    --log-level, trailing overrides, and one flag per config field of ``cls``."""
    from reward_server.config_base import add_config_file_flag, add_config_flags

    add_config_file_flag(sub, required=True)
    if resume:
        group = sub.add_mutually_exclusive_group()
        group.add_argument(
            "--resume",
            action="store_true",
            help="continue from the run directory's latest checkpoint",
        )
        group.add_argument(
            "--resume-if-present",
            action="store_true",
            help="continue from the latest checkpoint if there is one, else start (safe for retries)",
        )
    sub.add_argument("--server", help="reward server address (overrides server.address)")
    sub.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    sub.add_argument(
        "--log-level", default="WARNING", help="python logging level (default WARNING)"
    )
    sub.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides (YAML values)"
    )
    add_config_flags(sub, cls)


def build_parser() -> argparse.ArgumentParser:
    """The ``policy-trainer`` argument parser (tests check deploy manifests against it)."""
    from policy_trainer.best_of_n_config import BestOfNConfig
    from policy_trainer.config import TrainerConfig
    from policy_trainer.dpo_config import DPOConfig
    from reward_server.config_base import PRECEDENCE_NOTE

    parser = argparse.ArgumentParser(
        prog="policy-trainer",
        description="Trainer client of the reward service: PPO, DPO, best-of-n",
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
    _add_run_flags(ppo, TrainerConfig)
    dpo = sub.add_parser(
        "dpo",
        help="train a policy with DPO on preference data, reference log-probs from the server",
        description="Direct Preference Optimization (Rafailov et al. 2023) on the preference "
        "formats `reward-server train` reads; the reference log-probs of every response come "
        "from the server's ReferenceLogProbs once and are cached in the run directory. "
        + PRECEDENCE_NOTE,
    )
    _add_run_flags(dpo, DPOConfig)
    bon = sub.add_parser(
        "best-of-n",
        help="rejection sampling: keep the best of n sampled completions per prompt",
        description="Sample n completions per prompt, score them on the server, keep the best "
        "(Llama 2's rejection sampling); resumable by prompt index. With --sft, fine-tune the "
        "policy on the kept samples afterwards. " + PRECEDENCE_NOTE,
    )
    _add_run_flags(bon, BestOfNConfig, resume=False)
    bon.add_argument(
        "--sft",
        action="store_true",
        help="after sampling, fine-tune the policy on the kept completions (sft section)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The validated config of parsed arguments (see the module docstring)."""
    from reward_server.config_base import flag_overrides

    flags = flag_overrides(args)
    if args.server:
        flags["server.address"] = args.server
    if args.output_dir:
        flags["run.output_dir"] = args.output_dir
    if args.command == "dpo":
        from policy_trainer.dpo_config import load_dpo_config

        return load_dpo_config(args.config, args.overrides, flags)
    if args.command == "best-of-n":
        from policy_trainer.best_of_n_config import load_best_of_n_config

        return load_best_of_n_config(args.config, args.overrides, flags)
    from policy_trainer.config import load_config

    return load_config(args.config, args.overrides, flags)


def _run_command(args: argparse.Namespace, work: Callable[[Any], int]) -> int:
    """Load the command's config and run ``work(cfg)``, every command's failures mapped to the
    same exit codes (see the module docstring)."""
    from reward_server.config_base import ConfigError

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"policy-trainer: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from policy_trainer.remote import ServerRejectedError, ServerUnavailableError
    from policy_trainer.trainer import TrainingStopped

    try:
        return work(cfg)
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


def _resume(args: argparse.Namespace, cfg: Any) -> bool:
    from policy_trainer.checkpoint import latest_checkpoint

    return bool(
        args.resume
        or (args.resume_if_present and latest_checkpoint(Path(cfg.run.output_dir)) is not None)
    )


def run_ppo(args: argparse.Namespace) -> int:
    """Run ``ppo``; returns the exit code (see the module docstring)."""

    def work(cfg: Any) -> int:
        from policy_trainer.distributed import shutdown_distributed
        from policy_trainer.trainer import PPOTrainer

        trainer = None
        try:
            trainer = PPOTrainer(cfg, resume=_resume(args, cfg))
            last = trainer.run()
            if trainer.dist.is_main:
                what = "done" if last >= cfg.run.iterations else "stopped (continue with --resume)"
                print(
                    f"policy-trainer: {what} after iteration {last}; run directory "
                    f"{cfg.run.output_dir}",
                    file=sys.stderr,
                )
            return 0
        finally:
            if trainer is not None:
                trainer.close()
            shutdown_distributed()

    return _run_command(args, work)


def run_dpo(args: argparse.Namespace) -> int:
    """Run ``dpo``; returns the exit code (see the module docstring)."""

    def work(cfg: Any) -> int:
        from policy_trainer.dpo import DPOTrainer

        trainer = None
        try:
            trainer = DPOTrainer(cfg, resume=_resume(args, cfg))
            last = trainer.run()
            what = "done" if last >= trainer.total_steps else "stopped (continue with --resume)"
            print(
                f"policy-trainer: dpo {what} after step {last}; run directory {cfg.run.output_dir}",
                file=sys.stderr,
            )
            return 0
        finally:
            if trainer is not None:
                trainer.close()

    return _run_command(args, work)


def run_best_of_n(args: argparse.Namespace) -> int:
    """Run ``best-of-n`` (and, with --sft, the fine-tuning on the kept samples)."""

    def work(cfg: Any) -> int:
        from policy_trainer.best_of_n import run_best_of_n as run
        from policy_trainer.best_of_n import sft_on_samples

        summary = run(cfg)
        print(
            f"policy-trainer: best-of-{cfg.sampling.n}: {summary['prompts']} prompts, mean best "
            f"score {summary['best_score_mean']:.4f} (mean of all samples "
            f"{summary['score_mean']:.4f}), analytic KL {summary['analytic_kl']:.4f} nats; "
            f"{summary['output']}",
            file=sys.stderr,
        )
        if args.sft:
            out = sft_on_samples(cfg)
            print(f"policy-trainer: fine-tuned policy written to {out}", file=sys.stderr)
        return 0

    return _run_command(args, work)


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
    if args.command == "dpo":
        return run_dpo(args)
    if args.command == "best-of-n":
        return run_best_of_n(args)
    return 2  # pragma: no cover - argparse enforces the subcommand


if __name__ == "__main__":
    sys.exit(main())
