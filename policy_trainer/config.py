"""Typed configuration of a PPO run: YAML file + ``section.key=value`` overrides, validated once.

Every field has a docstring (the string after it); docs/TRAINER.md lists them all.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


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
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (log-probs are always float32)."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N; under torchrun CUDA uses cuda:LOCAL_RANK."""
    quantization: str = "none"
    """none, 8bit or 4bit (bitsandbytes base, QLoRA): CUDA only, needs lora.enabled."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""
    value_model: str = "shared"
    """shared: a zero-initialised linear value head on the policy trunk; critic: a separate model."""
    critic_path: str | None = None
    """Critic checkpoint (value_model=critic), e.g. the reward model to initialise from its weights
    (TRL/N+); None = the policy checkpoint with a zero-initialised head. Must share the policy's
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
    overlap: str = "batch"
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


@dataclass
class ServerConfig:
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
    """Deadline of one RPC attempt in seconds."""
    max_retries: int = 3
    """Retries inside the client library for one call."""
    retry_budget_seconds: float = 120.0
    """Total time the trainer keeps retrying a chunk's RPCs on UNAVAILABLE / RESOURCE_EXHAUSTED /
    DEADLINE_EXCEEDED before it checkpoints and stops."""
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


@dataclass
class PPOConfig:
    """Rewards, advantages and updates."""

    advantage_estimator: str = "gae"
    """gae (with a value function), rloo or grpo (critic-free group baselines)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_estimator: str = "k1"
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
    lr_schedule: str = "linear"
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
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe)."""
        return dataclasses.asdict(self)

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per iteration on one rank."""
        return self.rollout.prompts_per_iteration * self.rollout.samples_per_prompt


# ----------------------------------------------------------------------------- loading


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Check (and mildly coerce: int -> float) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-6" (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key(s){where}: {', '.join(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainerConfig:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    cfg = _build(TrainerConfig, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainerConfig:
    """Build and validate from a nested dict (e.g. a saved config.yaml)."""
    cfg = _build(TrainerConfig, data, "")
    validate(cfg)
    return cfg


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(value: float | int, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: TrainerConfig) -> None:
    """Check ranges, choices and cross-field rules; raises ConfigError naming the key."""
    m, d, r, s, p, run = cfg.model, cfg.data, cfg.rollout, cfg.server, cfg.ppo, cfg.run
    if not m.policy:
        raise ConfigError("model.policy: required (a checkpoint path or hub id)")
    _choice(m.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
    _choice(m.quantization, ("none", "8bit", "4bit"), "model.quantization")
    _choice(m.value_model, ("shared", "critic"), "model.value_model")
    if not (m.device in ("auto", "cpu", "cuda") or m.device.startswith("cuda:")):
        raise ConfigError(f"model.device: {m.device!r} is not auto, cpu, cuda or cuda:N")
    if m.quantization != "none" and not m.lora.enabled:
        raise ConfigError("model.quantization: a quantized base can only be trained with LoRA")
    _positive(m.lora.r, "model.lora.r")
    if not d.prompts:
        raise ConfigError("data.prompts: required (a file, a dataset directory, or a list)")
    _positive(d.max_prompt_tokens, "data.max_prompt_tokens")
    _positive(r.prompts_per_iteration, "rollout.prompts_per_iteration")
    _positive(r.samples_per_prompt, "rollout.samples_per_prompt")
    _positive(r.chunk_size, "rollout.chunk_size")
    _positive(r.temperature, "rollout.temperature")
    _positive(r.max_new_tokens, "rollout.max_new_tokens")
    _positive(s.timeout, "server.timeout")
    _positive(s.max_retries, "server.max_retries", allow_zero=True)
    _positive(s.retry_budget_seconds, "server.retry_budget_seconds", allow_zero=True)
    _choice(r.overlap, ("batch", "chunk", "none"), "rollout.overlap")
    _choice(p.advantage_estimator, ("gae", "rloo", "grpo"), "ppo.advantage_estimator")
    _choice(p.kl_estimator, ("k1", "k2", "k3"), "ppo.kl_estimator")
    _choice(p.lr_schedule, ("linear", "constant"), "ppo.lr_schedule")
    if p.advantage_estimator != "gae" and r.samples_per_prompt < 2:
        raise ConfigError(
            f"ppo.advantage_estimator={p.advantage_estimator} needs rollout.samples_per_prompt >= 2"
        )
    if not 0.0 <= p.gamma <= 1.0 or not 0.0 <= p.lam <= 1.0:
        raise ConfigError("ppo.gamma and ppo.lam must lie in [0, 1]")
    _positive(p.kl_coef, "ppo.kl_coef", allow_zero=True)
    _positive(p.kl_target, "ppo.kl_target")
    _positive(p.kl_horizon, "ppo.kl_horizon")
    _positive(p.epochs, "ppo.epochs")
    _positive(p.minibatch_size, "ppo.minibatch_size")
    _positive(p.cliprange, "ppo.cliprange")
    _positive(p.cliprange_value, "ppo.cliprange_value")
    _positive(p.lr, "ppo.lr")
    _positive(p.max_grad_norm, "ppo.max_grad_norm", allow_zero=True)
    if p.kl_clamp is not None:
        _positive(p.kl_clamp, "ppo.kl_clamp")
    if p.score_clip is not None:
        _positive(p.score_clip, "ppo.score_clip")
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
    _positive(run.iterations, "run.iterations")
    _positive(run.save_every, "run.save_every", allow_zero=True)
    _positive(run.keep_checkpoints, "run.keep_checkpoints", allow_zero=True)
    _positive(run.plot_every, "run.plot_every")
    if run.stop_after is not None:
        _positive(run.stop_after, "run.stop_after")
    if run.num_threads is not None:
        _positive(run.num_threads, "run.num_threads")
