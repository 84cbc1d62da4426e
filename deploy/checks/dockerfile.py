"""A small Dockerfile parser: stages, instructions, effective ENTRYPOINT/CMD, copied files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import DOCKER_DIR, REPO


@dataclass
class Instruction:
    """One Dockerfile instruction (continuation lines joined)."""

    keyword: str
    """Upper-case instruction name, e.g. ``RUN``."""
    value: str
    """Everything after the keyword."""
    line: int
    """1-based line of the instruction's first line."""


@dataclass
class Stage:
    """One build stage of a Dockerfile."""

    name: str | None
    """The ``AS`` name, or None."""
    base: str
    """The ``FROM`` image with global ``ARG`` defaults substituted."""
    instructions: list[Instruction] = field(default_factory=list)
    """The stage's instructions after FROM, in order."""

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction of this kind in the stage, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        """The stage's last instruction of this kind (the one in effect), if any."""
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfiles() -> list[Path]:
    """The project's Dockerfiles."""
    return sorted(DOCKER_DIR.glob("*.Dockerfile"))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and drop comments, as the Dockerfile frontend does."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(b for b in buf if b)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Parse a Dockerfile into its stages (global ARG defaults substituted into FROM)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, value = text.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            parts = [p for p in value.split() if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=_substitute(parts[0], global_args)))
        elif not stages and keyword == "ARG":
            key, _, default = value.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, value, line))
    return stages


def exec_form(value: str) -> list[str]:
    """An ENTRYPOINT/CMD/HEALTHCHECK CMD value as an argv (shell form runs under /bin/sh -c)."""
    value = value.strip()
    if value.startswith("["):
        argv = json.loads(value)
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise ValueError(f"not a JSON string array: {value}")
        return argv
    return ["/bin/sh", "-c", value]


def healthcheck_argv(instruction: Instruction) -> list[str] | None:
    """The command of a ``HEALTHCHECK [options] CMD ...`` instruction (None for ``NONE``)."""
    if instruction.value.strip().upper() == "NONE":
        return None
    match = re.match(r"^((?:--\S+\s+)*)CMD\s+(.*)$", instruction.value, re.S)
    if not match:
        raise ValueError(f"line {instruction.line}: cannot parse HEALTHCHECK {instruction.value}")
    return exec_form(match.group(2))


def healthcheck_options(instruction: Instruction) -> dict[str, str]:
    """The ``--interval=...`` style options of a HEALTHCHECK instruction."""
    return dict(re.findall(r"--([\w-]+)=(\S+)", instruction.value.split(" CMD ", 1)[0]))


def parent_stage(stages: list[Stage], stage: Stage) -> Stage | None:
    """The earlier stage a stage is built ``FROM``, if it is one."""
    for s in stages:
        if s is stage:
            return None
        if s.name and s.name == stage.base:
            return s
    return None


def stage_entrypoint_cmd(stages: list[Stage], stage: Stage) -> tuple[list[str], list[str]]:
    """A stage's effective ENTRYPOINT and CMD, inherited through ``FROM <earlier stage>``."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    parent = parent_stage(stages, stage)
    if parent is not None:
        entrypoint, cmd = stage_entrypoint_cmd(stages, parent)
    for ins in stage.instructions:
        if ins.keyword == "ENTRYPOINT":
            entrypoint, cmd = exec_form(ins.value), []  # a new ENTRYPOINT resets CMD
        elif ins.keyword == "CMD":
            cmd = exec_form(ins.value)
    return entrypoint, cmd


def stage_files(stages: list[Stage], stage: Stage) -> dict[str, str]:
    """Repository files a stage copies to an absolute path: container path -> content."""
    parent = parent_stage(stages, stage)
    files = stage_files(stages, parent) if parent is not None else {}
    for ins in stage.all("COPY") + stage.all("ADD"):
        if "--from" in ins.value or ins.value.lstrip().startswith("["):
            continue
        *sources, dest = [p for p in ins.value.split() if not p.startswith("--")]
        if len(sources) == 1 and dest.startswith("/") and not dest.endswith("/"):
            src = REPO / sources[0]
            if src.is_file():
                files[dest] = src.read_text()
    return files


def target_stage(stages: list[Stage], target: str | None) -> Stage:
    """The stage ``docker build --target`` builds (the last one without a target)."""
    if target is None:
        return stages[-1]
    for stage in stages:
        if stage.name == target:
            return stage
    raise KeyError(f"no stage named {target!r}")
