"""The light install: `pip install rlhf-reward-service` with no extras, in a fresh virtual
environment (no system site packages), is a working client without torch.

The project is copied to a temporary directory and installed from there like a user would (a
wheel built by pip, not an editable link to this checkout), then the venv's own interpreter and
`reward-server` console script talk to a real server started from the development venv. Their
answers must equal what the development venv's client gets from the same server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import REPO

pytestmark = pytest.mark.integration

HEAVY = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "peft",
    "onnx",
    "onnxruntime",
    "bitsandbytes",
    "matplotlib",
    "pyarrow",
    "prometheus_client",
    "grpc_reflection",
    "psutil",
)
"""Modules of the extras: none may be importable in the light venv."""
PAIRS = [
    ["Is the sun a star?", " Yes, the sun is a star."],
    ["the cat", " sat on the mat and looked at the bird"],
    ["a", " b"],
]
SEQS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [4, 20, 21, 22, 23]]
STARTS = [2, 1, 3]

CLIENT_SCRIPT = """
import json, sys
from reward_server.client import RewardClient

address, pairs, seqs, starts = sys.argv[1], *map(json.loads, sys.argv[2:])
with RewardClient(address) as client:
    scores = [r.score for r in client.score([tuple(p) for p in pairs])]
    logprobs = [lp.tolist() for lp in client.reference_logprobs(seqs, starts)]
heavy = sorted(m for m in ("torch", "transformers", "grpc_reflection") if m in sys.modules)
print(json.dumps({"scores": scores, "logprobs": logprobs, "heavy_loaded": heavy}))
"""


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point the venv at the development tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_INPUT"] = "1"
    return env


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project installed from a copy of this checkout, no extras."""
    root = tmp_path_factory.mktemp("light")
    src = root / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("reward_server", "policy_trainer"):
        shutil.copytree(REPO / package, src / package, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--no-input", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return venv


def _run(venv: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command of the light venv, run outside the checkout (so nothing imports from it)."""
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=venv.parent,
        env=_clean_env(),
    )


def test_the_light_venv_has_the_client_and_nothing_heavy(light_venv: Path) -> None:
    probe = (
        "import importlib.util, json, reward_server.client as c; "
        "import reward_server.integrations.trl, reward_server.integrations.verl; "  # no torch
        f"print(json.dumps([c.__file__, [m for m in {HEAVY!r} if importlib.util.find_spec(m)]]))"
    )
    proc = _run(light_venv, "python", "-c", probe)
    assert proc.returncode == 0, proc.stderr
    client_file, importable = json.loads(proc.stdout)
    assert Path(client_file).is_relative_to(light_venv), client_file  # the installed copy
    assert importable == []
    for module in ("torch", "transformers"):
        failed = _run(light_venv, "python", "-c", f"import {module}")
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr, module


def test_light_client_scores_and_reference_logprobs_equal_the_full_install(
    light_venv: Path, tiny_server
) -> None:
    proc = _run(
        light_venv,
        "python",
        "-c",
        CLIENT_SCRIPT,
        tiny_server.address,
        json.dumps(PAIRS),
        json.dumps(SEQS),
        json.dumps(STARTS),
    )
    assert proc.returncode == 0, proc.stderr
    light = json.loads(proc.stdout)
    assert light["heavy_loaded"] == []
    with RewardClient(tiny_server.address) as client:
        scores = [r.score for r in client.score([tuple(p) for p in PAIRS])]
        logprobs = client.reference_logprobs(SEQS, STARTS)
    assert light["scores"] == scores
    assert len(light["logprobs"]) == len(SEQS)
    for got, want, seq, start in zip(light["logprobs"], logprobs, SEQS, STARTS, strict=True):
        assert len(got) == len(seq) - start
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), want)
        assert all(v < 0 for v in got)


def test_light_console_script_health_score_and_info(
    light_venv: Path, tiny_server, tmp_path: Path
) -> None:
    health = _run(light_venv, "reward-server", "health", "--server", tiny_server.address)
    assert health.returncode == 0, health.stderr
    assert "SERVING" in health.stdout

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    out = tmp_path / "scores.jsonl"
    score = _run(
        light_venv,
        "reward-server",
        "score",
        "--server",
        tiny_server.address,
        "--input",
        str(pairs),
        "--output",
        str(out),
    )
    assert score.returncode == 0, score.stderr
    with RewardClient(tiny_server.address) as client:
        want = [r.score for r in client.score([tuple(p) for p in PAIRS])]
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == want

    info = _run(light_venv, "reward-server", "info", "--server", tiny_server.address)
    assert info.returncode == 0, info.stderr
    assert "rm2" in info.stdout
