"""The import rules of docs/ARCHITECTURE.md ("Who may import whom"), read from the source.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI_MODULES = {"reward_server.cli", "reward_server.training.cli", "policy_trainer.cli"}
# What the client may use of reward_server: itself, the generated API, the pure result type.
CLIENT_MAY_USE = ("reward_server.client", "reward_server.api", "reward_server.score_result")
# What policy_trainer may use of reward_server: the client, the generated API, the shared pieces.
TRAINER_MAY_USE = (
    "reward_server.client",
    "reward_server.api",
    "reward_server.score_result",
    "reward_server.config_base",
    "reward_server.devices",
    "reward_server.tokenizer_loading",
    "reward_server.seeding",
    "reward_server.dropout",
    "reward_server.fingerprint",
    "reward_server.reward_stats",
    "reward_server.local_server",
)
# What the trainer integrations (TRL, veRL) may use of reward_server: the client layer only.
INTEGRATIONS_MAY_USE = ("reward_server.client", "reward_server.api", "reward_server.score_result")
NO_GRPC = (
    "reward_server.engine",
    "reward_server.errors",
    "reward_server.models",
    "reward_server.training",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` imports pkg.module, not all of pkg
                sub = f"{mod}.{a.name}"
                out.add(sub if _is_module(sub) else mod)
    return out


def _sources(*roots: str) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files += [p for p in (REPO / root).rglob("*.py") if "api/rlhf" not in p.as_posix()]
    return sorted(files)


def _under(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


ALL = _sources("reward_server", "policy_trainer")


def test_the_sources_are_found() -> None:
    names = {_module_name(p) for p in ALL}
    assert {
        "reward_server.engine.engine",
        "reward_server.client",
        "reward_server.integrations.trl",
        "policy_trainer.trainer",
    } <= names


@pytest.mark.parametrize(
    "path", [p for p in ALL if _under(_module_name(p), ("reward_server.client",))], ids=_module_name
)
def test_client_imports_no_torch_and_nothing_of_the_server(path: Path) -> None:
    for name in _imports(path):
        assert not _under(name, ("torch", "transformers", "peft", "onnxruntime", "aiohttp")), name
        if name.startswith("reward_server"):
            assert _under(name, CLIENT_MAY_USE), f"{_module_name(path)} imports {name}"


@pytest.mark.parametrize(
    "path",
    [p for p in ALL if _under(_module_name(p), ("reward_server.integrations",))],
    ids=_module_name,
)
def test_integrations_use_only_the_client(path: Path) -> None:
    """They run inside the user's trainer: no torch of ours, no trainer library imported, nothing
    of the server."""
    for name in _imports(path):
        assert not _under(name, ("torch", "transformers", "trl", "verl", "policy_trainer")), name
        if name.startswith("reward_server"):
            assert _under(name, INTEGRATIONS_MAY_USE), f"{_module_name(path)} imports {name}"


@pytest.mark.parametrize("path", _sources("policy_trainer"), ids=_module_name)
def test_trainer_uses_only_the_client_and_the_shared_pieces(path: Path) -> None:
    for name in _imports(path):
        if name.startswith("reward_server"):
            assert _under(name, TRAINER_MAY_USE), f"{_module_name(path)} imports {name}"


@pytest.mark.parametrize(
    "path", [p for p in ALL if _under(_module_name(p), NO_GRPC)], ids=_module_name
)
def test_engine_batcher_and_models_import_no_grpc(path: Path) -> None:
    for name in _imports(path):
        assert not _under(name, ("grpc", "grpc_health", "grpc_reflection")), (
            f"{_module_name(path)} imports {name}"
        )
        assert not _under(name, ("reward_server.serve",)), name


def test_only_the_http_door_imports_aiohttp() -> None:
    users = {_module_name(p) for p in ALL if any(_under(n, ("aiohttp",)) for n in _imports(p))}
    assert users <= {"reward_server.serve.http"}, users


def test_the_batcher_knows_no_tensors() -> None:
    names = _imports(REPO / "reward_server" / "engine" / "batcher.py")
    assert not any(_under(n, ("torch", "numpy", "transformers")) for n in names), names


SHARED = (
    "reward_server.config_base",
    "reward_server.config",
    "reward_server.errors",
    "reward_server.fingerprint",
    "reward_server.model_version",
    "reward_server.score_result",
    "reward_server.reward_stats",
    "reward_server.devices",
    "reward_server.tokenizer_loading",
    "reward_server.seeding",
    "reward_server.dropout",
)


@pytest.mark.parametrize("path", [p for p in ALL if _module_name(p) in SHARED], ids=_module_name)
def test_the_shared_pieces_import_no_serving_layer(path: Path) -> None:
    for name in _imports(path):
        assert not _under(
            name, ("reward_server.serve", "reward_server.engine", "reward_server.models")
        ), f"{_module_name(path)} imports {name}"
        assert not _under(name, ("grpc", "torch", "transformers")) or name in _lazy(path), name


def _lazy(path: Path) -> set[str]:
    """Imports made inside functions (torch and transformers are allowed only there)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    out.add(node.module)
    return out


@pytest.mark.parametrize(
    "path", [p for p in ALL if _module_name(p) not in CLI_MODULES], ids=_module_name
)
def test_nothing_imports_a_cli_module(path: Path) -> None:
    bad = {n for n in _imports(path) if n in CLI_MODULES}
    assert not bad, f"{_module_name(path)} imports {bad}"
