"""Typed configuration of a PPO run: a YAML file, then flags and ``section.key=value`` overrides.

Every field has a docstring (the string after it): ``policy-trainer ppo --help`` shows them, and
docs/TRAINER.md lists them all. Loading, type checks (``Literal`` choices included) and the
``--section.key`` flags come from `reward_server.config_base`; `TrainerConfig.validate` adds
the ranges and cross-field rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reward_server.config_base import ConfigError
from reward_server.config_base import load_config as load_dataclass

__all__ = [
    "ConfigError",
    "TrainerConfig",
    "config_from_dict",
    "load_config",
    "parse_overrides",
]


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the policy; the base weights stay frozen."""

    enabled: bool = False
    """Train LoRA adapters instead of the full policy."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None lets peft pick its default for the architecture."""


@dataclass
class ModelConfig:
    """The policy (and its value function)."""

    policy: str = ""
    """Path or hub id of an ``AutoModelForCausalLM`` checkpoint (required)."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; None = the policy's."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype: float32, bfloat16 or float16 (log-probs are always float32)."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N; under torchrun CUDA uses cuda:LOCAL_RANK."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """none, 8bit or 4bit (bitsandbytes base, QLoRA; needs lora.enabled): CUDA, or CPU with
    bitsandbytes >= 0.50."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""
    value_model: Literal["shared", "critic"] = "shared"
    """shared: a zero-initialised linear value head on the policy trunk; critic: a separate model."""
    critic_path: str | None = None
    """Critic checkpoint (value_model=critic), e.g. the reward model to initialise from its weights
    (TRL; Huang et al. 2024, https://arxiv.org/abs/2403.17031); None = the policy checkpoint with a zero-initialised head. Must share the policy's
    vocabulary."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the checkpoint."""


@dataclass
class DataConfig:
    """Where prompts come from."""

    prompts: str | list[str] = ""
    """A JSONL or Parquet file, a ``datasets`` dataset saved with save_to_disk, or an inline list of
    prompt strings (required)."""
    prompt_key: str = "prompt"
    """Column/field holding the prompt text."""
    messages_key: str = "messages"
    """Column/field holding chat messages (used when present; rendered with the policy's chat
    template with a generation prompt and scored as a conversation)."""
    split: str = "train"
    """Split to use when the dataset on disk is a DatasetDict."""
    max_prompt_tokens: int = 64
    """Prompts longer than this keep their last max_prompt_tokens tokens."""
    shuffle: bool = True
    """Reshuffle the prompts every pass (seeded by run.seed and the pass number)."""


@dataclass
class RolloutConfig:
    """Sampling of responses."""

    prompts_per_iteration: int = 4
    """Prompts per iteration on each rank."""
    samples_per_prompt: int = 2
    """Responses sampled per prompt (k; at least 2 for rloo/grpo)."""
    chunk_size: int = 4
    """Sequences generated at once; each chunk's RPCs overlap the next chunk's generation."""
    overlap: Literal["batch", "chunk", "none"] = "batch"
    """How the Score / ReferenceLogProbs RPCs overlap the trainer's own work. "batch": every chunk
    is generated first (chunk i's RPCs run while chunk i+1 is sampled), then the policy log-probs
    and values of all chunks are computed while the last chunks' RPCs finish. "chunk": each chunk's
    policy forward right after its generation (the last chunk's RPCs overlap only its own forward).
    "none": block on each chunk's RPCs as soon as they are sent (no overlap; for measurement)."""
    temperature: float = 1.0
    """Sampling temperature, also used for every log-prob (policy and reference)."""
    max_new_tokens: int = 12
    """Response length cap; the response is truncated after the first EOS."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response with no EOS (TRL); None = no penalty."""
    suppress_special_tokens: bool = True
    """Never sample special tokens other than EOS (pad, unk, bos...): they decode to no text, so a
    response made of them could not be scored and a policy could hide in them unpenalised."""
    min_new_tokens: int = 1
    """EOS is suppressed for the first min_new_tokens sampled tokens (as HF generate's
    min_new_tokens). With 0 a response may be only EOS: such a response has no text the server can
    score, so it is masked out of the update, and a policy can drift toward it unpenalised."""
    logprobs_as_sampled: bool = False
    """Take the policy's log-probs (rollout, PPO ratio, KL) under the distribution the sampler drew
    from, with the suppressed tokens and the early EOS masked out (`sampling.SamplingMask`).
    Off: under the full softmax, where a policy can lower its measured KL by moving probability
    onto tokens it is never sampled with (the demo's did). The server's reference log-probs stay
    full-softmax, so with it on the KL at the start is sum -log(1 - pi_ref(masked tokens)), not 0."""


