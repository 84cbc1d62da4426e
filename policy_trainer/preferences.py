"""Preference data for DPO, tokenized for the policy: the record shapes `reward-server train`
reads (docs/TRAINING.md, "Data formats"), split into prompt and response token ids.

- pairs: ``{"prompt": str, "chosen": str, "rejected": str}``;
- conversations: ``{"chosen": [messages], "rejected": [messages], "prompt"?: [messages]}``, the
  two sides differing only in their last (assistant) message;
- rankings: ``{"prompt": str, "responses": [str, ...], "ranking": [best index, ...]}``, which
  becomes all K choose 2 (better, worse) pairs (InstructGPT, Ouyang et al. 2022, section 3.5).

Plain prompts are tokenized as the PPO trainer tokenizes them (``add_special_tokens=True``); a
response is its own tokens (no special tokens added) followed by EOS, so the policy learns to end
(as TRL's DPOTrainer appends EOS to the completion). Conversations are rendered with the policy's
chat template: the prompt with a generation prompt, the response is what the whole conversation
adds to it. The trainer reads the files itself (the reward-model trainer's reader renders whole
texts for a reward model and belongs to the server side).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_trainer.config import ConfigError


class RecordError(ValueError):
    """One record is malformed (the message says which field and why)."""


@dataclass
class PreferencePair:
    """One (prompt, chosen, rejected) triple in policy token ids."""

    prompt_ids: list[int]
    """Prompt tokens (the last max_prompt_tokens kept)."""
    chosen_ids: list[int]
    """Preferred response tokens (EOS at the end unless cut at max_response_tokens)."""
    rejected_ids: list[int]
    """Dispreferred response tokens."""
    prompt: str
    """The prompt text (plain prompts) or the rendered chat prompt."""
    location: str
    """``path:LINE`` or ``path[row N]`` of the record."""


def read_records(path: str, split: str = "train") -> list[tuple[str, Any]]:
    """(location, record) of every record of a JSONL / JSON array / Parquet file or a `datasets`
    directory; a JSON line that does not parse comes back as a `RecordError`."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data.preferences: {path} does not exist")
    if p.is_dir():
        try:
            import datasets  # optional dependency
        except ImportError:
            raise ConfigError(
                f"data.preferences: {p} is a directory but `datasets` is not installed"
            ) from None
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"data.split: {split!r} not in {sorted(ds)}")
            ds = ds[split]
        return [(f"{p}[row {i}]", rec) for i, rec in enumerate(ds)]
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return [(f"{p}[row {i}]", r) for i, r in enumerate(pq.read_table(p).to_pylist())]
    if suffix not in (".jsonl", ".json"):
        raise ConfigError(f"data.preferences: {p}: expected .jsonl, .json, .parquet or a directory")
    text = p.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{p}[row {i}]", r) for i, r in enumerate(json.loads(text))]
        except ValueError as e:
            raise ConfigError(f"{p}: not a valid JSON array: {e}") from None
    out: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{p}:{lineno}", json.loads(line)))
            except ValueError as e:
                out.append((f"{p}:{lineno}", RecordError(f"not valid JSON: {e}")))
    return out


def _text(rec: dict[str, Any], name: str, allow_empty: bool = False) -> str:
    value = rec.get(name)
    if value is None:
        raise RecordError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {name!r} is empty")
    return value


