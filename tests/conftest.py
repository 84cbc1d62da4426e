"""Shared fixtures: tiny checkpoints built once per session, and real server processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reward_server.local_server import LocalServer, free_port, start_local_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
ServerProcess = LocalServer
"""A `reward-server serve` subprocess on loopback (the name tests use)."""
__all__ = ["REPO", "ServerProcess", "free_port", "start_server"]


def start_server(
    args: list[str],
    tmp_dir: Path,
    *,
    wait: bool = True,
    timeout: float = 90.0,
    metrics: bool = False,
    env: dict[str, str] | None = None,
    ready_kwargs: dict | None = None,
) -> ServerProcess:
    """Run `reward-server serve --device cpu ARGS` from the repository on a free loopback port
    (log: TMP_DIR/server-PORT.log) and, with `wait`, wait until SERVING; `ready_kwargs` go to the
    client that polls health (TLS, token)."""
    return start_local_server(
        args,
        tmp_dir,
        metrics=metrics,
        env=env,
        cwd=REPO,
        wait=wait,
        timeout=timeout,
        client_kwargs=ready_kwargs,
    )


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory: pytest.TempPathFactory):
    """Tiny reward, 2-head reward and reference checkpoints (built once per session)."""
    from reward_server.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    """Llama-shaped tiny checkpoints whose tokenizer prepends a BOS token (built once)."""
    from reward_server.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny_server(tiny_ckpts, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server with the tiny reward (default), the 2-head reward ("rm2") and the reference."""
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reward-model",
            f"rm2={tiny_ckpts.multihead_reward}",
            "--reference-model",
            str(tiny_ckpts.reference),
            "--max-wait-ms",
            "20",
            "--max-items-per-request",
            "64",
        ],
        tmp_path_factory.mktemp("srv"),
        metrics=True,
    )
    yield sp
    sp.stop()
