"""The reward model being trained: backbone loading, LoRA, scoring, merging and saving.

The saved checkpoint is a plain Hugging Face `AutoModelForSequenceClassification` directory
(num_labels=1, safetensors, tokenizer beside it, ``config.pad_token_id`` set, LoRA merged) with
``config.reward_normalization = {"mean", "std", "count"}``, which `reward-server serve` reads.

The device, the tokenizer (with a pad token of its own: `reward_server.tokenizer_loading`), the
seed and dropout come from the shared modules the server and the PPO trainer use too.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from reward_server.devices import keep_kbit_layers_trainable
from reward_server.training.batching import encode_texts
from reward_server.training.config import TrainConfig


class ModelSetupError(RuntimeError):
    """The device, tokenizer or backbone cannot be set up (message says why)."""


def use_bf16(precision: str, device: str) -> bool:
    """Whether to train under bf16 autocast (fp32 master weights)."""
    if precision == "fp32" or not device.startswith("cuda"):
        if precision == "bf16":
            raise ModelSetupError("--precision bf16 needs CUDA")
        return False
    supported = torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ModelSetupError("--precision bf16: this GPU does not support bfloat16")
    return supported


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when asked, else a no-op context."""
    if bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _init_new_head(model: Any, new_keys: set[str], seed: int) -> list[str]:
    """Re-initialise freshly created head weights: N(0, 1/sqrt(d+1)), bias 0.

    lm-human-preferences (``lm_human_preferences/rewards.py``) initialises the reward head this way
    so initial rewards have unit scale; transformers' default (std 0.02) makes them tiny.
    """
    gen = torch.Generator().manual_seed(seed)
    done = []
    for name in sorted(new_keys):
        try:
            param = model.get_parameter(name)
        except AttributeError:
            continue
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 2 and param.shape[0] == 1:
                d = param.shape[1]
                noise = torch.randn(param.shape, generator=gen) / math.sqrt(d + 1)
                param.copy_(noise.to(param.dtype))
            else:
                continue
        done.append(name)
    return done


def load_backbone(
    source: str, tokenizer: Any, *, seed: int, quantization: str = "none", device: str = "cpu"
) -> tuple[Any, list[str]]:
    """`AutoModelForSequenceClassification` with one output, pad token set, new head initialised.

    Returns (model, names of freshly initialised parameters). A causal LM or encoder gets a random
    head; an existing one-output reward model continues from its head.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise ModelSetupError(f"cannot load a model config from {source!r}: {e}") from None
    if getattr(config, "num_labels", 1) != 1:
        config.id2label = {0: "LABEL_0"}
        config.label2id = {"LABEL_0": 0}
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    kwargs: dict[str, Any] = dict(
        config=config, ignore_mismatched_sizes=True, output_loading_info=True, dtype=torch.float32
    )
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        )
        kwargs["device_map"] = {"": device}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except Exception as e:
        raise ModelSetupError(f"cannot load {source!r} as a sequence classifier: {e}") from None
    if quantization != "none":
        keep_kbit_layers_trainable(model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    new_keys = set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())}
    return model, _init_new_head(model, new_keys, seed)


def max_positions(model: Any) -> int | None:
    """The longest input the model's position embeddings allow (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap ``model`` with LoRA adapters (peft, task SEQ_CLS: the head is trained in full)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lcfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules or None,
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        raise ModelSetupError(
            f"cannot add LoRA adapters: {e} (set --lora-target-modules)"
        ) from None


def merge_for_saving(model: Any, cfg: TrainConfig, tokenizer: Any) -> Any:
    """A plain (non-peft) model holding the trained weights, on CPU-or-device, float32.

    LoRA is merged with peft's ``merge_and_unload``; a quantized base is first re-loaded in full
    precision and the adapter merged into that (merging into k-bit weights would lose precision).
    """
    if cfg.lora_r == 0:
        return model
    if cfg.quantization == "none":
        return model.merge_and_unload()
    return merge_into_fresh_base(model, cfg, tokenizer)


def merge_into_fresh_base(peft_model: Any, cfg: TrainConfig, tokenizer: Any) -> Any:
    """Save the adapter (and the trained head), re-load the base in float32, merge."""
    from peft import PeftModel

    device = next(peft_model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        base, _ = load_backbone(cfg.base_model, tokenizer, seed=cfg.seed)
        merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    return merged.to(device)


@torch.no_grad()
def score_texts(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int,
    truncation_side: str = "left",
    batch_size: int = 16,
    device: str = "cpu",
    bf16: bool = False,
) -> list[float]:
    """Rewards of rendered ``texts`` (eval mode, right padding, last non-pad token)."""
    was_training = model.training
    model.eval()
    ids, _ = encode_texts(tokenizer, texts, max_length, truncation_side)
    out: list[float] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        for i, s in enumerate(chunk):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with autocast(device, bf16):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        out.extend(logits[:, 0].float().cpu().tolist())  # [B]
    if was_training:
        model.train()
    return out


def normalization_stats(rewards: list[float]) -> dict[str, float | int]:
    """``{"mean", "std", "count"}`` of the rewards (population std, floored at 1e-6 so the
    server's ``(score - mean) / std`` is always defined)."""
    if not rewards:
        raise ValueError("no rewards to compute normalisation statistics from")
    t = torch.tensor(rewards, dtype=torch.float64)
    std = float(t.std(unbiased=False)) if len(rewards) > 1 else 0.0
    return {"mean": float(t.mean()), "std": max(std, 1e-6), "count": len(rewards)}


def save_checkpoint(
    model: Any, tokenizer: Any, out_dir: str, normalization: dict[str, Any]
) -> None:
    """Write the checkpoint: safetensors weights, config with normalisation stats, tokenizer."""
    model.config.reward_normalization = dict(normalization)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.num_labels = 1
    model.save_pretrained(out_dir)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(out_dir)


def trainable_parameters(model: Any) -> Iterator[torch.nn.Parameter]:
    """Parameters the optimizer updates."""
    return (p for p in model.parameters() if p.requires_grad)
