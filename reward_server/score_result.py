"""The score of one item, on both sides of the wire: what the engine computes and what the client
returns (`rlhf.v1.ItemScore` between them). Pure: the client and the engine both import it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScoreResult:
    """The score of one item (raw: no sigmoid)."""

    score: float
    """The model's (or combination's) score."""
    head_scores: dict[str, float]
    """One value per head of a multi-head model, or per member of a combination."""
    num_tokens: int
    """Tokens the reward model read (after truncation)."""
    truncated: bool
    """Whether the input was cut to the model's limit."""
    normalized_score: float | None = None
    """(score - mean) / std with the checkpoint's statistics; None without them."""
    model_version: str = ""
    """The version of the model (or combination) that answered (client side; "" from an older
    server)."""
