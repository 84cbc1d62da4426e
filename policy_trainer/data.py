"""Prompt loading (JSONL, Parquet, a `datasets` dataset on disk, or an inline list) and a
deterministic, resumable sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policy_trainer.config import ConfigError, DataConfig


@dataclass
class Prompt:
    """One prompt, tokenized for the policy."""

    text: str
    """The prompt as the reward model receives it (plain prompts); for chat prompts the rendered
    policy-side text (for logs only)."""
    token_ids: list[int]
    """Policy token ids (already truncated to data.max_prompt_tokens, left side dropped)."""
    messages: list[dict[str, str]] | None = None
    """Chat messages when the prompt is a conversation (scored with the reward model's template)."""


def _read_records(cfg: DataConfig) -> list[dict[str, Any]]:
    src = cfg.prompts
    if isinstance(src, list):
        return [{cfg.prompt_key: s} for s in src]
    path = Path(src)
    if not path.exists():
        raise ConfigError(f"data.prompts: {path} does not exist")
    if path.is_dir():
        try:
            import datasets  # optional dependency
        except ImportError:
            raise ConfigError(
                f"data.prompts: {path} is a directory (a `datasets` dataset?) but the `datasets` "
                "package is not installed; pip install datasets, or export to JSONL/Parquet"
            ) from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ConfigError(f"data.split: {cfg.split!r} not in {sorted(ds)}")
            ds = ds[cfg.split]
        return list(ds)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if isinstance(rec, str):
                rec = {cfg.prompt_key: rec}
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{lineno}: expected an object or a string")
            records.append(rec)
        return records
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ConfigError(
        f"data.prompts: {path}: expected .jsonl, .json, .parquet or a dataset directory"
    )


def load_prompts(cfg: DataConfig, tokenizer: Any) -> list[Prompt]:
    """Read and tokenize every prompt; an empty or malformed one is a ConfigError naming it."""
    records = _read_records(cfg)
    if not records:
        raise ConfigError(
            f"data.prompts: no prompts in {cfg.prompts if isinstance(cfg.prompts, str) else 'the list'}"
        )
    prompts = []
    for i, rec in enumerate(records):
        messages = rec.get(cfg.messages_key)
        if messages:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise ConfigError(
                    f"prompt {i}: {cfg.messages_key} must be a list of {{role, content}}"
                )
            if getattr(tokenizer, "chat_template", None) is None:
                raise ConfigError(
                    f"prompt {i}: chat messages need a tokenizer with a chat template"
                )
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        else:
            text = rec.get(cfg.prompt_key)
            if not isinstance(text, str):
                raise ConfigError(
                    f"prompt {i}: no {cfg.prompt_key!r} string (nor {cfg.messages_key!r}); keys: "
                    f"{sorted(rec)}"
                )
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            messages = None
        if not ids:
            raise ConfigError(f"prompt {i}: tokenizes to no tokens ({text!r})")
        prompts.append(
            Prompt(text=text, token_ids=list(ids[-cfg.max_prompt_tokens :]), messages=messages)
        )
    return prompts


class PromptSampler:
    """Draws ``per_rank * world_size`` prompt indices per iteration from seeded permutations (one
    per pass over the data); rank r takes the r-th slice. The state is (pass, position)."""

    def __init__(
        self, n: int, per_rank: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1
    ):
        self.n, self.per_rank, self.seed, self.shuffle = n, per_rank, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> list[int]:
        """This rank's prompt indices for the next iteration; advances the state."""
        out: list[int] = []
        order = self._order(self.epoch)
        while len(out) < self.per_rank * self.world_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order(self.epoch)
            out.append(int(order[self.pos]))
            self.pos += 1
        return out[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["n"]) != self.n:
            raise ConfigError(
                f"resume: the checkpoint saw {state['n']} prompts, the data has {self.n}"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