@dataclass
class RewardServiceConfig:
    """The reward service."""

    address: str = "127.0.0.1:50051"
    """Server address (host:port, a comma list, or dns:///name:port)."""
    reward_model: str = ""
    """Reward model name; empty = the server's default."""
    reference_model: str = ""
    """Reference model name; empty = the server's default."""
    use_normalized_score: bool = False
    """Use the server's normalized score ((s - mean) / std) instead of the raw score."""
    timeout: float = 30.0
    """Deadline in seconds of one call to the reward service, its retries included; with
    retry_budget_seconds, of one round of retries (a round that runs out of time is retried within
    the budget)."""
    max_retries: int = 3
    """Retries of one call after its first attempt: made by gRPC within the channel when `address`
    is one target (at most 5 attempts in all), by the client on the next address for a comma
    list."""
    retry_budget_seconds: float = 120.0
    """Total time the client keeps retrying a call (rounds of `timeout`) on UNAVAILABLE /
    RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, waiting for the server to report SERVING between
    rounds when there is one address, before the trainer checkpoints and stops."""
    wait_ready_seconds: float = 120.0
    """How long to wait for the server to report SERVING at start."""
    tls_ca: str | None = None
    """CA bundle that verifies the server's certificate (turns TLS on)."""
    tls_cert: str | None = None
    """Client certificate for mutual TLS."""
    tls_key: str | None = None
    """Client private key for mutual TLS."""
    token_env: str = "RLHF_AUTH_TOKEN"
    """Environment variable holding the bearer token (read at start, never logged or saved)."""
    check_fingerprint: bool = True
    """Send the policy tokenizer's fingerprint with ReferenceLogProbs (the server refuses a
    mismatch)."""
    score_token_ids: bool = True
    """Score the policy's token ids (no decode, no re-tokenisation on the server) when the reward
    model's tokenizer fingerprint equals the policy's; text otherwise. Decided once at start,
    logged and written to the run's ``reward_input.json``."""
    pin_model_versions: bool = True
    """Pin, at start, the version of every served model the run uses (recorded in the run's
    ``model_versions.json``) and send it with every request: if the server then answers with
    another version (a reload, a rolling update), the trainer checkpoints and stops instead of
    training on a changed reward; ``--resume`` refuses a server serving another version. False:
    versions recorded only."""


@dataclass
class PPOConfig:
    """Rewards, advantages and updates."""

    advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """gae (with a value function), rloo or grpo (critic-free group baselines)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1, k2 or k3."""
    kl_clamp: float | None = None
    """Clamp the log-ratio to +-this before the estimator (OpenRLHF uses 10); None = no clamp."""
    kl_coef: float = 0.05
    """Initial (or fixed) beta."""
    adaptive_kl: bool = False
    """Adapt beta toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target per-sequence KL (nats) of the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive controller (samples)."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] after the EOS penalty; None = no clipping."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (mean kept) before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages (mean shifted) over the rollout batch."""
    epochs: int = 4
    """Passes over the rollout batch per iteration, reshuffled each time."""
    minibatch_size: int = 4
    """Sequences per optimizer step on each rank; must divide the rollout batch."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward (gradient accumulation); None = minibatch_size."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip range around the old values."""
    vf_coef: float = 0.1
    """Value-loss coefficient."""
    lr: float = 1e-5
    """Adam learning rate (linearly decayed to 0 over the run when lr_schedule is linear)."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """linear (to 0 at the last optimizer step) or constant."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 = off."""


@dataclass
class RunConfig:
    """The run itself."""

    output_dir: str = "runs/ppo"
    """Run directory: metrics.jsonl, curves.png, config.yaml, checkpoints/."""
    iterations: int = 2
    """Total PPO iterations (the LR schedule spans these)."""
    seed: int = 0
    """Seed of every RNG (sampling uses seed + rank)."""
    save_every: int = 1
    """Checkpoint every N iterations (and always at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept; 0 = keep all."""
    stop_after: int | None = None
    """Checkpoint and stop after this iteration (to split a run into jobs); None = run to the end."""
    plot_every: int = 1
    """Redraw curves.png every N iterations (and at the end)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars under output_dir/tensorboard (needs tensorboard)."""
    progress: bool = True
    """Show a progress bar."""
    check_rank_sync: bool = True
    """Under torchrun, compare a hash of every rank's weights after each update and stop with an
    error if they differ (logged as ``weights_digest``). Costs one pass over the weights."""
    sample_metrics: str | None = None
    """``module:function`` called on every rollout batch as ``f(prompts, completions, has_eos)``
    (lists of str, str, bool; k samples of a prompt contiguous); the dict of floats it returns is
    logged with the iteration's metrics (averaged over ranks). The demo logs its gold reward so."""
    num_threads: int | None = None
    """CPU threads for torch (torch.set_num_threads); None = torch's default. 1 is much faster
    for tiny models on a busy machine (no OpenMP spinning against other processes)."""


