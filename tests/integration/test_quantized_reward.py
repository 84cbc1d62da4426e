"""bitsandbytes 8-bit and 4-bit reward models on CPU (bitsandbytes >= 0.50): served through the
real server, their scores rank a fixed set of items as the float32 model does (Spearman >= 0.99).
"""

from __future__ import annotations

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs, inprocess_scores, spearman

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
