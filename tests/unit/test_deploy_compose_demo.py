"""The compose demo without containers: the same configs and command lines, on loopback.

compose.yaml runs `reward-server serve` with the image's baked config (deploy/docker/server.yaml)
over tiny checkpoints, then `policy-trainer ppo` with deploy/compose/ppo.yaml against it. Here the
same two configs run as processes, with only the container paths (/models, /runs) and the ports
rewritten, so a config the demo cannot run fails here. Then SIGTERM must drain within the
configured grace period, which the compose stop_grace_period covers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, start_server

pytestmark = pytest.mark.integration

COMPOSE = yaml.safe_load((REPO / "deploy/compose/compose.yaml").read_text())


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    """Replace container path prefixes (``/models/...``) by local directories."""
    if isinstance(value, dict):
        return {k: _rewrite(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    if isinstance(value, str):
        for prefix, local in mapping.items():
            if value == prefix or value.startswith(prefix + "/"):
                return local + value[len(prefix) :]
    return value


def _service_args(name: str, flag: str) -> str:
    command = COMPOSE["services"][name]["command"]
    return command[command.index(flag) + 1]


def test_compose_demo_configs_run_and_drain(tiny_ckpts, tmp_path: Path) -> None:
    # The tiny-models service writes build_tiny_checkpoints('/models'): the fixture's directory.
    tiny_cmd = COMPOSE["services"]["tiny-models"]["command"][0]
    assert "build_tiny_checkpoints('/models')" in tiny_cmd
    paths = {"/models": str(tiny_ckpts.reward.parent), "/runs": str(tmp_path / "runs")}

    server_cfg = yaml.safe_load((REPO / "deploy/docker/server.yaml").read_text())
    assert _service_args("reward-server", "--config") == "/etc/reward-server/server.yaml"
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump(_rewrite(server_cfg, paths)))
    # start_server adds --host 127.0.0.1 --port FREE --device cpu (as the compose command does).
    server = start_server(["--config", str(config)], tmp_path, metrics=True, timeout=120)
    try:
        run_cfg = yaml.safe_load((REPO / "deploy/compose/ppo.yaml").read_text())
        run_config = tmp_path / "ppo.yaml"
        run_config.write_text(yaml.safe_dump(_rewrite(run_cfg, paths)))
        demo_server = _service_args("ppo", "--server")
        assert demo_server.startswith("dns:///")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "policy_trainer.cli",
                "ppo",
                "--config",
                str(run_config),
                "--server",
                f"dns:///127.0.0.1:{server.port}",
                "run.iterations=1",
                "run.progress=false",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        run_dir = Path(_rewrite(run_cfg["run"]["output_dir"], paths))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1
    finally:
        start = time.monotonic()
        code = server.terminate(timeout=60)
        drained_in = time.monotonic() - start
    assert code == 0, server.log()[-4000:]
    stop_grace = COMPOSE["services"]["reward-server"]["stop_grace_period"]
    assert drained_in < float(server_cfg["grace_seconds"]) < float(stop_grace.rstrip("s"))
