"""Model versions: a short content hash of a checkpoint, computed at load (docs/API.md, "Model
versions").

What is hashed (format ``v1``), for a local directory (an ONNX export directory the same way):
every regular file under it, symbolic links followed, hidden names (starting with ``.``, e.g.
``.cache``, ``.git``) and directories skipped, sorted by their relative path; for each file its
relative path, its size in bytes and its content: the whole content when the file is at most
`FULL_HASH_BYTES` (64 MiB: configs, tokenizer files, small weights), else its first
`SAMPLE_BYTES` (a safetensors file's header is there: tensor names, dtypes, shapes, offsets),
`SAMPLES` blocks of `SAMPLE_BYTES` at evenly spaced offsets, and its last `SAMPLE_BYTES`. A large
weights file is so read 16 MiB + 128 KiB whatever its size, which keeps hashing a 14 GB
checkpoint under a second. Modification times, owners and permissions are never hashed, so a copy of
a checkpoint has the checkpoint's version. A hub id is hashed as its resolved local snapshot
directory (the cache's files, offline); an id that does not resolve locally is hashed as the
string ``hub:<id>`` (the version then changes only with the id). An adapter directory, when
configured, is hashed the same way and folded in. A combination's version hashes its rule and
each member's name and version.

The wire form is the first 12 hex digits of the SHA-256 (48 bits: two different checkpoints of
one model share a version with odds of about 1 in 10^14). Two large files that differ only
between the sampled blocks would share a version: retraining or fine-tuning changes every
block, but a hand edit of one tensor in a file over 64 MiB may not be seen.

Standard library only: the server, the tests and tools can all compute it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

FORMAT = "v1"
FULL_HASH_BYTES = 64 << 20
"""Files up to this size are hashed in full."""
SAMPLE_BYTES = 64 << 10
"""Size of one sampled block of a larger file."""
SAMPLES = 256
"""Evenly spaced blocks sampled from a larger file (besides its first and last block)."""
WIRE_HEX = 12
"""Hex digits of the version on the wire."""


def _files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under `root`, hidden names skipped."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _hash_file(h: hashlib._Hash, path: Path, size: int) -> None:
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while block := f.read(1 << 20):
                h.update(block)
            return
        offsets = [0] + [(size - SAMPLE_BYTES) * (k + 1) // (SAMPLES + 1) for k in range(SAMPLES)]
        offsets.append(size - SAMPLE_BYTES)
        for off in offsets:
            f.seek(off)
            h.update(f.read(SAMPLE_BYTES))


def _update_dir(h: hashlib._Hash, root: Path) -> None:
    for rel, path in _files(root):
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        _hash_file(h, path, size)


def resolve_source(source: str) -> Path | None:
    """The local directory of a model source: the path itself, or a hub id's cached snapshot
    (offline, never downloading); None when neither exists."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not installed, not cached, not a valid id: unresolved
        return None


def source_version(source: str, adapter: str = "") -> str:
    """The version of the checkpoint at `source` (with its optional `adapter`): 12 hex digits.
    Hashes what the module docstring says; reads at most ~16 MiB of each large file."""
    h = hashlib.sha256(FORMAT.encode() + b"\0")
    for part in (source, adapter):
        if not part:
            continue
        root = resolve_source(part)
        if root is None:
            h.update(f"hub:{part}\0".encode())
        else:
            h.update(b"dir\0")
            _update_dir(h, root)
    return h.hexdigest()[:WIRE_HEX]


def combination_version(rule: str, members: Iterable[tuple[str, str]]) -> str:
    """A combination's version: its rule and each (member name, member version), in order."""
    h = hashlib.sha256(f"{FORMAT}\0combination\0{rule}\0".encode())
    for name, version in members:
        h.update(f"{name}={version}\0".encode())
    return h.hexdigest()[:WIRE_HEX]
