"""ONNX backend end to end: `reward-server export-onnx` (CLI), then `serve --backend onnx` (real
server over gRPC) agrees with the torch backend within 1e-4 on the same inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import REPO, start_server
from tests.helpers import inprocess_scores

pytestmark = pytest.mark.integration

PAIRS = [
    ("the cat", " is good"),
    ("a", " dog ran fast and far away from the big red house on the hill"),
    ("question: what is the sun?", " the sun is a big yellow star"),
    ("", " one two three"),
    ("helpful answer please", " no"),
    ("x", " y"),
]


def export(model_dir, out_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "reward_server.cli",
            "export-onnx",
            "--model",
            str(model_dir),
            "--output",
            str(out_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def onnx_2head(tiny_ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "rm2"
    proc = export(tiny_ckpts.multihead_reward, out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_writes_a_self_contained_directory(onnx_2head):
    names = {p.name for p in onnx_2head.iterdir()}
    assert {"model.onnx", "config.json", "onnx_export.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin", ".pt")) for n in names)
    meta = json.loads((onnx_2head / "onnx_export.json").read_text())
    assert meta["num_labels"] == 2 and meta["parity_max_abs_diff"] <= 1e-4


def test_onnx_server_matches_torch_within_1e_4(onnx_2head, tiny_ckpts, tmp_path):
    expected = inprocess_scores(str(tiny_ckpts.multihead_reward), [p + c for p, c in PAIRS])
    sp = start_server(
        ["--backend", "onnx", "--reward-model", f"rm2={onnx_2head}", "--max-wait-ms", "20"],
        tmp_path,
    )
    try:
        with RewardClient(sp.address) as c:
            together = c.score(PAIRS)
            alone = [c.score([p])[0] for p in PAIRS]
            info = c.server_info()
    finally:
        sp.stop()
    for res in (together, alone):
        got = np.array([[r.head_scores["helpfulness"], r.head_scores["safety"]] for r in res])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_allclose([r.score for r in res], expected[:, 0], atol=1e-4)
    model = info.models[0]
    assert model.backend == "onnx" and list(model.heads) == ["helpfulness", "safety"]


def test_export_refuses_a_non_empty_output_and_serve_refuses_a_torch_dir(tiny_ckpts, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    proc = export(tiny_ckpts.reward, busy)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    serve = subprocess.run(
        [
            sys.executable,
            "-m",
            "reward_server.cli",
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--backend",
            "onnx",
            "--reward-model",
            str(tiny_ckpts.reward),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode == 2
    assert "no model.onnx" in serve.stderr and "export-onnx" in serve.stderr
