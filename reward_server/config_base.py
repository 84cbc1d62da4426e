"""One configuration mechanism for every command: typed dataclasses, one file loader, flags.

A config is a dataclass. Each field carries a docstring (the string literal right after it), a
type annotation (``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` choices, ``list[str]``,
``dict[str, str]``, ``X | None``) and a default; a field whose type is itself a dataclass is a
nested section (``ppo.lr``). From that one declaration come:

- `load_config`: a YAML or JSON file, then overrides, each key and value checked against the
  annotations (an unknown key names the closest valid one), then the class's own ``validate()``
  (ranges and cross-field rules only);
- `add_config_flags`: one argparse flag per field (``max_batch_tokens`` -> ``--max-batch-tokens``,
  ``ppo.lr`` -> ``--ppo.lr``), its help the field's docstring and default.

Precedence: the dataclass defaults < the file < the flags actually given. Generated flags default
to ``argparse.SUPPRESS``, so `flag_overrides` holds only what the command line said.

This module imports only the standard library and PyYAML: the CLIs import it before anything
heavy, and the light client install (no torch, no transformers) has it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import json
import math
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

FLAG_DEST = "config:"
"""Prefix of the argparse dest of every generated flag (``config:ppo.lr``), so that options of a
host parser never mix with config keys."""

PRECEDENCE_NOTE = (
    "Every option is also a key of the --config file (underscored: --max-wait-ms is max_wait_ms; "
    "in a section, --ppo.kl-coef is kl_coef under ppo); flags override the file, which overrides "
    "the defaults."
)
"""The sentence each command's ``--help`` description ends with."""

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_INT = re.compile(r"^[-+]?\d+$")


class ConfigError(ValueError):
    """A configuration file, key or value that cannot be used. The message names the key, and the
    file when the value came from one; so do the attributes ``key`` (dotted inside sections) and
    ``file`` (None for flags, overrides and cross-field rules)."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.file = file


def require(condition: bool, message: str, key: str | None = None) -> None:
    """Raise ConfigError(message) unless ``condition`` (for the ``validate()`` of a config)."""
    if not condition:
        raise ConfigError(message, key=key)


# ----------------------------------------------------------------------------- introspection


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of dataclass ``cls`` (whitespace collapsed), read once from its
    source with `ast`; fields without one are absent."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    try:
        tree = ast.parse(Path(path).read_text()) if path else None
    except (OSError, SyntaxError):
        tree = None
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            docs = {}
            for field, doc in zip(node.body, node.body[1:], strict=False):
                if (
                    isinstance(field, ast.AnnAssign)
                    and isinstance(field.target, ast.Name)
                    and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)
                ):
                    docs[field.target.id] = " ".join(doc.value.value.split())
            return docs
    return {}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a config in field order, dotted inside nested sections (``ppo.lr``)."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        keys += config_keys(tp, f"{prefix}{f.name}.") if _is_section(tp) else [prefix + f.name]
    return keys


# ----------------------------------------------------------------------------- values


class _Mismatch(Exception):
    """A value does not fit an annotation (turned into a ConfigError naming the key)."""


def _union_arms(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else None


def describe(tp: Any) -> str:
    """What an annotation accepts, in words (``one of a, b``, ``a number or null``)."""
    arms = _union_arms(tp)
    if arms:
        return " or ".join(describe(a) for a in arms)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list (or comma-separated string) of strings"
    if origin is dict:
        return "a mapping of name -> value"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return "null" if tp is type(None) else names.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    arms = _union_arms(tp)
    if arms:
        for arm in arms:
            try:
                return _coerce(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
    elif origin is list:
        if isinstance(value, str):  # "a,b" on the command line or in a file
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    elif origin is dict:
        scalar = (str, int, float, bool)
        if isinstance(value, Mapping) and all(isinstance(v, scalar) for v in value.values()):
            return {str(k): str(v) for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "3e-6" (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config fields of type {tp!r} are not supported")
    raise _Mismatch


def check_value(value: Any, tp: Any, key: str, file: str | None = None) -> Any:
    """``value`` checked against annotation ``tp`` (int -> float, "3e-6" -> float and "a,b" ->
    list are the only conversions); a ConfigError ``KEY must be ..., got VALUE`` otherwise."""
    try:
        return _coerce(value, tp)
    except _Mismatch:
        where = f"{file}: " if file else ""
        raise ConfigError(
            f"{where}{key} must be {describe(tp)}, got {value!r}", key=key, file=file
        ) from None


# ----------------------------------------------------------------------------- loading


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (or ``.json``) file; ConfigError when missing, malformed or not a
    mapping."""
    p, file = Path(path), str(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {file}", file=file)
    is_json = p.suffix.lower() == ".json"
    try:
        data = json.loads(p.read_text()) if is_json else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if is_json else "YAML"
        raise ConfigError(f"{file}: not valid {kind}: {e}", file=file) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level", file=file)
    return data or {}


def _unknown_key(key: str, root: type, section: type, file: str | None) -> ConfigError:
    sections = [k.rsplit(".", 1)[0] for k in config_keys(root) if "." in k]
    close = difflib.get_close_matches(key, config_keys(root) + sections, n=1, cutoff=0.6)
    where = f" in {file}" if file else ""
    hint = (
        f"did you mean {close[0]!r}?"
        if close
        else "valid keys: " + ", ".join(f.name for f in dataclasses.fields(section))
    )
    return ConfigError(f"unknown key {key!r}{where}; {hint}", key=key, file=file)


def _checked(
    cls: type, data: Any, file: str | None, root: type, prefix: str = ""
) -> dict[str, Any]:
    """Keys normalised (hyphens -> underscores) and every value checked, sections recursed."""
    if not isinstance(data, Mapping):
        key = prefix.rstrip(".") or "config"
        where = f"{file}: " if file else ""
        raise ConfigError(f"{where}{key} must be a mapping, got {data!r}", key=key, file=file)
    hints, out = _hints(cls), {}
    for raw_key, value in data.items():
        name = str(raw_key).replace("-", "_")
        key = prefix + name
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(key, root, cls, file)
        tp = hints[name]
        if _is_section(tp):
            out[name] = _checked(tp, {} if value is None else value, file, root, key + ".")
        else:
            out[name] = check_value(value, tp, key, file)
    return out


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"ppo.lr": x}`` -> ``{"ppo": {"lr": x}}`` (nested mappings are kept as they are)."""
    out: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *sections, leaf = dotted.split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is not a section", key=dotted)
        node[leaf] = value
    return out


def _merge(cls: type, base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``: sections merge key by key, and so do mapping fields (a flag adds a
    model to those of the file); any other value is replaced."""
    out = dict(base)
    for name, value in new.items():
        tp, old = _hints(cls)[name], base.get(name)
        if _is_section(tp):
            out[name] = _merge(tp, old or {}, value)
        elif isinstance(old, dict) and isinstance(value, dict):
            out[name] = {**old, **value}
        else:
            out[name] = value
    return out