@dataclass
class TrainerConfig:
    """A whole PPO run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy and its value function."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where prompts come from."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of responses."""
    server: RewardServiceConfig = field(default_factory=RewardServiceConfig)
    """The reward service."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Rewards, advantages and updates."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run itself."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check ranges and cross-field rules; raises ConfigError naming the key."""
        _validate(self)

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per iteration on one rank."""
        return self.rollout.prompts_per_iteration * self.rollout.samples_per_prompt


# ----------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["ppo.lr=3e-6", ...]`` -> ``{"ppo.lr": "3e-6"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        if not all(dotted.strip().split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            out[dotted.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    return out


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> TrainerConfig:
    """Defaults, then the YAML file (None: none), then ``section.key=value`` overrides, then
    ``flags`` (``{"ppo.lr": 3e-6}``, from ``--ppo.lr``), validated."""
    merged = {**parse_overrides(overrides or []), **(flags or {})}
    return load_dataclass(TrainerConfig, path, merged)


def config_from_dict(data: dict[str, Any]) -> TrainerConfig:
    """Build and validate from a nested dict (e.g. a saved config.yaml)."""
    return load_dataclass(TrainerConfig, None, data)


def _positive(value: float | int, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# Numeric ranges: dotted key -> whether 0 is allowed (else the value must be > 0).
_RANGES = {
    "model.lora.r": False,
    "data.max_prompt_tokens": False,
    "rollout.prompts_per_iteration": False,
    "rollout.samples_per_prompt": False,
    "rollout.chunk_size": False,
    "rollout.temperature": False,
    "rollout.max_new_tokens": False,
    "server.timeout": False,
    "server.max_retries": True,
    "server.retry_budget_seconds": True,
    "ppo.kl_coef": True,
    "ppo.kl_target": False,
    "ppo.kl_horizon": False,
    "ppo.epochs": False,
    "ppo.minibatch_size": False,
    "ppo.cliprange": False,
    "ppo.cliprange_value": False,
    "ppo.lr": False,
    "ppo.max_grad_norm": True,
    "ppo.kl_clamp": False,
    "ppo.score_clip": False,
    "run.iterations": False,
    "run.save_every": True,
    "run.keep_checkpoints": True,
    "run.plot_every": False,
    "run.stop_after": False,
    "run.num_threads": False,
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _validate(cfg: TrainerConfig) -> None:
    """Ranges and cross-field rules (types and choices were checked at load)."""
    m, d, r, p = cfg.model, cfg.data, cfg.rollout, cfg.ppo
    if not m.policy:
        raise ConfigError("model.policy: required (a checkpoint path or hub id)")
    if not (m.device in ("auto", "cpu", "cuda") or m.device.startswith("cuda:")):
        raise ConfigError(f"model.device: {m.device!r} is not auto, cpu, cuda or cuda:N")
    if m.quantization != "none" and not m.lora.enabled:
        raise ConfigError("model.quantization: a quantized base can only be trained with LoRA")
    if not d.prompts:
        raise ConfigError("data.prompts: required (a file, a dataset directory, or a list)")
    for key, allow_zero in _RANGES.items():
        value = _get(cfg, key)
        if value is not None:  # None = off, for the optional ones
            _positive(value, key, allow_zero)
    if p.advantage_estimator != "gae" and r.samples_per_prompt < 2:
        raise ConfigError(
            f"ppo.advantage_estimator={p.advantage_estimator} needs rollout.samples_per_prompt >= 2"
        )
    if not 0.0 <= p.gamma <= 1.0 or not 0.0 <= p.lam <= 1.0:
        raise ConfigError("ppo.gamma and ppo.lam must lie in [0, 1]")
    batch = cfg.rollout_batch_size
    if batch % p.minibatch_size != 0:
        raise ConfigError(
            f"ppo.minibatch_size={p.minibatch_size} must divide the rollout batch "
            f"(prompts_per_iteration * samples_per_prompt = {batch})"
        )
    micro = p.micro_batch_size or p.minibatch_size
    if micro <= 0 or p.minibatch_size % micro != 0:
        raise ConfigError(
            f"ppo.micro_batch_size={micro} must be > 0 and divide ppo.minibatch_size"
            f"={p.minibatch_size}"
        )
