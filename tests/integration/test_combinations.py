"""`--head-combine` (one multi-head model's score from its heads) and `--combination` (a score
from several reward models) through the real server: scores, member scores, normalised scores and
what GetServerInfo says, against in-process forwards of the same checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs, inprocess_scores

pytestmark = pytest.mark.integration

NORM = {"helpful": (0.3, 2.0), "two": (-0.1, 0.5)}


def with_normalization(src, dst, mean: float, std: float):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["reward_normalization"] = {"mean": mean, "std": std, "count": 100}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_head_combine_and_combinations_through_the_server(tiny_ckpts, tmp_path):
    helpful = with_normalization(tiny_ckpts.reward, tmp_path / "helpful", *NORM["helpful"])
    two = with_normalization(tiny_ckpts.multihead_reward, tmp_path / "two", *NORM["two"])
    plain = tiny_ckpts.reward  # no normalisation statistics
    sp = start_server(
        [
            "--reward-model", f"helpful={helpful}",
            "--reward-model", f"two={two}",
            "--reward-model", f"plain={plain}",
            "--head-combine", "two=weighted:helpfulness=1,safety=-0.5",
            "--combination", "overall=weighted:helpful=1,two=0.5",
            "--combination", "worst=min:two,plain",
        ],
        tmp_path,
    )  # fmt: skip
    pairs = fixed_pairs(12, seed=4)
    texts = [p + c for p, c in pairs]
    h = inprocess_scores(str(helpful), texts)[:, 0]
    heads = inprocess_scores(str(two), texts)  # [n, 2]: helpfulness, safety
    t = heads[:, 0] - 0.5 * heads[:, 1]
    try:
        with RewardClient(sp.address) as c:
            info = {m.name: m for m in c.server_info().models}
            got_two = c.score(pairs, model="two")
            got_all = c.score(pairs, model="overall")
            got_worst = c.score(pairs, model="worst")
    finally:
        sp.stop()

    # --head-combine: the score is the rule over the heads; both heads come back.
    np.testing.assert_allclose([r.score for r in got_two], t, atol=1e-5)
    np.testing.assert_allclose([r.head_scores["safety"] for r in got_two], heads[:, 1], atol=1e-5)
    assert info["two"].combine == "weighted:helpfulness=1,safety=-0.5"

    # --combination: the rule over the members' scores, members in head_scores.
    np.testing.assert_allclose([r.score for r in got_all], h + 0.5 * t, atol=1e-5)
    np.testing.assert_allclose([r.head_scores["helpful"] for r in got_all], h, atol=1e-5)
    np.testing.assert_allclose([r.head_scores["two"] for r in got_all], t, atol=1e-5)
    # ... and its normalised score is the rule over the members' normalised scores.
    (mh, sh), (mt, st) = NORM["helpful"], NORM["two"]
    want_norm = (h - mh) / sh + 0.5 * (t - mt) / st
    np.testing.assert_allclose([r.normalized_score for r in got_all], want_norm, atol=1e-4)
    assert info["overall"].has_normalization and list(info["overall"].heads) == ["helpful", "two"]

    # A member without statistics: no normalised score for the combination.
    # (plain is the same checkpoint as helpful, without the statistics)
    np.testing.assert_allclose([r.score for r in got_worst], np.minimum(t, h), atol=1e-5)
    assert all(r.normalized_score is None for r in got_worst)
    assert not info["worst"].has_normalization