def _build(cls: type[T], data: dict[str, Any]) -> T:
    hints = _hints(cls)
    return cls(**{n: _build(hints[n], v) if _is_section(hints[n]) else v for n, v in data.items()})


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> T:
    """A validated ``cls``: its defaults, then the file at ``path`` (YAML, or JSON for ``.json``),
    then ``overrides`` (keys dotted or nested: ``{"ppo.lr": 3e-6}``), then ``cls.validate()``."""
    from_file = _checked(cls, read_config_file(path), str(path), cls) if path else {}
    from_flags = _checked(cls, _nest(overrides or {}), None, cls)
    config = _build(cls, _merge(cls, from_file, from_flags))
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


# ----------------------------------------------------------------------------- flags


def format_default(value: Any) -> str:
    """A default as ``--help`` shows it (YAML spelling: ``true``, ``none``, ``''``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) if value else "{}"
    return str(value) if value != "" else "''"


def flag_name(key: str) -> str:
    """The flag of a key: ``max_batch_tokens`` -> ``--max-batch-tokens``, ``ppo.kl_coef`` ->
    ``--ppo.kl-coef``."""
    return "--" + key.replace("_", "-")


def flag_dest(key: str) -> str:
    """The argparse dest of a key's flag (hand-written flags that set a key use it too)."""
    return FLAG_DEST + key


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys set by flags actually given, as ``{dotted key: value}``."""
    return {k[len(FLAG_DEST) :]: v for k, v in vars(args).items() if k.startswith(FLAG_DEST)}


class _FlagValue:
    """argparse ``type=`` of a generated flag: the text checked like a file value."""

    def __init__(self, key: str, tp: Any) -> None:
        self.key, self.tp = key, tp
        self.optional = type(None) in (_union_arms(tp) or ())

    def __call__(self, text: str) -> Any:
        value: Any = text
        if self.optional and text.strip().lower() in ("none", "null"):
            value = None
        elif _INT.match(text.strip()) and int in (_union_arms(self.tp) or (self.tp,)):
            value = int(text)
        try:
            return check_value(value, self.tp, self.key)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


class _ListAction(argparse.Action):
    """A list flag: comma-separated, repeatable (the values add up); ``none`` for None."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        current = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, None if values is None else [*current, *values])


def add_config_file_flag(
    parser: argparse.ArgumentParser, dest: str = "config", required: bool = False
) -> None:
    """The ``--config FILE`` flag every command shares (a YAML or .json file of its keys)."""
    parser.add_argument(
        "--config",
        dest=dest,
        required=required,
        metavar="YAML",
        help="YAML (or .json) file whose keys are these options' names, underscored; "
        "flags override it, and it overrides the defaults",
    )


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), prefix: str = ""
) -> None:
    """One flag per field of ``cls`` (``--section.key`` inside nested sections), except the keys
    in ``skip`` (their flags are hand-written). Help: the field's docstring and default."""
    docs, hints = field_docs(cls), _hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if key in skip:
            continue
        if _is_section(tp):
            add_config_flags(parser, tp, skip, f"{key}.")
            continue
        text = f"{docs.get(f.name, '')} (default: {format_default(_default(f))})".strip()
        kwargs: dict[str, Any] = {
            "dest": flag_dest(key),
            "default": argparse.SUPPRESS,
            "help": text.replace("%", "%%"),
        }
        base = [a for a in (_union_arms(tp) or (tp,)) if a is not type(None)][0]
        metavar = {int: "N", float: "X"}.get(base, f.name.upper())
        if tp is bool:
            parser.add_argument(flag_name(key), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list and len(_union_arms(tp) or ()) <= 2:
            item = f.name.rsplit("_", 1)[-1].upper()
            kwargs.update(action=_ListAction, metavar=f"{item}[,{item}]")
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["metavar"] = metavar
        parser.add_argument(flag_name(key), type=_FlagValue(key, tp), **kwargs)
