"""bfloat16 serving on CPU through the real server: the dtype path that GPUs use by default
(`--dtype auto` picks bf16 on CUDA), exercised where there is no GPU. Scores rank like float32,
reference log-probs stay close and come back as float32, and attention is PyTorch SDPA. And the
GPU flags on a machine without one: a clear message, no traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs, inprocess_logprobs, inprocess_scores, spearman

pytestmark = pytest.mark.integration


def test_bfloat16_on_cpu_ranks_like_float32(tiny_ckpts, tmp_path):
    pairs = fixed_pairs(48, seed=11)
    expected = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in pairs])[:, 0]
    sp = start_server(
        [
            "--dtype",
            "bfloat16",
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reference-model",
            str(tiny_ckpts.reference),
        ],
        tmp_path,
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reference))
    seqs = [tok(p + c)["input_ids"] for p, c in pairs[:6]]
    starts = [len(tok(p)["input_ids"]) for p, _ in pairs[:6]]
    try:
        with RewardClient(sp.address) as c:
            got = np.array([r.score for r in c.score(pairs)])
            refs = c.reference_logprobs(seqs, starts)
            info = c.server_info()
    finally:
        sp.stop()
    dtypes = {m.name: m.dtype for m in info.models}
    assert set(dtypes.values()) == {"bfloat16"}, dtypes
    assert spearman(expected, got) >= 0.99
    np.testing.assert_allclose(got, expected, atol=0.02)  # measured 0.0024 (spread 0.8)
    wants = inprocess_logprobs(str(tiny_ckpts.reference), seqs, starts, 1.0)
    for lp, want in zip(refs, wants, strict=True):
        assert lp.dtype == np.float32 and lp.shape == want.shape
        np.testing.assert_allclose(lp, want, atol=0.02)  # measured 0.0013-0.0024


def test_reward_runner_uses_sdpa_attention_in_bfloat16_on_cpu(tiny_ckpts):
    from reward_server.models.reward import RewardRunner

    r = RewardRunner("rm", str(tiny_ckpts.reward), device="cpu", dtype=torch.bfloat16)
    assert r.model.config._attn_implementation == "sdpa"
    assert next(r.model.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_gpu_flags_without_a_gpu_fail_with_a_clear_message(tiny_ckpts, tmp_path):
    import subprocess
    import sys

    serve = [sys.executable, "-m", "reward_server.cli", "serve", "--device", "cuda"]
    serve += ["--reward-model", str(tiny_ckpts.reward), "--port", "0"]
    out = subprocess.run(serve, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "no CUDA GPU is visible" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout

    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(
        f"model: {{policy: {tiny_ckpts.reference}, device: cuda}}\ndata: {{prompts: [a b]}}\n"
        f"run: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    train = [sys.executable, "-m", "policy_trainer.cli", "ppo", "--config", str(cfg)]
    out = subprocess.run(train, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "CUDA is not available" in out.stderr and "Traceback" not in out.stderr
