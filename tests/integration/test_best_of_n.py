"""`policy-trainer best-of-n` (and --sft) against a real `reward-server serve`, tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from policy_trainer.best_of_n import OUTPUT_NAME, read_done
from policy_trainer.cli import main
from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.integration.test_trainer_cli import (  # noqa: F401 - fixture
    PROMPTS,
    SERVER_ENV,
    _restore_torch_threads,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        [
            "--reward-model",
            f"rm={tiny_ckpts.reward}",
            "--reward-model",
            f"rm2={tiny_ckpts.multihead_reward}",
            "--combination",
            "both=mean:rm,rm2",
            "--reference-model",
            str(tiny_ckpts.reference),
            "--max-wait-ms",
            "5",
        ],
        tmp_path_factory.mktemp("bon-srv"),
        env=SERVER_ENV,
    )
    yield sp
    sp.stop()


def write_config(tmp: Path, ckpts, address: str, run_dir: Path, **sections) -> Path:
    cfg: dict[str, dict] = {
        "model": {"policy": str(ckpts.reference)},
        "data": {"prompts": PROMPTS, "max_prompt_tokens": 16},
        "sampling": {"n": 8, "chunk_size": 3, "max_new_tokens": 8},
        "server": {"address": address, "timeout": 10.0, "reward_model": "both"},
        "sft": {"epochs": 3, "batch_size": 2, "lr": 1e-3},
        "run": {"output_dir": str(run_dir), "seed": 0, "progress": False, "num_threads": 1},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp / f"bon-{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_best_of_n_keeps_the_best_and_resumes(server, tiny_ckpts, tmp_path: Path, capsys):
    split_dir, full_dir = tmp_path / "split", tmp_path / "full"
    cfg = write_config(tmp_path, tiny_ckpts, server.address, split_dir)
    assert main(["best-of-n", "--config", str(cfg), "--run.max-prompts", "2"]) == 0
    assert [r["index"] for r in read_done(split_dir / OUTPUT_NAME)] == [0, 1]
    # a crash mid-line leaves a torn line: it is dropped and that prompt redone
    with (split_dir / OUTPUT_NAME).open("a") as f:
        f.write('{"index": 2, "prom')
    assert main(["best-of-n", "--config", str(cfg)]) == 0, capsys.readouterr().err
    rows = read_done(split_dir / OUTPUT_NAME)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    cfg_full = write_config(tmp_path, tiny_ckpts, server.address, full_dir)
    assert main(["best-of-n", "--config", str(cfg_full)]) == 0
    full = read_done(full_dir / OUTPUT_NAME)
    # per-prompt seeds: the resumed run drew exactly what an uninterrupted one draws
    assert [r["completion"] for r in rows] == [r["completion"] for r in full]
    for a, b in zip(rows, full, strict=True):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
    with RewardClient(server.address) as client:
        for r in rows:
            assert r["prompt"] == PROMPTS[r["index"]] and len(r["scores"]) == 8
            assert r["score"] == max(s for s in r["scores"] if s is not None)
            assert len(set(r["scores"])) > 1  # n different samples
            # the kept score is the server's score of the kept completion, both members counted
            again = client.score([(r["prompt"], r["completion"])], model="both")[0]
            assert again.score == pytest.approx(r["score"], abs=1e-4)
            assert set(again.head_scores) == {"rm", "rm2"}
    summary = json.loads((split_dir / "summary.json").read_text())
    assert summary["analytic_kl"] == pytest.approx(math.log(8) - 7 / 8)
    assert summary["prompts"] == len(PROMPTS)
    assert summary["best_score_mean"] == pytest.approx(np.mean([r["score"] for r in rows]))
    assert summary["best_score_mean"] > summary["score_mean"]


def test_sft_on_the_kept_samples(server, tiny_ckpts, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from policy_trainer.best_of_n_config import load_best_of_n_config

    run = tmp_path / "run"
    cfg = write_config(
        tmp_path, tiny_ckpts, server.address, run, sampling={"n": 64, "chunk_size": 32}
    )
    assert main(["best-of-n", "--config", str(cfg), "--sft", "--run.max-prompts", "3"]) == 0
    rows = read_done(run / OUTPUT_NAME)
    assert len(rows) == 3 and all(len(r["scores"]) == 64 for r in rows)
    assert (run / "sft" / "config.json").is_file()
    c = load_best_of_n_config(cfg)
    from policy_trainer.models import load_tokenizer

    tok = load_tokenizer(c.model)

    def nll(model_dir: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        total = 0.0
        with torch.no_grad():
            for r in rows:
                p = tok(r["prompt"])["input_ids"]
                ids = torch.tensor([p + r["completion_token_ids"]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                total -= float(
                    logp[torch.arange(len(p) - 1, ids.shape[1] - 1), ids[0, len(p) :]].sum()
                )
        return total

    # the fine-tuned policy gives its kept samples more probability than the sampling policy did
    assert nll(run / "sft") < nll(tiny_ckpts.reference) - 1.0
