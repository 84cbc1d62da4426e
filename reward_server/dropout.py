"""Turning dropout off in a model that is trained by RL or preference losses (a shared piece,
docs/ARCHITECTURE.md).

Log-probs and values must be the same function of the weights in the rollout and in the update,
so dropout is off everywhere (Huang et al., "The N Implementation Details of RLHF with PPO", ICLR
blogposts 2024: https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/).
"""

from __future__ import annotations

from typing import Any

_MARKERS = ("dropout", "pdrop")


def _is_rate(name: str, value: Any) -> bool:
    return isinstance(value, float) and any(m in name for m in _MARKERS)


def disable_dropout(model: Any) -> None:
    """Set every dropout probability of ``model`` (a torch module) to 0, in three places:
    ``p`` of every ``torch.nn.Dropout`` module; float attributes of any module named like a
    dropout rate (attention code that keeps the rate as a number, e.g. ``attention_dropout``);
    and config fields named like one (``attn_pdrop``, ``hidden_dropout_prob``), for code that
    reads the config at run time. A checkpoint saved afterwards records the zero rates."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if _is_rate(key, value):
                    setattr(config, key, 0.0)
