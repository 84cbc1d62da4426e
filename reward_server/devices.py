"""Which device and dtype a model runs on: one resolution for the server, reward-model training
and the PPO trainer.

A shared piece (docs/ARCHITECTURE.md): it imports nothing of the serving layers, and torch only
inside the functions, so importing it costs nothing.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class DeviceError(ValueError):
    """The requested device cannot be used here; the message names the setting and what to do."""


def resolve_device(
    requested: str, local_rank: int | None = None, *, setting: str = "--device"
) -> str:
    """The device string to run on.

    ``auto`` is CUDA when a GPU is visible, else ``cpu``; ``cpu`` and ``cuda:N`` are kept as
    they are; a bare ``cuda`` (or ``auto`` picking CUDA) is ``cuda:LOCAL_RANK`` when a
    `local_rank` is given (one GPU per torchrun process) and ``cuda`` (the current device)
    otherwise. Asking for CUDA on a machine without it raises `DeviceError` naming `setting`.
    """
    import torch

    if requested == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if requested == "auto" and not has_cuda:
        return "cpu"
    if not has_cuda:
        raise DeviceError(
            f"{setting} {requested}: CUDA is not available (no CUDA GPU is visible on this "
            "machine); use cpu or auto"
        )
    if requested in ("auto", "cuda"):
        return "cuda" if local_rank is None else f"cuda:{local_rank}"
    return requested


def torch_dtype(name: str) -> Any:
    """The torch dtype named ``float32``, ``bfloat16`` or ``float16``."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_dtype(requested: str, device: str) -> Any:
    """The torch dtype for a requested name on a device: ``auto`` is bfloat16 on a CUDA device
    that supports it, else float32; half precision on a CPU is allowed, with a warning."""
    import torch

    if requested == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested in ("bfloat16", "float16") and device == "cpu":
        log.warning(
            "dtype %s on CPU is slow and less precise; float32 is the usual choice", requested
        )
    return torch_dtype(requested)


def keep_kbit_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its AVX512-BF16 CPU inference
    kernel, for a model that trains. It repacks in place on the first eval-mode CPU forward
    (bitsandbytes/nn/modules.py, ``Linear4bit.forward``), and the packed path has no backward:
    after an evaluation or a rollout, the next training forward would fail on a layer with a bias
    and give a silently wrong gradient through one without. No effect on CUDA or 8-bit layers."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
