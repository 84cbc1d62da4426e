"""Preference data: read records from files, validate them, turn them into scored-text groups.

Three record shapes are accepted (detected per record; see docs/TRAINING.md):

- pairs: ``{"prompt": str, "chosen": str, "rejected": str, "margin"?: number}``;
- conversations: ``{"chosen": [messages], "rejected": [messages], "prompt"?: [messages],
  "margin"?: number}`` (Anthropic HH / TRL conversational preference shape);
- rankings: ``{"prompt": str, "responses": [str, ...], "ranking": [int, ...]}`` where ``ranking``
  lists response indices best first; it becomes all K choose 2 pairs, kept together as one group.

Each record becomes one `PreferenceGroup`: the distinct texts the model scores and the pairs
between them. A malformed record raises `RecordError`; `load_preferences` reports it with its file
and line (``path:LINE`` for JSON lines, ``path[row N]`` for tabular rows, N from 0) and then
stops or skips it, as the ``on_error`` setting says, never silently.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from reward_server.models.text_format import check_messages, render_messages, render_pair

T = TypeVar("T")


class RecordError(ValueError):
    """One record is malformed (the message says which field and why)."""


class DataError(ValueError):
    """Data cannot be used: a malformed record with ``on_error=stop``, a missing file, no records."""


@dataclass
class PreferenceGroup:
    """One batch element: the texts to score and the preference pairs between them."""

    texts: list[str]
    """Rendered model inputs (prompt + completion, or a chat-templated conversation)."""
    pairs: list[tuple[int, int, float]]
    """(chosen index, rejected index, margin) into `texts`, chosen preferred."""
    prompt_key: str
    """Identifies the prompt, so a held-out split never shares a prompt with training."""
    location: str
    """Where the record came from (``path:LINE`` or ``path[row N]``)."""


@dataclass
class LoadReport:
    """What loading found: counts per format and every skipped record."""

    records: int = 0
    """Well-formed records read."""
    pairs: int = 0
    """Preference pairs they hold."""
    formats: dict[str, int] = field(default_factory=dict)
    """Records per format (pairs, conversations, rankings)."""
    skipped: list[str] = field(default_factory=list)
    """``location: reason`` of each skipped malformed record."""


# ----------------------------------------------------------------------------- record parsing
def ranking_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """All K choose 2 (better, worse) response-index pairs of a best-first ranking.

    ``ranking`` lists response indices from best to worst, e.g. ``[2, 0, 1]`` means response 2 is
    best. InstructGPT section 3.5 trains on every one of these comparisons.
    """
    return [
        (ranking[a], ranking[b]) for a in range(len(ranking)) for b in range(a + 1, len(ranking))
    ]


def _field(rec: dict[str, Any], name: str) -> Any:
    if name not in rec or rec[name] is None:
        raise RecordError(f"missing field {name!r}")
    return rec[name]


def _text(rec: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = _field(rec, name)
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {name!r} is empty")
    return value


def _margin(rec: dict[str, Any], use: bool) -> float:
    value = rec.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"field 'margin' must be a finite number, got {value!r:.60}")
    return float(value) if use else 0.0


def _messages(rec: dict[str, Any], name: str) -> list[dict[str, str]]:
    value = _field(rec, name)
    if not isinstance(value, list):
        raise RecordError(f"field {name!r} must be a list of messages, got {type(value).__name__}")
    try:
        return check_messages(value)
    except ValueError as e:
        raise RecordError(f"field {name!r}: {e}") from None


def record_format(rec: dict[str, Any]) -> str:
    """The shape of a record: ``rankings``, ``conversations`` or ``pairs``."""
    if "responses" in rec or "ranking" in rec:
        return "rankings"
    if isinstance(rec.get("chosen"), list) or isinstance(rec.get("rejected"), list):
        return "conversations"
    return "pairs"


def parse_record(
    rec: Any, tokenizer: Any, *, location: str = "", margin_from_data: bool = False
) -> tuple[str, PreferenceGroup]:
    """Validate one record and render it; return (format, group). Raises RecordError."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
    fmt = record_format(rec)
    if fmt == "pairs":
        prompt = _text(rec, "prompt", allow_empty=True)
        chosen, rejected = _text(rec, "chosen"), _text(rec, "rejected")
        if chosen == rejected:
            raise RecordError("'chosen' and 'rejected' are identical")
        margin = _margin(rec, margin_from_data)
        texts = [render_pair(tokenizer, prompt, chosen), render_pair(tokenizer, prompt, rejected)]
        return fmt, PreferenceGroup(texts, [(0, 1, margin)], prompt, location)
    if fmt == "conversations":
        chosen_m, rejected_m = _messages(rec, "chosen"), _messages(rec, "rejected")
        for name, msgs in (("chosen", chosen_m), ("rejected", rejected_m)):
            if not msgs[-1]["content"].strip():
                raise RecordError(f"field {name!r}: the last message (the response) is empty")
        prefix: list[dict[str, str]] = []
        if rec.get("prompt") is not None:
            prefix = _messages(rec, "prompt")
        if chosen_m == rejected_m:
            raise RecordError("'chosen' and 'rejected' are identical")
        margin = _margin(rec, margin_from_data)
        try:
            texts = [
                render_messages(tokenizer, prefix + chosen_m),
                render_messages(tokenizer, prefix + rejected_m),
            ]
        except ValueError as e:
            raise RecordError(str(e)) from None
        # Prompt = explicit prompt messages plus the messages both sides share.
        n = 0
        while n < min(len(chosen_m), len(rejected_m)) - 1 and chosen_m[n] == rejected_m[n]:
            n += 1
        key = json.dumps(prefix + chosen_m[:n], sort_keys=True)
        return fmt, PreferenceGroup(texts, [(0, 1, margin)], key, location)
    # rankings
    prompt = _text(rec, "prompt", allow_empty=True)
    responses = _field(rec, "responses")
    ranking = _field(rec, "ranking")
    if not isinstance(responses, list):
        raise RecordError(f"field 'responses' must be a list, got {type(responses).__name__}")
    if not isinstance(ranking, list):
        raise RecordError(f"field 'ranking' must be a list, got {type(ranking).__name__}")
    if len(responses) < 2:
        raise RecordError(f"field 'responses' needs at least 2 responses, got {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise RecordError(f"responses[{i}] must be a string, got {type(r).__name__}")
        if not r.strip():
            raise RecordError(f"responses[{i}] is empty")
    k = len(responses)
    seen: set[int] = set()
    for pos, idx in enumerate(ranking):
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise RecordError(f"ranking[{pos}] must be an integer index, got {idx!r:.40}")
        if not 0 <= idx < k:
            raise RecordError(f"ranking[{pos}] = {idx} is out of range for {k} responses")
        if idx in seen:
            raise RecordError(f"ranking repeats index {idx}; it must list each of 0..{k - 1} once")
        seen.add(idx)
    missing = sorted(set(range(k)) - seen)
    if missing:
        raise RecordError(
            f"ranking is missing index(es) {missing}; it must list each of 0..{k - 1} once"
        )
    texts = [render_pair(tokenizer, prompt, r) for r in responses]
    pairs = [(w, lo, 0.0) for w, lo in ranking_pairs(ranking)]
    return fmt, PreferenceGroup(texts, pairs, prompt, location)


# ----------------------------------------------------------------------------- file reading
def iter_records(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield (location, record) from a file or a `datasets` directory.

    A JSON line that does not parse is yielded as a RecordError in place of the record.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist")
    if p.is_dir():
        yield from _iter_arrow_dir(p, split)
    elif p.suffix == ".parquet":
        yield from _iter_parquet(p)
    elif p.suffix in (".jsonl", ".json"):
        yield from _iter_json(p)
    else:
        raise DataError(
            f"data file {path!r}: unknown format; use .jsonl, .json, .parquet or a directory "
            "written by datasets' save_to_disk"
        )


def _iter_json(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("rb") as f:
        head = f.read(4096).lstrip()
    if p.suffix == ".json" and head.startswith(b"["):
        try:
            items = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not a valid JSON array: {e}") from None
        for i, rec in enumerate(items):
            yield f"{p}[row {i}]", rec
        return
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{p}:{lineno}", json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                yield f"{p}:{lineno}", RecordError(f"not valid JSON: {e}")


def _iter_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{p}: cannot read as Parquet: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{p}[row {row}]", rec
            row += 1


def _iter_arrow_dir(p: Path, split: str) -> Iterator[tuple[str, Any]]:
    """Read a directory written by `datasets`' ``save_to_disk`` (Arrow IPC stream shards)."""
    import pyarrow as pa

    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"{p}: DatasetDict has splits {splits}, not {split!r} (--data-split)")
        p = p / split
    state = p / "state.json"
    if not state.is_file():
        raise DataError(
            f"{p}: a directory must be a `datasets` save_to_disk output (no state.json)"
        )
    files = [d["filename"] for d in json.loads(state.read_text()).get("_data_files", [])]
    row = 0
    for name in files:
        with pa.memory_map(str(p / name)) as src:
            reader = pa.ipc.open_stream(src)
            for batch in reader:
                for rec in batch.to_pylist():
                    yield f"{p}[row {row}]", rec
                    row += 1


# ----------------------------------------------------------------------------- loading
def _parsed(
    paths: list[str],
    split: str,
    on_error: str,
    report: LoadReport,
    parse: Callable[[str, Any], T],
) -> Iterator[T]:
    """``parse(location, record)`` of every record of ``paths``, counted in ``report``; a
    malformed record stops the load (``on_error="stop"``) or is listed in ``report.skipped``."""
    for path in paths:
        for location, rec in iter_records(path, split):
            try:
                if isinstance(rec, Exception):
                    raise rec
                out = parse(location, rec)
            except RecordError as e:
                msg = f"{location}: {e}"
                if on_error == "stop":
                    raise DataError(
                        f"malformed record at {msg} (use --on-error skip to skip such records)"
                    ) from None
                report.skipped.append(msg)
                continue
            report.records += 1
            yield out


def load_preferences(
    paths: list[str],
    tokenizer: Any,
    *,
    on_error: str = "stop",
    margin_from_data: bool = False,
    split: str = "train",
) -> tuple[list[PreferenceGroup], LoadReport]:
    """Read, validate and render every record of ``paths``; one group per record."""
    report = LoadReport()
    groups: list[PreferenceGroup] = []

    def parse(location: str, rec: Any) -> tuple[str, PreferenceGroup]:
        return parse_record(rec, tokenizer, location=location, margin_from_data=margin_from_data)

    for fmt, group in _parsed(paths, split, on_error, report, parse):
        groups.append(group)
        report.pairs += len(group.pairs)
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
    if not groups:
        raise DataError(f"no usable preference records in {paths}")
    return groups, report


def split_by_prompt(
    groups: list[PreferenceGroup], eval_fraction: float, seed: int
) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """Hold out about ``eval_fraction`` of the prompts (whole prompts) for evaluation."""
    keys = sorted({g.prompt_key for g in groups})
    if len(keys) < 2:
        raise DataError("need at least 2 distinct prompts to hold some out; give --eval-data")
    random.Random(seed).shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(eval_fraction * len(keys))))
    held = set(keys[:n_eval])
    train = [g for g in groups if g.prompt_key not in held]
    held_out = [g for g in groups if g.prompt_key in held]
    return train, held_out


def load_completions(
    paths: list[str], tokenizer: Any, *, on_error: str = "stop", split: str = "train"
) -> tuple[list[str], LoadReport]:
    """Reference completions for the normalisation statistics, rendered for the model.

    Accepts ``{"prompt", "completion"}``, ``{"messages"}`` or any preference record (all its
    responses count).
    """
    report = LoadReport()

    def parse(location: str, rec: Any) -> list[str]:
        if isinstance(rec, dict) and "completion" in rec:
            prompt = _text(rec, "prompt", allow_empty=True)
            return [render_pair(tokenizer, prompt, _text(rec, "completion"))]
        if isinstance(rec, dict) and "messages" in rec:
            try:
                return [render_messages(tokenizer, _messages(rec, "messages"))]
            except ValueError as e:
                raise RecordError(str(e)) from None
        return parse_record(rec, tokenizer, location=location)[1].texts

    texts = [t for ts in _parsed(paths, split, on_error, report, parse) for t in ts]
    if not texts:
        raise DataError(f"no usable reference completions in {paths}")
    return texts, report
