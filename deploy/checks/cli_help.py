"""The CLIs' argparse parsers, read from their ``--help``, and invocations checked against them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .invocations import MODULES, PROGRAMS, Invocation

CLI_MODULES = {"reward-server": "reward_server.cli", "policy-trainer": "policy_trainer.cli"}
"""The module behind each project CLI."""


@dataclass(frozen=True)
class Option:
    """One option of an argparse parser, as its --help shows it."""

    takes_value: bool
    """Whether the option consumes the next token (it shows a metavar)."""
    choices: frozenset[str] | None
    """The allowed values when the metavar is ``{a,b,c}``."""


@dataclass
class HelpSpec:
    """What an argparse ``--help`` says about a parser."""

    options: dict[str, Option]
    """Every option string (``--port``, ``-h``) and its shape."""
    subcommands: frozenset[str]
    """The sub-parsers, from a ``{a,b}`` positional in the usage line."""
    positionals: tuple[str, ...]
    """Names of the other positional arguments (``positional arguments:`` section)."""


def parse_help(text: str) -> HelpSpec:
    """Parse argparse help output (printed wide enough that no option line wraps)."""
    options: dict[str, Option] = {}
    for line in text.splitlines():
        m = re.match(r"^ {2}(-\S.*)$", line)
        if not m:
            continue
        invocation = re.split(r"\s{2,}", m.group(1).strip(), maxsplit=1)[0]
        for part in invocation.split(", "):
            flag, _, metavar = part.partition(" ")
            cm = re.fullmatch(r"\{([^}]*)\}", metavar.strip())
            choices = frozenset(cm.group(1).split(",")) if cm else None
            options[flag] = Option(takes_value=bool(metavar.strip()), choices=choices)
    usage = text.split("\n\n", 1)[0]
    sm = re.search(r"\{([\w,-]+)\}\s*\.\.\.", usage)
    subcommands = frozenset(sm.group(1).split(",")) if sm else frozenset()
    positionals: list[str] = []
    section = re.search(r"^positional arguments:\n((?: .*\n?)*)", text, re.M)
    for line in section.group(1).splitlines() if section else []:
        pm = re.match(r"^ {2}([^\s{-]\S*)", line)
        if pm:
            positionals.append(pm.group(1))
    return HelpSpec(options, subcommands, tuple(positionals))


def _program_argv(program: str) -> list[str]:
    script = Path(sys.executable).parent / program
    if script.exists():
        return [str(script)]
    if program == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run"]
    return [sys.executable, "-m", CLI_MODULES[program]]


_HELP_CACHE: dict[tuple[str, ...], HelpSpec] = {}


def help_spec(program: str, *subcommand: str) -> HelpSpec:
    """Run ``program [subcommand] --help`` and parse it (cached per process)."""
    key = (program, *subcommand)
    if key not in _HELP_CACHE:
        env = dict(os.environ, COLUMNS="1000", HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [*_program_argv(program), *subcommand, "--help"],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(key)} --help failed ({proc.returncode}):\n{proc.stderr}")
        _HELP_CACHE[key] = parse_help(proc.stdout)
    return _HELP_CACHE[key]


def _is_placeholder(value: str) -> bool:
    return "$(" in value or "${" in value


def check_args(
    args: list[str], spec: HelpSpec, what: str, stop_at_positional: bool = False
) -> tuple[list[str], list[str]]:
    """Check options against a spec; returns (errors, positionals in order).

    With ``stop_at_positional`` (torchrun) everything from the first positional on is returned
    unchecked: it is the launched script and its own arguments.
    """
    errors: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            positionals += args[i + 1 :]
            break
        if not token.startswith("-") or token == "-":
            if stop_at_positional:
                positionals += args[i:]
                break
            positionals.append(token)
            i += 1
            continue
        flag, eq, inline = token.partition("=")
        option = spec.options.get(flag)
        i += 1
        if option is None:
            errors.append(f"{what}: unknown option {flag}")
            continue
        value = None
        if option.takes_value and eq:
            value = inline
        elif option.takes_value and i < len(args):
            value, i = args[i], i + 1
        elif option.takes_value:
            errors.append(f"{what}: {flag} needs a value")
        elif eq:
            errors.append(f"{what}: {flag} takes no value")
        bad_choice = option.choices and value is not None and value not in option.choices
        if bad_choice and not _is_placeholder(value):
            errors.append(f"{what}: {flag} {value!r} not in {sorted(option.choices)}")
    return errors, positionals


def check_invocation(inv: Invocation) -> tuple[list[str], list[Invocation]]:
    """Check one invocation against its CLI; returns (errors, nested invocations to check).

    A torchrun invocation is checked against torchrun's own options; the module it launches
    (``-m policy_trainer.cli ...``) comes back as a nested invocation.
    """
    what = f"{inv.where}: {inv.program} {' '.join(inv.args)}"
    if inv.program == "torchrun":
        spec = help_spec("torchrun")
        errors, rest = check_args(inv.args, spec, what, stop_at_positional=True)
        launcher = inv.args[: len(inv.args) - len(rest)]
        as_module = any(a in ("-m", "--module") for a in launcher)
        if not rest:
            return [*errors, f"{what}: no training script"], []
        nested_where = inv.where + " (under torchrun)"
        if as_module and rest[0] in MODULES:
            return errors, [Invocation(MODULES[rest[0]], rest[1:], nested_where, inv.files)]
        if Path(rest[0]).name in PROGRAMS:
            return errors, [
                Invocation(PROGRAMS[Path(rest[0]).name], rest[1:], nested_where, inv.files)
            ]
        return [*errors, f"{what}: launches {rest[0]!r}, not a project CLI"], []
    top = help_spec(inv.program)
    sub = inv.subcommand
    if sub is None:
        errors, positionals = check_args(inv.args, top, what)
        return errors + [f"{what}: unexpected {p!r}" for p in positionals], []
    if top.subcommands and sub not in top.subcommands:
        return [f"{what}: unknown subcommand {sub!r} (have {sorted(top.subcommands)})"], []
    spec = help_spec(inv.program, sub)
    errors, positionals = check_args(inv.args[1:], spec, what)
    if positionals and not spec.positionals:
        errors += [f"{what}: unexpected positional {p!r}" for p in positionals]
    return errors, []


def expand(invocations: list[Invocation]) -> tuple[list[Invocation], list[str]]:
    """Check invocations, following torchrun into what it launches.

    Returns every invocation (nested ones included) and the errors of the ones whose CLI exists.
    """
    from importlib.util import find_spec

    pending = list(invocations)
    seen: list[Invocation] = []
    errors: list[str] = []
    while pending:
        inv = pending.pop(0)
        seen.append(inv)
        module = CLI_MODULES.get(inv.program)
        if module and find_spec(module) is None:
            continue
        errs, nested = check_invocation(inv)
        errors += errs
        pending += nested
    return seen, errors
