"""Typed configuration of a DPO run (``policy-trainer dpo --config FILE``).

Same mechanism as the PPO config (`reward_server.config_base`): sections ``model`` (the PPO
run's `ModelConfig`, LoRA included), ``data``, ``server`` (the PPO run's `RewardServiceConfig`;
only the reference model is used), ``dpo`` and ``run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from policy_trainer.config import ModelConfig, RewardServiceConfig, parse_overrides
from reward_server.config_base import ConfigError
from reward_server.config_base import load_config as load_dataclass

__all__ = ["DPOConfig", "load_dpo_config"]


@dataclass
class PreferenceDataConfig:
    """The preference data (the formats `reward-server train` reads: docs/TRAINING.md)."""

    preferences: str | list[str] = ""
    """A JSONL / JSON / Parquet file or a `datasets` directory, or a list of them (required)."""
    split: str = "train"
    """Split to use when a dataset directory holds a DatasetDict."""
    max_prompt_tokens: int = 64
    """Prompts longer than this keep their last max_prompt_tokens tokens."""
    max_response_tokens: int = 64
    """Responses longer than this keep their first max_response_tokens tokens (EOS included)."""
    on_error: Literal["stop", "skip"] = "stop"
    """A malformed record: stop with its place, or skip it (counted in the log)."""


@dataclass
class DPOSection:
    """The DPO objective and its optimisation."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO, Rafailov et al. 2023, eq. 7; conservative DPO with label_smoothing > 0) or
    ipo (Azar et al. 2023)."""
    beta: float = 0.1
    """KL-regularisation strength beta (IPO's tau)."""
    label_smoothing: float = 0.0
    """Conservative DPO's eps in [0, 0.5): the assumed probability that a label is flipped."""
    epochs: int = 1
    """Passes over the preference pairs (reshuffled each pass, seeded by run.seed)."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    micro_batch_size: int | None = None
    """Pairs per forward/backward (gradient accumulation); None = batch_size."""
    lr: float = 5e-6
    """AdamW learning rate."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """linear (to 0 at the last step) or constant."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 = off."""
    ref_batch_size: int = 64
    """Sequences per ReferenceLogProbs request when the reference log-probs are fetched."""


@dataclass
class DPORunConfig:
    """The run itself."""

    output_dir: str = "runs/dpo"
    """Run directory: metrics.jsonl, curves.png, config.yaml, ref_logprobs.pt, checkpoints/."""
    seed: int = 0
    """Seed of every RNG (and of the pair order of each epoch)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept; 0 = keep all."""
    stop_after: int | None = None
    """Checkpoint and stop after this step (to split a run into jobs); None = run to the end."""
    eval_every: int = 0
    """Every N steps (and at the start and the end), log the implicit-reward metrics over all
    pairs as ``eval/...``; 0 = only at the start and the end."""
    progress: bool = True
    """Show a progress bar."""
    num_threads: int | None = None
    """CPU threads for torch (torch.set_num_threads); None = torch's default."""


@dataclass
class DPOConfig:
    """A whole DPO run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (value_model and critic_path are not used)."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    """The preference data."""
    server: RewardServiceConfig = field(default_factory=RewardServiceConfig)
    """The service that answers ReferenceLogProbs (reward_model is not used)."""
    dpo: DPOSection = field(default_factory=DPOSection)
    """The objective and its optimisation."""
    run: DPORunConfig = field(default_factory=DPORunConfig)
    """The run itself."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Ranges and cross-field rules; raises ConfigError naming the key."""
        m, d, p, r = self.model, self.data, self.dpo, self.run
        if not m.policy:
            raise ConfigError("model.policy: required (a checkpoint path or hub id)")
        if m.quantization != "none" and not m.lora.enabled:
            raise ConfigError("model.quantization: a quantized base can only be trained with LoRA")
        if not d.preferences:
            raise ConfigError("data.preferences: required (a file, a directory, or a list)")
        positive = {
            "data.max_prompt_tokens": d.max_prompt_tokens,
            "data.max_response_tokens": d.max_response_tokens,
            "dpo.beta": p.beta,
            "dpo.epochs": p.epochs,
            "dpo.batch_size": p.batch_size,
            "dpo.lr": p.lr,
            "dpo.ref_batch_size": p.ref_batch_size,
            "server.timeout": self.server.timeout,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        for key, value in {
            "run.save_every": r.save_every,
            "run.keep_checkpoints": r.keep_checkpoints,
            "run.eval_every": r.eval_every,
            "dpo.max_grad_norm": p.max_grad_norm,
        }.items():
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        if r.stop_after is not None and r.stop_after <= 0:
            raise ConfigError(f"run.stop_after: must be > 0, got {r.stop_after}")
        if not 0.0 <= p.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must lie in [0, 0.5), got {p.label_smoothing}")
        if p.loss_type == "ipo" and p.label_smoothing:
            raise ConfigError("dpo.label_smoothing: only the sigmoid loss is smoothed (cDPO)")
        micro = p.micro_batch_size or p.batch_size
        if micro <= 0 or p.batch_size % micro:
            raise ConfigError(
                f"dpo.micro_batch_size={micro} must be > 0 and divide dpo.batch_size={p.batch_size}"
            )


def load_dpo_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> DPOConfig:
    """Defaults < the YAML file < ``section.key=value`` overrides < flags, validated."""
    merged = {**parse_overrides(overrides or []), **(flags or {})}
    return load_dataclass(DPOConfig, path, merged)
