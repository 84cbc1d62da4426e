"""Preference-data reading, validation, ranking decomposition and batching (reward_server.training)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reward_server.models.text_format import render_messages, render_pair
from reward_server.tiny import train_tokenizer
from reward_server.training.batching import collate, tokenize_groups
from reward_server.training.data import (
    DataError,
    RecordError,
    load_completions,
    load_preferences,
    parse_record,
    ranking_pairs,
    split_by_prompt,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def tok_no_template():
    t = train_tokenizer()
    t.chat_template = None
    return t


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIR = {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}
CONV = {
    "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
}
RANK = {"prompt": "Q:", "responses": [" a", " b", " c"], "ranking": [2, 0, 1]}


# ----------------------------------------------------------------------------- ranking pairs
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_ranking_gives_all_k_choose_2_correctly_oriented_pairs(k: int) -> None:
    ranking = list(range(k))
    random.Random(k).shuffle(ranking)
    pairs = ranking_pairs(ranking)
    assert len(pairs) == k * (k - 1) // 2
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # each unordered pair once
    position = {idx: pos for pos, idx in enumerate(ranking)}
    for better, worse in pairs:
        assert position[better] < position[worse]  # better ranked first
    assert {frozenset(p) for p in pairs} == {
        frozenset(c) for c in itertools.combinations(range(k), 2)
    }


def test_ranking_record_is_one_group_and_stays_together_in_a_batch(tok) -> None:
    rec = {"prompt": "P:", "responses": [" w", " x", " y", " z"], "ranking": [3, 1, 0, 2]}
    fmt, group = parse_record(rec, tok)
    assert fmt == "rankings"
    assert group.texts == ["P: w", "P: x", "P: y", "P: z"]  # each response scored once
    assert len(group.pairs) == 6
    assert (
        (3, 1, 0.0) in group.pairs and (0, 2, 0.0) in group.pairs and (1, 3, 0.0) not in group.pairs
    )
    _, pair_group = parse_record(PAIR, tok)
    tokenized, _ = tokenize_groups([pair_group, group, pair_group], tok, 64)
    b = collate(tokenized, tok.pad_token_id)
    assert b.num_groups == 3 and b.input_ids.shape[0] == 2 + 4 + 2
    assert b.group_idx.tolist() == [0] + [1] * 6 + [2]
    # The ranking's pairs point only at its own 4 rows (rows 2..5), oriented as ranked.
    pairs = list(zip(b.chosen_idx.tolist(), b.rejected_idx.tolist(), strict=True))
    in_ranking = [p for p, g in zip(pairs, b.group_idx.tolist(), strict=True) if g == 1]
    assert {row for p in in_ranking for row in p} == {2, 3, 4, 5}
    assert (2 + 3, 2 + 1) in in_ranking and (2 + 1, 2 + 3) not in in_ranking


# ----------------------------------------------------------------------------- formats
def test_pair_rendering_is_plain_concatenation(tok) -> None:
    _, g = parse_record(PAIR, tok)
    assert g.texts == ["Q: sky? A: blue", "Q: sky? A: green"]
    assert g.pairs == [(0, 1, 0.0)]
    assert render_pair(tok, "a", "b") == "ab"  # chat template present, pairs still concatenated


def test_margin_only_used_with_flag(tok) -> None:
    rec = dict(PAIR, margin=2.5)
    assert parse_record(rec, tok)[1].pairs == [(0, 1, 0.0)]
    assert parse_record(rec, tok, margin_from_data=True)[1].pairs == [(0, 1, 2.5)]
    assert parse_record(PAIR, tok, margin_from_data=True)[1].pairs == [(0, 1, 0.0)]


def test_conversation_uses_chat_template_and_shared_prompt(tok) -> None:
    fmt, g = parse_record(CONV, tok)
    assert fmt == "conversations"
    assert g.texts[0] == tok.apply_chat_template(CONV["chosen"], tokenize=False)
    assert g.texts[0] == "<|user|>hi\n<|assistant|>hello\n"
    # Explicit prompt messages (TRL's conversational shape) are prepended.
    rec = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    _, g2 = parse_record(rec, tok)
    assert g2.texts == g.texts
    assert g2.prompt_key == g.prompt_key  # same prompt either way


def test_messages_need_a_chat_template(tok_no_template) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        render_messages(tok_no_template, CONV["chosen"])
    with pytest.raises(RecordError, match="no chat template"):
        parse_record(CONV, tok_no_template)
    assert parse_record(PAIR, tok_no_template)[1].texts[0] == "Q: sky? A: blue"


def test_template_errors_become_record_errors(tmp_path) -> None:
    strict = train_tokenizer()
    # Like Llama 2 / Mistral templates: roles must alternate user/assistant.
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    assert render_messages(strict, CONV["chosen"]) == "[user]hi[assistant]hello"
    bad = {
        "chosen": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}],
        "rejected": CONV["rejected"],
    }
    with pytest.raises(ValueError, match="roles must alternate"):
        render_messages(strict, bad["chosen"])
    path = write_jsonl(tmp_path / "d.jsonl", [CONV, bad])
    groups, report = load_preferences([str(path)], strict, on_error="skip")
    assert len(groups) == 1 and report.skipped[0].startswith(
        f"{path}:2: the chat template rejected"
    )


# ----------------------------------------------------------------------------- malformed data
MALFORMED = [
    # (id, record, message fragment)
    ("missing-rejected", {"prompt": "p", "chosen": " a"}, "missing field 'rejected'"),
    ("missing-prompt", {"chosen": " a", "rejected": " b"}, "missing field 'prompt'"),
    ("null-chosen", {"prompt": "p", "chosen": None, "rejected": " b"}, "missing field 'chosen'"),
    ("missing-ranking", {"prompt": "p", "responses": [" a", " b"]}, "missing field 'ranking'"),
    ("chosen-int", {"prompt": "p", "chosen": 3, "rejected": " b"}, "'chosen' must be a string"),
    ("prompt-list", {"prompt": ["p"], "chosen": " a", "rejected": " b"}, "'prompt' must be a string"),
    ("margin-str", dict(PAIR, margin="big"), "'margin' must be a finite number"),
    ("margin-nan", dict(PAIR, margin=float("nan")), "'margin' must be a finite number"),
    ("not-object", [1, 2], "must be a JSON object"),
    ("responses-str", {"prompt": "p", "responses": "a", "ranking": [0]}, "'responses' must be a list"),
    ("ranking-str", {"prompt": "p", "responses": [" a", " b"], "ranking": ["0", "1"]}, "ranking[0] must be an integer"),
    ("message-no-role", {"chosen": [{"content": "x"}], "rejected": CONV["rejected"]}, "'role' must be a non-empty string"),
    ("messages-dict", {"chosen": CONV["chosen"], "rejected": {"role": "user"}}, "'rejected' must be a list"),
    ("empty-chosen", {"prompt": "p", "chosen": "", "rejected": " b"}, "field 'chosen' is empty"),
    ("blank-rejected", {"prompt": "p", "chosen": " a", "rejected": "  \n"}, "field 'rejected' is empty"),
    ("empty-response-in-ranking", {"prompt": "p", "responses": [" a", ""], "ranking": [0, 1]}, "responses[1] is empty"),
    ("empty-last-message", {"chosen": CONV["chosen"][:1] + [{"role": "assistant", "content": ""}], "rejected": CONV["rejected"]}, "the last message (the response) is empty"),
    ("empty-message-list", {"chosen": [], "rejected": CONV["rejected"]}, "must not be empty"),
    ("identical", {"prompt": "p", "chosen": " a", "rejected": " a"}, "identical"),
    ("ranking-repeated", {"prompt": "p", "responses": [" a", " b", " c"], "ranking": [0, 1, 1]}, "ranking repeats index 1"),
    ("ranking-missing", {"prompt": "p", "responses": [" a", " b", " c"], "ranking": [2, 0]}, "ranking is missing index(es) [1]"),
    ("ranking-out-of-range", {"prompt": "p", "responses": [" a", " b"], "ranking": [0, 2]}, "ranking[1] = 2 is out of range"),
    ("one-response", {"prompt": "p", "responses": [" a"], "ranking": [0]}, "at least 2 responses"),
]  # fmt: skip


@pytest.mark.parametrize("rec,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_record_is_rejected_with_reason(tok, rec, fragment: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_record(rec, tok)
    assert fragment in str(info.value)


@pytest.mark.parametrize("rec,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_line_stop_names_file_and_line_skip_counts_it(
    tok, tmp_path, rec, fragment
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, RANK, rec, CONV])
    # on_error=stop: the whole load fails, naming the file, the line (3) and the reason.
    with pytest.raises(DataError) as info:
        load_preferences([str(path)], tok, on_error="stop")
    msg = str(info.value)
    assert f"{path}:3: " in msg and fragment in msg and "--on-error skip" in msg
    # on_error=skip: the other three records load; the bad one is counted and reported.
    groups, report = load_preferences([str(path)], tok, on_error="skip")
    assert [g.location for g in groups] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert report.records == 3 and report.pairs == 1 + 3 + 1
    assert len(report.skipped) == 1
    assert report.skipped[0].startswith(f"{path}:3: ") and fragment in report.skipped[0]
    assert report.formats == {"pairs": 1, "rankings": 1, "conversations": 1}


def test_invalid_json_and_blank_lines(tok, tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n{not json\n" + json.dumps(PAIR) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        load_preferences([str(path)], tok)
    groups, report = load_preferences([str(path)], tok, on_error="skip")
    assert [g.location for g in groups] == [f"{path}:1", f"{path}:4"]  # blank line 2 ignored
    assert len(report.skipped) == 1


def test_missing_file_unknown_format_and_nothing_usable(tok, tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_preferences([str(tmp_path / "nope.jsonl")], tok)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        load_preferences([str(tmp_path / "d.csv")], tok)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match="no usable preference records"):
        load_preferences([str(bad)], tok, on_error="skip")


# ----------------------------------------------------------------------------- other sources
def test_parquet_and_json_array_rows(tok, tmp_path) -> None:
    rows = [PAIR, dict(PAIR, chosen=" red"), {"prompt": "p", "chosen": " a", "rejected": 5}]
    table = pa.table({k: [r.get(k) for r in rows[:2]] for k in ("prompt", "chosen", "rejected")})
    pq.write_table(table, tmp_path / "d.parquet")
    groups, _ = load_preferences([str(tmp_path / "d.parquet")], tok)
    assert [g.texts[0] for g in groups] == ["Q: sky? A: blue", "Q: sky? A: red"]
    assert groups[1].location == f"{tmp_path / 'd.parquet'}[row 1]"
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"d.json\[row 2\]: field 'rejected' must be a string"):
        load_preferences([str(tmp_path / "d.json")], tok)


def _save_to_disk_layout(directory: Path, records: list[dict]) -> None:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards plus state.json.

    (Checked against datasets 5.2.0: the reader returns the same rows as `load_from_disk`.)
    """
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    shard = str(directory / "data-00000-of-00001.arrow")
    with pa.OSFile(shard, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text("{}")


def test_datasets_directory_and_dataset_dict(tok, tmp_path) -> None:
    _save_to_disk_layout(tmp_path / "ds", [CONV, CONV])
    groups, report = load_preferences([str(tmp_path / "ds")], tok)
    assert report.formats == {"conversations": 2}
    assert groups[1].location == f"{tmp_path / 'ds'}[row 1]"
    dd = tmp_path / "dd"
    _save_to_disk_layout(dd / "train", [PAIR])
    _save_to_disk_layout(dd / "test", [PAIR, PAIR])
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert len(load_preferences([str(dd)], tok)[0]) == 1
    assert len(load_preferences([str(dd)], tok, split="test")[0]) == 2
    with pytest.raises(DataError, match="not 'valid'"):
        load_preferences([str(dd)], tok, split="valid")


def test_completions_for_normalisation(tok, tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": "a", "completion": "b"}, {"messages": CONV["chosen"]}, RANK, {"completion": 1}],
    )
    texts, report = load_completions([str(path)], tok, on_error="skip")
    assert texts == ["ab", "<|user|>hi\n<|assistant|>hello\n", "Q: a", "Q: b", "Q: c"]
    assert len(report.skipped) == 1 and ":4: " in report.skipped[0]


# ----------------------------------------------------------------------------- split
def test_split_keeps_prompts_on_one_side_and_is_deterministic(tok) -> None:
    recs = [{"prompt": f"p{i % 25}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(100)]
    groups = [parse_record(r, tok)[1] for r in recs]
    train, held = split_by_prompt(groups, 0.2, seed=0)
    assert len(train) + len(held) == 100
    assert {g.prompt_key for g in train}.isdisjoint({g.prompt_key for g in held})
    assert len({g.prompt_key for g in held}) == 5
    again = split_by_prompt(groups, 0.2, seed=0)[1]
    assert [g.texts for g in again] == [g.texts for g in held]
    assert [g.texts for g in split_by_prompt(groups, 0.2, seed=1)[1]] != [g.texts for g in held]


def test_text_format_imports_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, reward_server.models.text_format; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
