"""Loading Hugging Face checkpoints: device and dtype, safetensors only, PEFT adapters merged,
optional bitsandbytes quantization. Errors come out as `ModelLoadError` with a clear message."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and why."""


def resolve_device(requested: str) -> str:
    """auto -> cuda when present else cpu; a cuda request without a GPU fails clearly."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {requested}: no CUDA GPU is visible on this machine (use --device cpu or auto)"
        )
    return requested


def resolve_dtype(requested: str, device: str) -> Any:
    """The torch dtype for a requested name on a device (auto: bf16 on CUDA when supported)."""
    import torch

    if requested == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested in ("bfloat16", "float16") and device == "cpu":
        log.warning(
            "dtype %s on CPU is slow and less precise; float32 is the usual choice", requested
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        requested
    ]


def _check_safetensors(source: str) -> None:
    path = Path(source)
    if not path.is_dir():
        return  # a hub id: use_safetensors=True makes transformers refuse pickled weights
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(
        p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")
    )
    if pickled:
        raise ModelLoadError(
            f"{source}: only pickled weights found ({', '.join(pickled)}); the server loads "
            "safetensors only (pickle can run arbitrary code). Convert with "
            "`model.save_pretrained(dir, safe_serialization=True)`."
        )
    raise ModelLoadError(f"{source}: no *.safetensors weights in this directory")


def load_tokenizer(source: str, trust_remote_code: bool) -> Any:
    """The checkpoint's own tokenizer; a missing pad token falls back to EOS (logged)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"{source}: cannot load tokenizer: {exc}") from exc
    if tok.pad_token_id is None:
        log.warning("%s: tokenizer has no pad token; using EOS as pad", source)
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quantization: str, dtype: Any) -> Any:
    """A bitsandbytes config for 8bit/4bit (bitsandbytes >= 0.50 runs on CPU too), else None."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelLoadError(
            f"--quantization {quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.50'"
        ) from exc
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )


def load_model(
    auto_class: Any,
    source: str,
    *,
    device: str,
    dtype: Any,
    adapter: str = "",
    quantization: str = "none",
    trust_remote_code: bool = False,
) -> Any:
    """Load ``auto_class.from_pretrained(source)`` for inference (eval mode, no grad).

    Safetensors only; `trust_remote_code` only when asked; a PEFT adapter is merged into the
    weights (peft `merge_and_unload`), so inference costs nothing extra.
    """
    _check_safetensors(source)
    qcfg = quantization_config(quantization, dtype)
    kwargs: dict[str, Any] = dict(
        dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": device}
    try:
        model = auto_class.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{source}: this checkpoint ships its own model code; the server does not run it "
                "unless started with --trust-remote-code"
            ) from exc
        raise ModelLoadError(f"{source}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc
    if adapter:
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise ModelLoadError("adapters need peft: pip install peft") from exc
        _check_safetensors(adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if qcfg is None:
        model.to(device)
    model.eval()  # dropout off (REFERENCES.md item 12)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def max_positions(model: Any, tokenizer: Any) -> int:
    """The longest input the model takes: the config's position limit and the tokenizer's."""
    cfg = model.config
    limits = [
        getattr(cfg, k, None)
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    ]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    tmax = getattr(tokenizer, "model_max_length", None)
    if isinstance(tmax, int) and 0 < tmax < 1_000_000:
        limits.append(tmax)
    return min(limits) if limits else 2048
