"""Tokenise preference groups and collate them into padded tensor batches.

A batch holds whole groups (InstructGPT section 3.5: all pairs of one prompt are one batch element),
flattened into one list of texts; the pairs index into that list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from reward_server.training.data import PreferenceGroup


@dataclass
class TokenizedGroup:
    """A `PreferenceGroup` after tokenisation."""

    input_ids: list[list[int]]
    """Token ids of each text (already truncated to max_length)."""
    pairs: list[tuple[int, int, float]]
    """(chosen, rejected, margin) indices into `input_ids`."""


@dataclass
class Batch:
    """Tensors of one forward: N texts, P pairs in G groups."""

    input_ids: torch.Tensor
    """[N, T] long, right-padded with the pad token."""
    attention_mask: torch.Tensor
    """[N, T] long, 1 on real tokens."""
    chosen_idx: torch.Tensor
    """[P] long, row of the preferred text."""
    rejected_idx: torch.Tensor
    """[P] long, row of the other text."""
    group_idx: torch.Tensor
    """[P] long, the group (batch element) each pair belongs to."""
    margin: torch.Tensor
    """[P] float margins (zeros unless --margin-from-data)."""
    num_groups: int
    """G."""

    def to(self, device: str | torch.device) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.chosen_idx.to(device),
            self.rejected_idx.to(device),
            self.group_idx.to(device),
            self.margin.to(device),
            self.num_groups,
        )


def encode_texts(
    tokenizer: Any, texts: list[str], max_length: int, side: str = "left"
) -> tuple[list[list[int]], int]:
    """Token ids of ``texts`` (the tokenizer's own special tokens added), truncated to
    ``max_length`` on ``side``; returns (ids, number of truncated texts).

    Left truncation keeps the end of the completion, where the reward is read.
    """
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    out: list[list[int]] = []
    truncated = 0
    for seq in ids:
        if len(seq) > max_length:
            truncated += 1
            seq = seq[-max_length:] if side == "left" else seq[:max_length]
        out.append(list(seq))
    return out, truncated


def tokenize_groups(
    groups: list[PreferenceGroup], tokenizer: Any, max_length: int, side: str = "left"
) -> tuple[list[TokenizedGroup], int]:
    """Tokenise every group; returns (groups, number of truncated texts)."""
    flat = [t for g in groups for t in g.texts]
    ids, truncated = encode_texts(tokenizer, flat, max_length, side)
    out: list[TokenizedGroup] = []
    pos = 0
    for g in groups:
        out.append(TokenizedGroup(ids[pos : pos + len(g.texts)], list(g.pairs)))
        pos += len(g.texts)
    return out, truncated


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int) -> list[list[int]]:
    """Split ``range(n)`` into batches of group indices (shuffled with ``seed`` when asked)."""
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(groups: list[TokenizedGroup], pad_token_id: int) -> Batch:
    """Flatten whole groups into one right-padded batch; pairs re-indexed into it."""
    seqs: list[list[int]] = []
    chosen: list[int] = []
    rejected: list[int] = []
    group_of: list[int] = []
    margins: list[float] = []
    for gi, g in enumerate(groups):
        base = len(seqs)
        seqs.extend(g.input_ids)
        for c, r, m in g.pairs:
            chosen.append(base + c)
            rejected.append(base + r)
            group_of.append(gi)
            margins.append(m)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [N, T]
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return Batch(
        input_ids,
        attention_mask,
        torch.tensor(chosen, dtype=torch.long),
        torch.tensor(rejected, dtype=torch.long),
        torch.tensor(group_of, dtype=torch.long),
        torch.tensor(margins, dtype=torch.float32),
        len(groups),
    )
