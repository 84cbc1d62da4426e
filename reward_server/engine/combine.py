"""Combination rules turning several named scores (heads of one model, or several reward models)
into one `score`. Pure functions, no torch.

Spec strings: ``head:NAME`` (one of them), ``mean:a,b``, ``min:a,b`` (a gate: the worst of the
members, in the spirit of Llama 2's safety gate, section 3.2.2), ``weighted:a=1.0,b=0.5``
(TRL's ``reward_weights``). For ``mean``/``min`` the member list may be omitted (= all members).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Combiner:
    """A parsed rule: `kind` in {head, mean, min, weighted}, `weights` per member name."""

    kind: str
    weights: dict[str, float]
    spec: str

    @property
    def members(self) -> list[str]:
        """Member names the rule reads."""
        return list(self.weights)

    def apply(self, values: dict[str, float]) -> float:
        """Combine one item's named values into one score."""
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
    else:
        raise ValueError(f"combine rule {spec!r}: kind must be head, mean, min or weighted")
    unknown = [n for n in weights if n not in available]
    if unknown:
        raise ValueError(
            f"combine rule {spec!r}: unknown member(s) {unknown}; available: {available}"
        )
    return Combiner(kind, weights, spec)
