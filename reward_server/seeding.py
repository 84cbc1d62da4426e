"""Seeding every random number generator a run draws from (a shared piece, docs/ARCHITECTURE.md)."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every CUDA device)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
