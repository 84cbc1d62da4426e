"""torchrun support: process group setup and the few collectives the trainer needs.

Each rank builds its own reward client and model; DDP averages gradients; rank 0 writes metrics
and checkpoints. Without torchrun (WORLD_SIZE unset) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) when running under torchrun."""
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def mean_over_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average each statistic over ranks (same keys on every rank)."""
    if not _active():
        return dict(stats)
    keys = sorted(stats)
    sums = all_reduce_sum([stats[k] for k in keys], device)
    return {k: v / dist.get_world_size() for k, v in zip(keys, sums, strict=True)}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on at least one rank."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without torchrun)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every trainable parameter's bytes (identical weights <=> identical digests)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_ranks_in_sync(module: torch.nn.Module) -> str:
    """Digest of this rank's weights; RuntimeError if any rank's differs (DDP desync)."""
    digest = weights_digest(module)
    digests = gather_objects(digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks hold different weights after the update: digests {digests}")
    return digest
