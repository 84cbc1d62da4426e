"""`reward-server train`: train a reward model on preference data (see docs/TRAINING.md).

`reward_server.cli` calls `add_train_parser(subparsers)`; ``python -m reward_server.training.cli
train ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from reward_server.training.config import (
    DEVICES,
    ON_ERROR,
    PRECISIONS,
    QUANTIZATIONS,
    SAVE_DTYPES,
    TRUNCATION_SIDES,
    TrainConfig,
    TrainConfigError,
)

_DEST = "train_opt__"  # prefix of our argparse dests, so the lead's global options never collide

# (flag, field, type or action, help)
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "preference data: FILE[,FILE] (.jsonl, .json, .parquet, datasets dir)"),
    (
        "--eval-data",
        "eval_data",
        str,
        "held-out preference data FILE[,FILE] (else --eval-fraction)",
    ),
    (
        "--base-model",
        "base_model",
        str,
        "backbone checkpoint directory (or a reward model to continue)",
    ),
    ("--output", "output", str, "output directory for the checkpoint and run files"),
    ("--epochs", "epochs", int, "passes over the training split (default 1)"),
    ("--batch-size", "batch_size", int, "batch elements per micro-batch (default 8)"),
    (
        "--eval-batch-size",
        "eval_batch_size",
        int,
        "batch elements per eval forward (default: batch size)",
    ),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--lr", "lr", float, "peak learning rate (default 1e-4)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    ("--warmup-ratio", "warmup_ratio", float, "fraction of steps warming up (default 0)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clip norm, 0 = off (default 1.0)"),
    ("--eval-fraction", "eval_fraction", float, "fraction of prompts held out (default 0.1)"),
    ("--eval-every", "eval_every", int, "also evaluate every N steps (default 0: per epoch only)"),
    ("--max-length", "max_length", int, "max tokens per text (default 256)"),
    (
        "--truncation-side",
        "truncation_side",
        TRUNCATION_SIDES,
        "side cut from long texts (default left)",
    ),
    ("--seed", "seed", int, "random seed (default 0)"),
    (
        "--margin-from-data",
        "margin_from_data",
        "store_true",
        "use each record's 'margin' (Llama 2)",
    ),
    ("--center-coef", "center_coef", float, "reward-centering coefficient (default 0: off)"),
    ("--on-error", "on_error", ON_ERROR, "malformed record: stop (default) or skip"),
    (
        "--data-split",
        "data_split",
        str,
        "split of a datasets DatasetDict directory (default train)",
    ),
    ("--lora-r", "lora_r", int, "LoRA rank (default 0: full fine-tuning)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0)"),
    ("--lora-target-modules", "lora_target_modules", str, "NAME[,NAME] modules LoRA wraps"),
    ("--quantization", "quantization", QUANTIZATIONS, "k-bit base for LoRA training (CUDA)"),
    ("--device", "device", DEVICES, "auto (default), cpu or cuda"),
    ("--precision", "precision", PRECISIONS, "auto (bf16 on CUDA), fp32 or bf16"),
    ("--save-dtype", "save_dtype", SAVE_DTYPES, "dtype of saved weights (default float32)"),
    ("--norm-data", "norm_data", str, "reference completions FILE[,FILE] for normalisation stats"),
    ("--norm-samples", "norm_samples", int, "max reference completions (default 1000)"),
]


_METAVARS = {
    "data": "FILE[,FILE]",
    "eval_data": "FILE[,FILE]",
    "norm_data": "FILE[,FILE]",
    "base_model": "PATH",
    "output": "DIR",
    "lora_target_modules": "NAME[,NAME]",
}


def add_train_parser(subparsers: Any) -> None:
    """Add the ``train`` subcommand to an argparse subparsers object (sets ``func``)."""
    p = subparsers.add_parser(
        "train",
        help="train a reward model on preference data",
        description="Train a Bradley-Terry reward model on preference pairs, conversations or "
        "rankings and write a Hugging Face checkpoint `reward-server serve` loads. "
        "Flags override --config. See docs/TRAINING.md.",
    )
    p.add_argument(
        "--config", dest=_DEST + "config", metavar="YAML", help="YAML file of these options"
    )
    for flag, name, kind, help_ in _OPTIONS:
        if kind == "store_true":
            p.add_argument(flag, dest=_DEST + name, action="store_const", const=True, help=help_)
        elif isinstance(kind, tuple):
            p.add_argument(flag, dest=_DEST + name, choices=kind, default=None, help=help_)
        else:
            metavar = _METAVARS.get(name, name.upper())
            p.add_argument(
                flag, dest=_DEST + name, type=kind, default=None, metavar=metavar, help=help_
            )
    p.add_argument(
        "--load-in-8bit", dest=_DEST + "quantization", action="store_const", const="8bit",
        help="same as --quantization 8bit",
    )  # fmt: skip
    p.add_argument(
        "--load-in-4bit", dest=_DEST + "quantization", action="store_const", const="4bit",
        help="same as --quantization 4bit",
    )  # fmt: skip
    p.add_argument(
        "--keep-dropout", dest=_DEST + "disable_dropout", action="store_const", const=False,
        help="train with the backbone's dropout (default: dropout off)",
    )  # fmt: skip
    p.add_argument(
        "--no-progress", dest=_DEST + "progress", action="store_const", const=False,
        help="no progress bars",
    )  # fmt: skip
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated TrainConfig of parsed ``train`` arguments (YAML first, flags over it)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {
        k[len(_DEST) :]: v
        for k, v in vars(args).items()
        if k.startswith(_DEST) and k[len(_DEST) :] in names
    }
    return TrainConfig.from_sources(getattr(args, _DEST + "config", None), overrides)


def run_train(args: argparse.Namespace) -> int:
    """Entry point of ``train``: 0 on success, 2 on bad configuration or data or model."""
    from reward_server.training.data import DataError
    from reward_server.training.modeling import ModelSetupError

    try:
        cfg = config_from_args(args)
        from reward_server.training.trainer import train

        train(cfg)
    except (TrainConfigError, DataError, ModelSetupError, OSError) as e:
        print(f"reward-server train: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m reward_server.training.cli train ...``."""
    parser = argparse.ArgumentParser(prog="reward-server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
