"""PPO under torchrun (2 CPU ranks, gloo) against two server replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, start_server

pytestmark = pytest.mark.integration


def test_torchrun_two_ranks_two_replicas_identical_weights(tiny_ckpts, tmp_path):
    args = [
        "--reward-model",
        str(tiny_ckpts.reward),
        "--reference-model",
        str(tiny_ckpts.reference),
        "--max-wait-ms",
        "2",
    ]
    a = start_server(args, tmp_path)
    b = start_server(args, tmp_path)
    cfg = {
        "model": {"policy": str(tiny_ckpts.reference), "value_model": "shared"},
        "data": {
            "prompts": [
                "the cat and the dog",
                "a big red car",
                "one two three",
                "the river",
                "five fish",
                "a bird",
            ]
        },
        "rollout": {
            "prompts_per_iteration": 2,
            "samples_per_prompt": 2,
            "chunk_size": 2,
            "max_new_tokens": 6,
        },
        "server": {"address": f"{a.address},{b.address}"},
        "ppo": {"epochs": 1, "minibatch_size": 2, "lr": 1e-3},
        "run": {
            "output_dir": str(tmp_path / "run"),
            "iterations": 2,
            "seed": 3,
            "num_threads": 1,
            "progress": False,
        },
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = Path(sys.executable).parent / "torchrun"
    try:
        r = subprocess.run(
            [
                str(torchrun),
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "policy_trainer.cli",
                "ppo",
                "--config",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        a.stop()
        b.stop()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2]
    assert all(m["sequences"] == 8 for m in lines)  # 2 ranks x 2 prompts x 2 samples
    digests = [m["weights_digest"] for m in lines]  # checked equal across ranks after each update
    assert len(set(digests)) == 2, "weights should change between iterations"