def _messages(rec: dict[str, Any], name: str) -> list[dict[str, str]]:
    value = rec.get(name)
    if value is None:
        raise RecordError(f"missing field {name!r}")
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RecordError(f"field {name!r}: message {i} needs a 'role' string")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"field {name!r}: message {i} needs a 'content' string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def ranking_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """All K choose 2 (better, worse) index pairs of a best-first ranking."""
    return [
        (ranking[a], ranking[b]) for a in range(len(ranking)) for b in range(a + 1, len(ranking))
    ]


def _check_ranking(responses: Any, ranking: Any) -> None:
    if not isinstance(responses, list) or len(responses) < 2:
        raise RecordError("field 'responses' must be a list of at least 2 responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise RecordError(f"responses[{i}] must be a non-empty string")
    if not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses))):
        raise RecordError(
            f"field 'ranking' must list each response index 0..{len(responses) - 1} once"
        )


class PreferenceTokenizer:
    """Turns records into `PreferencePair`s with the policy tokenizer."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int, max_response_tokens: int):
        self.tok = tokenizer
        self.max_prompt, self.max_response = max_prompt_tokens, max_response_tokens

    def _prompt(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def _response(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids + [int(self.tok.eos_token_id)]

    def _pair(self, prompt_ids: list[int], a: list[int], b: list[int], prompt: str, loc: str):
        if not prompt_ids:
            prompt_ids = [int(self.tok.bos_token_id or self.tok.eos_token_id)]
        return PreferencePair(
            prompt_ids[-self.max_prompt :],
            a[: self.max_response],
            b[: self.max_response],
            prompt,
            loc,
        )

    def _chat(
        self, prefix: list[dict[str, str]], reply: dict[str, str]
    ) -> tuple[list[int], list[int]]:
        tok = self.tok
        prompt_text = tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
        full_text = tok.apply_chat_template([*prefix, reply], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise RecordError("the chat template does not render the reply after the prompt")
        prompt_ids = list(tok(prompt_text, add_special_tokens=False)["input_ids"])
        response = list(tok(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
        return prompt_ids, response + [int(tok.eos_token_id)]

    def parse(self, rec: Any, location: str = "") -> list[PreferencePair]:
        """The pairs of one record; raises RecordError."""
        if isinstance(rec, Exception):
            raise rec
        if not isinstance(rec, dict):
            raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
        if "responses" in rec or "ranking" in rec:
            prompt = _text(rec, "prompt", allow_empty=True)
            responses, ranking = rec.get("responses"), rec.get("ranking")
            _check_ranking(responses, ranking)
            ids = [self._response(r) for r in responses]
            p = self._prompt(prompt)
            return [
                self._pair(p, ids[w], ids[lo], prompt, location) for w, lo in ranking_pairs(ranking)
            ]
        if isinstance(rec.get("chosen"), list) or isinstance(rec.get("rejected"), list):
            chosen, rejected = _messages(rec, "chosen"), _messages(rec, "rejected")
            prefix = _messages(rec, "prompt") if rec.get("prompt") is not None else []
            if chosen[:-1] != rejected[:-1]:
                raise RecordError("'chosen' and 'rejected' must differ only in the last message")
            if chosen == rejected:
                raise RecordError("'chosen' and 'rejected' are identical")
            if getattr(self.tok, "chat_template", None) is None:
                raise RecordError("conversations need a policy tokenizer with a chat template")
            context = prefix + chosen[:-1]
            p, a = self._chat(context, chosen[-1])
            _, b = self._chat(context, rejected[-1])
            text = self.tok.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
            return [self._pair(p, a, b, text, location)]
        prompt = _text(rec, "prompt", allow_empty=True)
        chosen_t, rejected_t = _text(rec, "chosen"), _text(rec, "rejected")
        if chosen_t == rejected_t:
            raise RecordError("'chosen' and 'rejected' are identical")
        p = self._prompt(prompt)
        return [
            self._pair(p, self._response(chosen_t), self._response(rejected_t), prompt, location)
        ]


def load_preference_pairs(
    paths: str | list[str],
    tokenizer: Any,
    max_prompt_tokens: int,
    max_response_tokens: int,
    *,
    split: str = "train",
    on_error: str = "stop",
) -> tuple[list[PreferencePair], list[str]]:
    """Every pair of every record of ``paths``; returns (pairs, skipped ``location: reason``).
    A malformed record is a ConfigError naming its place (``on_error="stop"``) or is skipped."""
    parser = PreferenceTokenizer(tokenizer, max_prompt_tokens, max_response_tokens)
    pairs: list[PreferencePair] = []
    skipped: list[str] = []
    for path in [paths] if isinstance(paths, str) else paths:
        for location, rec in read_records(path, split):
            try:
                pairs += parser.parse(rec, location)
            except RecordError as e:
                if on_error == "stop":
                    raise ConfigError(
                        f"malformed record at {location}: {e} (data.on_error=skip skips such records)"
                    ) from None
                skipped.append(f"{location}: {e}")
    if not pairs:
        raise ConfigError(f"data.preferences: no usable preference records in {paths}")
    return pairs, skipped
