"""Checkpoints that resume exactly: weights (Hugging Face format, or the LoRA adapter), value
head or critic, optimizer, scheduler, KL controller, every RNG state of every rank, data position.

Layout: ``<run>/checkpoints/iter_000012/{policy/, value_head.pt | critic/, trainer_state.pt}``.
A checkpoint is written to a temporary directory and renamed, so a crash never leaves half a one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy_trainer.models import ActorCritic

_PATTERN = re.compile(r"^iter_(\d{6,})$")


def capture_rng(sample_gen: torch.Generator, shuffle_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG this rank uses."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "sample": sample_gen.get_state(),
        "shuffle": shuffle_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(
    state: dict[str, Any], sample_gen: torch.Generator, shuffle_gen: torch.Generator
) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    sample_gen.set_state(state["sample"])
    shuffle_gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / "checkpoints" / f"iter_{iteration:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _PATTERN.match(p.name)
        if m and (p / "trainer_state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: ActorCritic,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``iteration`` (rank 0 only) and prune old ones beyond ``keep``."""
    final = checkpoint_dir(run_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    if model.value_head is not None:
        torch.save(model.value_head.state_dict(), tmp / "value_head.pt")
    if model.critic is not None:
        model.critic.save_pretrained(tmp / "critic")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The optimizer/scheduler/controller/RNG/data state of a checkpoint."""
    # weights_only=False: the state holds RNG tuples and numpy arrays written by this module.
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def load_value_head(model: ActorCritic, ckpt: Path) -> None:
    if model.value_head is not None:
        state = torch.load(ckpt / "value_head.pt", map_location="cpu", weights_only=True)
        model.value_head.load_state_dict(state)


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run starts from: the latest one with ``resume`` (a ConfigError when there
    is none), else None (a ConfigError when the directory already holds checkpoints, so a run
    is never overwritten by accident)."""
    from reward_server.config_base import ConfigError

    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
    if not resume and latest is not None:
        raise ConfigError(
            f"run.output_dir={run_dir} already holds checkpoints: pass --resume to "
            "continue that run, or choose another output directory"
        )
    return latest
