"""Loading the policy (optionally LoRA / k-bit base) and its value function, dropout off.

Device, dtype, tokenizer and dropout come from the shared modules of `reward_server`
(`devices`, `tokenizer_loading`, `dropout`), so the trainer and the server agree on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from policy_trainer.config import ConfigError, ModelConfig
from reward_server import devices, tokenizer_loading
from reward_server.dropout import disable_dropout


def resolve_device(cfg: ModelConfig, local_rank: int = 0) -> torch.device:
    """The device of this rank: `reward_server.devices.resolve_device` of ``model.device``
    (``cuda:LOCAL_RANK`` under torchrun when CUDA is used); no CUDA is a `ConfigError`."""
    try:
        return torch.device(devices.resolve_device(cfg.device, local_rank, setting="model.device"))
    except devices.DeviceError as e:
        raise ConfigError(str(e)) from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The policy tokenizer, left-padded for generation, with the pad-token policy of
    `reward_server.tokenizer_loading` (pad never EOS, the vocabulary and so the tokenizer
    fingerprint unchanged); a tokenizer without EOS is a `ConfigError` (responses could never
    end)."""
    src = cfg.tokenizer or cfg.policy
    try:
        tok = tokenizer_loading.load_tokenizer(
            src, trust_remote_code=cfg.trust_remote_code, padding_side="left"
        )
    except tokenizer_loading.TokenizerLoadError as e:
        raise ConfigError(str(e)) from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {src!r} has no EOS token; responses could never end")
    return tok


def _load_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": devices.torch_dtype(cfg.dtype),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.quantization != "none":
        from transformers import BitsAndBytesConfig

        # bitsandbytes >= 0.50 runs k-bit layers on CPU too; compute in float32 there unless a
        # half dtype was asked for (CPU bf16 matmuls are slower, not faster).
        fallback = torch.bfloat16 if device.type == "cuda" else torch.float32
        compute = devices.torch_dtype(cfg.dtype) if cfg.dtype != "float32" else fallback
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=cfg.quantization == "8bit",
            load_in_4bit=cfg.quantization == "4bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
    return kwargs


def load_policy(
    cfg: ModelConfig, device: torch.device, adapter_or_weights: Path | None = None
) -> nn.Module:
    """``AutoModelForCausalLM`` (+ LoRA); ``adapter_or_weights`` is a checkpoint's ``policy/`` dir
    to resume from (full weights, or the adapter when LoRA is on)."""
    from transformers import AutoModelForCausalLM

    src = (
        cfg.policy if (cfg.lora.enabled or adapter_or_weights is None) else str(adapter_or_weights)
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **_load_kwargs(cfg, device))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the policy from {src!r}: {e}") from None
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if cfg.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if adapter_or_weights is not None:
            model = PeftModel.from_pretrained(model, str(adapter_or_weights), is_trainable=True)
        else:
            lora = PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=0.0,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            )
            try:
                model = get_peft_model(model, lora)
            except ValueError as e:
                raise ConfigError(f"model.lora: {e}") from None
    if cfg.quantization == "none":
        model = model.to(device)
    else:
        devices.keep_kbit_layers_trainable(model)
    disable_dropout(model)
    return model


def hidden_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def load_critic(
    cfg: ModelConfig, device: torch.device, resume_dir: Path | None = None
) -> nn.Module:
    """``AutoModelForSequenceClassification`` with one output: the reward model's weights when
    ``critic_path`` points at it (TRL ``ppo_trainer.py`` value model), else the policy checkpoint
    with a zero-initialised head."""
    from transformers import AutoModelForSequenceClassification

    src = str(resume_dir) if resume_dir is not None else (cfg.critic_path or cfg.policy)
    try:
        critic, info = AutoModelForSequenceClassification.from_pretrained(
            src,
            num_labels=1,
            dtype=devices.torch_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"cannot load the critic from {src!r} (one-output head needed): {e}"
        ) from None
    head = _critic_head(critic)
    if any(k.split(".")[0] in ("score", "classifier") for k in info.get("missing_keys", [])):
        nn.init.zeros_(head.weight)
        if getattr(head, "bias", None) is not None:
            nn.init.zeros_(head.bias)
    disable_dropout(critic)
    return critic.to(device)


def _critic_head(critic: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        if isinstance(getattr(critic, name, None), nn.Linear):
            return getattr(critic, name)
    raise ConfigError(f"critic {type(critic).__name__}: no linear `score`/`classifier` head found")


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - mask``: real tokens get 0, 1, 2, ... whatever the left padding (the server
    computes its reference log-probs the same way: docs/API.md, "ReferenceLogProbs"); mask
    [B, L] -> [B, L]."""
    mask = mask.long()
    return mask.cumsum(dim=-1) - mask


class ActorCritic(nn.Module):
    """The trainable modules of a run in one ``nn.Module`` (so DDP averages all gradients): the
    policy plus a value head on its trunk, or a separate critic, or no value function."""

    def __init__(self, policy: nn.Module, value_model: str | None, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head: nn.Linear | None = None
        self.critic = critic
        if value_model == "shared":
            # Zero-initialised value head, float32 (Huang et al., "The N Implementation Details of
            # RLHF with PPO", https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/).
            self.value_head = nn.Linear(hidden_size(policy), 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(policy.parameters()).device)

    @property
    def has_values(self) -> bool:
        return self.value_head is not None or self.critic is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        context_length: int,
        temperature: float,
        with_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, attention_mask: [B, P + R] (left-padded prompt, right-padded response).

        Returns the float32 logits / T that predict the response tokens [B, R, V] (position
        ``t - 1`` predicts token ``t``) and the values at the same positions [B, R] (or None).
        """
        pos = position_ids_from_mask(attention_mask)  # [B, L]
        want_hidden = with_values and self.value_head is not None
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=pos,
            output_hidden_states=want_hidden,
            use_cache=False,
        )
        sl = slice(context_length - 1, input_ids.shape[1] - 1)
        logits = out.logits[:, sl].float() / temperature  # [B, R, V]
        values = None
        if want_hidden:
            hidden = out.hidden_states[-1][:, sl]  # [B, R, H]
            values = self.value_head(hidden.float()).squeeze(-1)  # [B, R]
        elif with_values and self.critic is not None:
            backbone = getattr(self.critic, self.critic.base_model_prefix)
            h = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos)
            hidden = h.last_hidden_state[:, sl]  # [B, R, H]
            values = _critic_head(self.critic)(hidden).float().squeeze(-1)  # [B, R]
        return logits, values
