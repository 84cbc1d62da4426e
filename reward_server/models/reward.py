"""Reward models: tokenise with the model's own tokenizer, batch, forward, combine heads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reward_server.combine import Combiner, parse_combiner
from reward_server.errors import InvalidArgument
from reward_server.fingerprint import tokenizer_fingerprint
from reward_server.models.loading import load_model, load_tokenizer, max_positions
from reward_server.models.runner import run_with_oom_split
from reward_server.text_format import render_messages, render_pair

log = logging.getLogger(__name__)


@dataclass
class ScoreInput:
    """One item as text: prompt + completion, or chat messages (list of role/content dicts)."""

    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, str]] | None = None


@dataclass
class EncodedItem:
    """One tokenised item, ready for the batcher."""

    input_ids: list[int]
    truncated: bool


class RewardRunner:
    """A loaded reward model (`AutoModelForSequenceClassification`) and its tokenizer."""

    role = "reward"

    def __init__(
        self,
        name: str,
        source: str,
        *,
        device: str,
        dtype: Any,
        adapter: str = "",
        quantization: str = "none",
        trust_remote_code: bool = False,
        max_input_tokens: int = 0,
        head_combine: str = "",
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        self.name, self.source, self.device = name, source, device
        self.tokenizer = tokenizer or load_tokenizer(source, trust_remote_code)
        self.model = model or load_model(
            AutoModelForSequenceClassification,
            source,
            device=device,
            dtype=dtype,
            adapter=adapter,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
        )
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = int(self.model.config.pad_token_id)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.quantization = quantization
        limit = max_positions(self.model, self.tokenizer)
        self.max_len = min(limit, max_input_tokens) if max_input_tokens else limit
        self.heads = self._head_names()
        try:
            self.combiner: Combiner = parse_combiner(
                head_combine or f"head:{self.heads[0]}", self.heads
            )
        except ValueError as exc:
            raise ValueError(f"reward model {name!r}: {exc}") from None
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.normalization = self._normalization()

    # ------------------------------------------------------------------ metadata
    def _head_names(self) -> list[str]:
        n = int(self.model.config.num_labels)
        labels = getattr(self.model.config, "id2label", None) or {}
        names = [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        if n == 1 and names[0] == "LABEL_0":
            return [self.name]
        if len(set(names)) != n:
            return [f"head{i}" for i in range(n)]
        return names

    def _normalization(self) -> tuple[float, float] | None:
        stats = getattr(self.model.config, "reward_normalization", None)
        if not isinstance(stats, dict):
            return None
        try:
            mean, std = float(stats["mean"]), float(stats["std"])
        except (KeyError, TypeError, ValueError):
            log.warning("%s: ignoring malformed reward_normalization %r", self.name, stats)
            return None
        return (mean, std) if std > 0 else None

    # ------------------------------------------------------------------ encoding
    def render(self, items: Sequence[ScoreInput]) -> list[str]:
        """Items to text (`text_format`, shared with training); InvalidArgument names the item."""
        texts = []
        for i, it in enumerate(items):
            if it.messages:
                if not self.has_chat_template:
                    raise InvalidArgument(
                        f"item {i}: model {self.name!r} has no chat template; send prompt and completion instead of messages"
                    )
                for j, m in enumerate(it.messages):
                    if not m.get("content"):
                        raise InvalidArgument(f"item {i}: message {j} has empty content")
                    if not m.get("role"):
                        raise InvalidArgument(f"item {i}: message {j} has an empty role")
                try:
                    texts.append(render_messages(self.tokenizer, it.messages))
                except ValueError as exc:  # the chat template refused the conversation
                    raise InvalidArgument(f"item {i}: {exc}") from None
            else:
                if not it.completion:
                    raise InvalidArgument(
                        f"item {i}: completion is empty (send a non-empty completion, or messages)"
                    )
                texts.append(render_pair(self.tokenizer, it.prompt, it.completion))
        return texts

    def encode(self, items: Sequence[ScoreInput], truncation: str) -> list[EncodedItem]:
        """Tokenise with the model's tokenizer and apply the truncation policy."""
        texts = self.render(items)
        ids_list = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        out = []
        for i, ids in enumerate(ids_list):
            if not ids:
                raise InvalidArgument(f"item {i}: text tokenises to zero tokens")
            truncated = False
            if len(ids) > self.max_len:
                if truncation == "error":
                    raise InvalidArgument(
                        f"item {i}: input is {len(ids)} tokens, over the limit of {self.max_len} "
                        "for model {!r}; shorten it or request truncation LEFT or RIGHT".format(
                            self.name
                        )
                    )
                ids = ids[-self.max_len :] if truncation == "left" else ids[: self.max_len]
                truncated = True
            out.append(EncodedItem(list(ids), truncated))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Sequence[EncodedItem]) -> list[np.ndarray]:
        """Head values [num_heads] per item, float32; OOM splits the batch (runs in the worker)."""
        return run_with_oom_split(self._forward, batch)

    def _forward(self, batch: Sequence[EncodedItem]) -> list[np.ndarray]:
        import torch

        width = max(len(it.input_ids) for it in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for row, it in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
            ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids)
            mask[row, : len(it.input_ids)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits  # [B, H]
        values = logits.float().cpu().numpy()
        return [values[r] for r in range(len(batch))]

    def head_values(self, values: np.ndarray) -> dict[str, float]:
        """Named head values of one item."""
        return {h: float(v) for h, v in zip(self.heads, values, strict=True)}

    def combine(self, values: np.ndarray) -> float:
        """`score` of one item from its head values."""
        return float(self.combiner.apply(self.head_values(values)))

    def normalize(self, score: float) -> float | None:
        """(score - mean) / std with the checkpoint's statistics, when it has them."""
        if self.normalization is None:
            return None
        mean, std = self.normalization
        return (score - mean) / std

    def warmup_items(self, budget_tokens: int, max_items: int) -> list[EncodedItem]:
        """The largest batch the batcher can form, for warm-up."""
        n = max(1, min(max_items, budget_tokens // max(1, min(self.max_len, 64))))
        length = max(1, min(self.max_len, budget_tokens // n))
        tok = 0 if self.pad_id != 0 else 1  # any non-pad token
        return [EncodedItem([tok] * length, False) for _ in range(n)]
