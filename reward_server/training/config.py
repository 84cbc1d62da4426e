"""Typed configuration of `reward-server train`, validated once at load.

Each field below is a YAML key (hyphens accepted: ``batch-size`` = ``batch_size``) and a flag
(``--batch-size``), generated from the fields by `reward_server.config_base`, which also loads
the file. Flags override the file. `TrainConfig.validate` runs once; the trainer trusts the values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from reward_server.config_base import require


@dataclass
class TrainConfig:
    """Everything one reward-model training run needs. Each field is a YAML key and a flag."""

    data: list[str] = field(default_factory=list)
    """Preference data: JSONL/JSON/Parquet files or `datasets` directories (save_to_disk)."""
    base_model: str = ""
    """Backbone: a local Hugging Face checkpoint (causal LM, encoder, or an existing reward model
    to continue from). Loaded with AutoModelForSequenceClassification, num_labels=1."""
    output: str = ""
    """Output directory: the checkpoint, tokenizer, metrics.jsonl, curves.png."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out preference files. When empty, eval_fraction of the prompts of `data` is held out."""
    eval_fraction: float = 0.1
    """Fraction of prompts held out for evaluation (whole prompts: no prompt is on both sides)."""
    data_split: str = "train"
    """Split to read from a `datasets` DatasetDict directory."""
    on_error: Literal["skip", "stop"] = "stop"
    """Malformed record: stop (exit with file and line) or skip (counted and reported)."""
    epochs: int = 1
    """Passes over the training split."""
    batch_size: int = 8
    """Batch elements per micro-batch; one element = one pair, or all pairs of one ranking."""
    eval_batch_size: int = 0
    """Batch elements per evaluation forward (0 = batch_size)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak AdamW learning rate (linear warmup, then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming the learning rate up from 0."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (0 = off)."""
    max_length: int = 256
    """Longest input in tokens; longer texts are truncated on `truncation_side` (counted)."""
    truncation_side: Literal["left", "right"] = "left"
    """left keeps the end of the completion (where the reward is read); right keeps the start."""
    seed: int = 0
    """Seed for the split, shuffling, head initialisation and dropout."""
    margin_from_data: bool = False
    """Use each record's optional "margin" in the loss (Llama 2 section 3.2.2); else margin 0."""
    center_coef: float = 0.0
    """Reward-centering coefficient: adds center_coef * mean(r^2) (Eisenstein et al. 2023)."""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning). The adapter is merged into the saved weights."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    lora_dropout: float = 0.0
    """Dropout inside the LoRA layers."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Modules LoRA wraps (empty = peft's default for the architecture)."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes base weights during training: none, 8bit or 4bit (needs LoRA). Meant for
    CUDA; bitsandbytes >= 0.50 also runs it on CPU, slowly."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA when present), cpu or cuda."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto (bf16 autocast on CUDA when supported, else fp32), fp32 or bf16 (CUDA only)."""
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the saved weights: float32 or bfloat16."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 during training too (lm-human-preferences does)."""
    eval_every: int = 0
    """Also evaluate every N optimizer steps (0 = only at the end of each epoch)."""
    norm_data: list[str] = field(default_factory=list)
    """Reference completions for the normalisation statistics: files of {"prompt", "completion"}
    or {"messages"} records, or preference files (all their responses). Empty = the responses of
    the training split."""
    norm_samples: int = 1000
    """At most this many reference completions (sampled with the seed) for the statistics."""
    progress: bool = True
    """Show tqdm progress bars."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving beside the checkpoint as train_config.yaml)."""
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Ranges and cross-field rules (types and choices were checked at load); raise
        ConfigError naming the key."""

        require(bool(self.data), "give training data: --data FILE[,FILE]")
        require(bool(self.base_model), "give a backbone: --base-model PATH")
        require(bool(self.output), "give an output directory: --output DIR")
        for key in ("epochs", "batch_size", "grad_accum", "max_length", "norm_samples"):
            require(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_batch_size", "eval_every", "lora_r"):
            require(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        require(self.max_length >= 2, "max_length must be >= 2")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay must be >= 0")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        require(self.max_grad_norm >= 0, "max_grad_norm must be >= 0")
        require(self.center_coef >= 0, "center_coef must be >= 0")
        require(self.lora_alpha > 0, "lora_alpha must be > 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        if self.eval_data:
            require(0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)")
        else:
            require(
                0 < self.eval_fraction < 1,
                "eval_fraction must be in (0, 1) when no --eval-data is given "
                f"(got {self.eval_fraction}); a held-out split is always evaluated",
            )
        if self.quantization != "none":
            require(
                self.lora_r > 0, "quantization (8bit/4bit) trains LoRA adapters only: set --lora-r"
            )
        require(
            not (self.precision == "bf16" and self.device == "cpu"),
            "precision bf16 needs CUDA; use --precision fp32 on CPU",
        )
        if self.eval_batch_size == 0:
            self.eval_batch_size = self.batch_size
