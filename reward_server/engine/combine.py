"""Combination rules turning several named scores (heads of one model, or several reward models)
into one `score`. Pure functions, no torch.

Spec strings: ``head:NAME`` (one of them), ``mean:a,b``, ``min:a,b`` (a gate: the worst of the
members, in the spirit of Llama 2's safety gate, section 3.2.2), ``weighted:a=1.0,b=0.5``
(TRL's ``reward_weights``), ``safety_gate:safety=S,helpful=H[,threshold=0.15]`` (Llama 2's
piecewise reward, Touvron et al. 2023, section 3.2.3: the safety model's score when the item is
marked a safety prompt or ``sigmoid(R_S) < threshold``, else the helpfulness model's). For
``mean``/``min`` the member list may be omitted (= all members).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GATE_THRESHOLD = 0.15
"""Llama 2's safety threshold on sigmoid(R_safety) (Touvron et al. 2023, section 3.2.3)."""


@dataclass(frozen=True)
class Combiner:
    """A parsed rule: `kind` in {head, mean, min, weighted, safety_gate}, `weights` per member
    name (for safety_gate: the safety member first, then the helpful one)."""

    kind: str
    weights: dict[str, float]
    spec: str
    threshold: float = GATE_THRESHOLD
    """safety_gate only: the gate on sigmoid(R_safety)."""

    def selected(self, values: dict[str, float], safety_prompt: bool = False) -> str:
        """safety_gate: the member whose score an item gets (Llama 2, section 3.2.3:
        R_s if IS_SAFETY(p) or R_s < threshold, else R_h; R_s there is a probability, ours is the
        logit, so the gate reads sigmoid(R_s))."""
        safety, helpful = self.members
        r_s = values[safety]
        gated = safety_prompt or 1.0 / (1.0 + math.exp(-r_s)) < self.threshold
        return safety if gated else helpful

    @property
    def members(self) -> list[str]:
        """Member names the rule reads."""
        return list(self.weights)

    def apply(self, values: dict[str, float], safety_prompt: bool = False) -> float:
        """Combine one item's named values into one score (``safety_prompt``: the item is
        marked a safety prompt; only safety_gate reads it). The gate's score is the selected
        member's raw score, i.e. LOGIT of its probability, as Llama 2 whitens LOGIT(R_c)."""
        if self.kind == "safety_gate":
            return values[self.selected(values, safety_prompt)]
        if self.kind == "head":
            return values[next(iter(self.weights))]
        if self.kind == "min":
            return min(values[n] for n in self.weights)
        if self.kind == "mean":
            return sum(values[n] for n in self.weights) / len(self.weights)
        return sum(w * values[n] for n, w in self.weights.items())


def parse_combiner(spec: str, available: list[str]) -> Combiner:
    """Parse a rule against the available member names; ValueError names what is wrong."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    weights: dict[str, float] = {}
    if kind == "head":
        if len(parts) != 1:
            raise ValueError(f"combine rule {spec!r}: 'head:' takes exactly one name")
        weights[parts[0]] = 1.0
    elif kind in ("mean", "min"):
        for name in parts or available:
            weights[name] = 1.0
    elif kind == "weighted":
        if not parts:
            raise ValueError(f"combine rule {spec!r}: 'weighted:' needs name=weight pairs")
        for part in parts:
            name, sep, w = part.partition("=")
            try:
                weights[name.strip()] = float(w) if sep else 1.0
            except ValueError:
                raise ValueError(f"combine rule {spec!r}: weight {w!r} is not a number") from None
    elif kind == "safety_gate":
        return _parse_gate(spec, parts, available)
    else:
        raise ValueError(
            f"combine rule {spec!r}: kind must be head, mean, min, weighted or safety_gate"
        )
    unknown = [n for n in weights if n not in available]
    if unknown:
        raise ValueError(
            f"combine rule {spec!r}: unknown member(s) {unknown}; available: {available}"
        )
    return Combiner(kind, weights, spec)


def _parse_gate(spec: str, parts: list[str], available: list[str]) -> Combiner:
    """``safety_gate:safety=S,helpful=H[,threshold=T]``."""
    keys: dict[str, str] = {}
    for part in parts:
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or key not in ("safety", "helpful", "threshold") or key in keys:
            raise ValueError(
                f"combine rule {spec!r}: safety_gate takes safety=NAME, helpful=NAME and an "
                f"optional threshold=P, each once (got {part!r})"
            )
        keys[key] = value
    if "safety" not in keys or "helpful" not in keys:
        raise ValueError(f"combine rule {spec!r}: safety_gate needs safety=NAME and helpful=NAME")
    try:
        threshold = float(keys.get("threshold", GATE_THRESHOLD))
    except ValueError:
        raise ValueError(f"combine rule {spec!r}: threshold is not a number") from None
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"combine rule {spec!r}: threshold must lie in (0, 1), got {threshold}")
    if keys["safety"] == keys["helpful"]:
        raise ValueError(f"combine rule {spec!r}: safety and helpful must be different models")
    unknown = [keys[k] for k in ("safety", "helpful") if keys[k] not in available]
    if unknown:
        raise ValueError(
            f"combine rule {spec!r}: unknown member(s) {unknown}; available: {available}"
        )
    return Combiner("safety_gate", {keys["safety"]: 1.0, keys["helpful"]: 1.0}, spec, threshold)
