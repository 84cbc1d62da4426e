"""Typed configuration of a best-of-n run (``policy-trainer best-of-n --config FILE``): sections
``model`` and ``data`` (the PPO run's), ``sampling``, ``server`` (the PPO run's; any served reward
model or combination), ``sft`` (``--sft``) and ``run``. No torch here: the CLI's parser imports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy_trainer.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RewardServiceConfig,
    parse_overrides,
)
from reward_server.config_base import load_config as load_dataclass


def analytic_kl(n: int) -> float:
    """KL(best-of-n || policy) = ln n - (n - 1) / n nats (Stiennon et al. 2020, appendix G.3)."""
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfNSampling:
    """How the n completions of a prompt are sampled."""

    n: int = 4
    """Completions sampled per prompt (the best is kept)."""
    chunk_size: int = 16
    """Sequences generated at once (n is sampled in chunks of this many)."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 32
    """Response length cap; the response is cut after its first EOS."""
    min_new_tokens: int = 1
    """EOS is suppressed for the first min_new_tokens tokens (no empty responses)."""
    suppress_special_tokens: bool = True
    """Never sample special tokens other than EOS (they decode to no text)."""


@dataclass
class SFTSection:
    """Fine-tuning on the kept samples (``--sft``)."""

    output_dir: str | None = None
    """Where the fine-tuned policy is written; None = run.output_dir/sft."""
    epochs: int = 1
    """Passes over the kept samples."""
    batch_size: int = 8
    """Samples per optimizer step."""
    lr: float = 1e-5
    """AdamW learning rate (constant)."""
    top_fraction: float = 1.0
    """Fine-tune on the best-scored fraction of the prompts' kept samples (1 = all)."""


@dataclass
class BestOfNRunConfig:
    """The run itself."""

    output_dir: str = "runs/best_of_n"
    """Run directory: best_of_n.jsonl, summary.json, config.yaml (and sft/)."""
    seed: int = 0
    """Seed; prompt i samples with seed (run.seed, i), so a resumed run draws the same samples."""
    max_prompts: int | None = None
    """Use only the first max_prompts prompts; None = all."""
    progress: bool = True
    """Show a progress bar."""
    num_threads: int | None = None
    """CPU threads for torch (torch.set_num_threads); None = torch's default."""


@dataclass
class BestOfNConfig:
    """A best-of-n run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The sampling policy (value_model and critic_path are not used)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The prompts (as the PPO run reads them; shuffle is not used)."""
    sampling: BestOfNSampling = field(default_factory=BestOfNSampling)
    """How the n completions are sampled."""
    server: RewardServiceConfig = field(default_factory=RewardServiceConfig)
    """The reward service (reward_model: any served model or combination)."""
    sft: SFTSection = field(default_factory=SFTSection)
    """Fine-tuning on the kept samples (--sft)."""
    run: BestOfNRunConfig = field(default_factory=BestOfNRunConfig)
    """The run itself."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Ranges; raises ConfigError naming the key."""
        if not self.model.policy:
            raise ConfigError("model.policy: required (a checkpoint path or hub id)")
        if not self.data.prompts:
            raise ConfigError("data.prompts: required (a file, a dataset directory, or a list)")
        s, t = self.sampling, self.sft
        for key, value in {
            "sampling.n": s.n,
            "sampling.chunk_size": s.chunk_size,
            "sampling.temperature": s.temperature,
            "sampling.max_new_tokens": s.max_new_tokens,
            "sft.epochs": t.epochs,
            "sft.batch_size": t.batch_size,
            "sft.lr": t.lr,
            "server.timeout": self.server.timeout,
        }.items():
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        if not 0.0 < t.top_fraction <= 1.0:
            raise ConfigError(f"sft.top_fraction: must lie in (0, 1], got {t.top_fraction}")
        if self.run.max_prompts is not None and self.run.max_prompts <= 0:
            raise ConfigError(f"run.max_prompts: must be > 0, got {self.run.max_prompts}")


def load_best_of_n_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> BestOfNConfig:
    """Defaults < the YAML file < ``section.key=value`` overrides < flags, validated."""
    merged = {**parse_overrides(overrides or []), **(flags or {})}
    return load_dataclass(BestOfNConfig, path, merged)
