"""Benchmark inputs: prompt/completion pairs of known token lengths, and request plans.

Every word of `reward_server.tiny.WORDS` is one token of the benchmark tokenizer (with or without
a leading space), so a text of n words is n tokens; `make_pairs` checks this with the tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from reward_server.tiny import WORDS


@dataclass(frozen=True)
class LengthDist:
    """Token lengths of items: uniform integers in [lo, hi]."""

    lo: int
    """Shortest item (tokens)."""
    hi: int
    """Longest item (tokens)."""

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """``"16..256"`` -> uniform 16..256; ``"64"`` -> always 64."""
        lo, _, hi = spec.partition("..")
        return cls(int(lo), int(hi or lo))

    def sample(self, rng: random.Random) -> int:
        """One length."""
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return f"{self.lo}..{self.hi}" if self.hi != self.lo else str(self.lo)


def pair_of_length(n: int, rng: random.Random) -> tuple[str, str]:
    """A (prompt, completion) pair of exactly n tokens: a prompt of about n/4 words, the rest."""
    words = [rng.choice(WORDS) for _ in range(n)]
    k = max(1, n // 4) if n > 1 else 0
    prompt = " ".join(words[:k])
    completion = (" " if k else "") + " ".join(words[k:])
    return prompt, completion


def make_pairs(
    n: int, dist: LengthDist, seed: int = 0, tokenizer=None
) -> tuple[list[tuple[str, str]], list[int]]:
    """n pairs with lengths drawn from `dist`; with a tokenizer, lengths are measured and returned."""
    rng = random.Random(seed)
    lengths = [dist.sample(rng) for _ in range(n)]
    pairs = [pair_of_length(k, rng) for k in lengths]
    if tokenizer is not None:
        ids = tokenizer([p + c for p, c in pairs])["input_ids"]
        lengths = [len(x) for x in ids]
    return pairs, lengths


@dataclass(frozen=True)
class RequestShape:
    """Items per request: uniform integers in [lo, hi]."""

    lo: int
    """Fewest items per request."""
    hi: int
    """Most items per request."""

    @classmethod
    def parse(cls, spec: str) -> RequestShape:
        """``"1..8"`` or ``"1"``."""
        lo, _, hi = spec.partition("..")
        return cls(int(lo), int(hi or lo))

    def __str__(self) -> str:
        return f"{self.lo}..{self.hi}" if self.hi != self.lo else str(self.lo)
