"""What a model version hashes (`reward_server.model_version`): content, names and sizes; not
times; large files by their sampled blocks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reward_server import model_version as mv


def _ckpt(d: Path, weights: bytes) -> Path:
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "tokenizer.json").write_text('{"vocab": {}}')
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_content_decides_not_times_or_location(tmp_path: Path) -> None:
    a = _ckpt(tmp_path / "a", b"x" * 1000)
    v = mv.source_version(str(a))
    assert len(v) == mv.WIRE_HEX and int(v, 16) >= 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", (1, 1))
    (b / ".cache").mkdir()  # hidden: ignored
    (b / ".cache" / "lock").write_text("x")
    assert mv.source_version(str(b)) == v
    (b / "model.safetensors").write_bytes(b"x" * 999 + b"y")  # one byte of the weights
    assert mv.source_version(str(b)) != v
    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "tokenizer.json").write_text('{"vocab": {"a": 0}}')  # the tokenizer
    assert mv.source_version(str(c)) != v
    (c / "tokenizer.json").rename(c / "tokenizer2.json")  # a name
    assert mv.source_version(str(c)) != v
    assert mv.source_version(str(a), adapter=str(c)) != v  # an adapter is folded in


def test_large_files_are_sampled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mv, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(mv, "SAMPLE_BYTES", 16)
    monkeypatch.setattr(mv, "SAMPLES", 8)
    data = bytearray(os.urandom(10_000))
    a = _ckpt(tmp_path / "a", bytes(data))
    v = mv.source_version(str(a))
    data[0] ^= 1  # the header block
    (a / "model.safetensors").write_bytes(bytes(data))
    assert mv.source_version(str(a)) != v
    v = mv.source_version(str(a))
    data[9999] ^= 1  # the last block
    (a / "model.safetensors").write_bytes(bytes(data))
    assert mv.source_version(str(a)) != v


def test_unresolved_hub_id_and_combinations(tmp_path: Path) -> None:
    assert mv.source_version("no-such-org/no-such-model") == mv.source_version(
        "no-such-org/no-such-model"
    )
    assert mv.source_version("no-such-org/x") != mv.source_version("no-such-org/y")
    one = mv.combination_version("min:a,b", [("a", "1"), ("b", "2")])
    assert one != mv.combination_version("min:a,b", [("a", "1"), ("b", "3")])
    assert one != mv.combination_version("mean:a,b", [("a", "1"), ("b", "2")])
