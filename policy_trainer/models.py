"""Loading the policy (optionally LoRA / k-bit base) and its value function, dropout off."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policy_trainer.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: ModelConfig, local_rank: int = 0) -> torch.device:
    """The device of this rank (cuda:LOCAL_RANK under torchrun when CUDA is used)."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if cfg.device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"model.device={cfg.device}: CUDA is not available on this machine")
    if cfg.device.startswith("cuda:"):
        return torch.device(cfg.device)
    return torch.device("cuda", local_rank)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (N+ implementation details): p = 0 in every Dropout module and in
    config fields named like dropout, for attention implementations that read the config."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                    setattr(config, key, 0.0)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The policy tokenizer with left padding and a pad token distinct from EOS.

    Without such a pad token an existing non-EOS token (unk, else id 0/1) is used as pad: pad ids
    only ever sit under a 0 attention mask and never reach the server, and the vocabulary (and
    so the tokenizer fingerprint) stays unchanged.
    """
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.policy
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer from {src!r}: {e}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {src!r} has no EOS token; responses could never end")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        candidates = [tok.unk_token_id, 0, 1]
        pad_id = next(c for c in candidates if c is not None and c != tok.eos_token_id)
        tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        log.warning("tokenizer has no pad token distinct from EOS; padding with %r", tok.pad_token)
    tok.padding_side = "left"
    return tok


def _load_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.quantization != "none":
        if device.type != "cuda":
            raise ConfigError("model.quantization: 8bit/4bit bases are supported on CUDA only")
        from transformers import BitsAndBytesConfig

        compute = DTYPES[cfg.dtype] if cfg.dtype != "float32" else torch.bfloat16
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
            dtype=DTYPES[cfg.dtype],
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
    """``cumsum(mask) - mask``: real tokens get 0, 1, 2, ... whatever the left padding (N+ details
    item 11); mask [B, L] -> [B, L]."""
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
            # Zero-initialised value head (N+ implementation details item 13), float32.
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
