"""bitsandbytes 8-bit and 4-bit reward models on CPU (bitsandbytes >= 0.50): served through the
real server, their scores rank a fixed set of items as the float32 model does (Spearman >= 0.99).
"""

from __future__ import annotations

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs, inprocess_logprobs, inprocess_scores, spearman

pytestmark = pytest.mark.integration
pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_scores_rank_like_float32(tiny_ckpts, tmp_path, bits):
    pairs = fixed_pairs(48, seed=7)
    expected = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in pairs])[:, 0]
    sp = start_server(["--reward-model", str(tiny_ckpts.reward), "--quantization", bits], tmp_path)
    try:
        with RewardClient(sp.address) as c:
            got = np.array([r.score for r in c.score(pairs)])
    finally:
        sp.stop()
    rho = spearman(expected, got)
    print(f"{bits}: Spearman {rho:.4f}, max |diff| {np.abs(got - expected).max():.4f}")
    assert rho >= 0.99
    assert not np.allclose(got, expected, atol=1e-6)  # really quantized, not float32 again


def test_reference_quantization_applies_to_reference_models_only(tiny_ckpts, tmp_path):
    """`--reference-quantization 8bit` quantizes the reference model (its log-probs move a
    little off float32) and not the reward model; `--quantization` is reward models' only;
    GetServerInfo says which is which."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reference))
    pairs = fixed_pairs(8, seed=3)
    seqs = [tok(p + c)["input_ids"] for p, c in pairs]
    starts = [len(tok(p)["input_ids"]) for p, _ in pairs]
    args = [
        "--reward-model",
        str(tiny_ckpts.reward),
        "--reference-model",
        str(tiny_ckpts.reference),
    ]
    sp = start_server([*args, "--reference-quantization", "8bit"], tmp_path)
    try:
        with RewardClient(sp.address) as c:
            info = {m.name: m.quantization for m in c.server_info().models}
            refs = c.reference_logprobs(seqs, starts)
            got = np.array([r.score for r in c.score(pairs)])
    finally:
        sp.stop()
    assert info == {"reward": "none", "reference": "8bit"}, info
    want_scores = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in pairs])[:, 0]
    np.testing.assert_allclose(got, want_scores, atol=1e-5)  # the reward model: float32
    wants = inprocess_logprobs(str(tiny_ckpts.reference), seqs, starts, 1.0)
    diffs = np.concatenate([np.abs(g - w) for g, w in zip(refs, wants, strict=True)])
    print(f"8-bit reference: max |log-prob diff| {diffs.max():.4f}, mean {diffs.mean():.4f}")
    assert 1e-6 < diffs.max() < 0.1  # quantized (not float32), and close
