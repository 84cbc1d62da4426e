"""Loading Hugging Face checkpoints for inference: safetensors only, PEFT adapters merged,
optional bitsandbytes quantization. Errors come out as `ModelLoadError` with a clear message.

The device and dtype come from `reward_server.devices`, the tokenizer from
`reward_server.tokenizer_loading` (shared with training and the trainer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from typing_extensions import NotRequired, Unpack

log = logging.getLogger(__name__)


class LoadOptions(TypedDict):
    """How a torch checkpoint is loaded; `load_model` and the torch runners take these as
    keyword arguments."""

    device: str
    """Where the weights go: ``cpu``, ``cuda``, ``cuda:N``."""
    dtype: Any
    """A torch dtype (`reward_server.devices.resolve_dtype`)."""
    adapter: NotRequired[str]
    """A PEFT adapter directory merged into the weights ("" = none)."""
    quantization: NotRequired[str]
    """``none``, ``8bit`` or ``4bit`` (bitsandbytes)."""
    trust_remote_code: NotRequired[bool]
    """Run model code shipped with the checkpoint (off unless the operator asks)."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and why."""


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


def load_model(auto_class: Any, source: str, **options: Unpack[LoadOptions]) -> Any:
    """Load ``auto_class.from_pretrained(source)`` for inference (eval mode, no grad).

    Safetensors only; `trust_remote_code` only when asked; a PEFT adapter is merged into the
    weights (peft `merge_and_unload`), so inference costs nothing extra.
    """
    device, dtype = options["device"], options["dtype"]
    adapter = options.get("adapter", "")
    quantization = options.get("quantization", "none")
    trust_remote_code = options.get("trust_remote_code", False)
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
    model.eval()  # inference: dropout off, as in training (reward_server/dropout.py)
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
