"""DPO losses against hand-computed values, the DPO config, and the preference reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from policy_trainer.best_of_n import analytic_kl
from policy_trainer.dpo_config import load_dpo_config
from policy_trainer.losses import dpo_loss
from policy_trainer.preferences import load_preference_pairs, ranking_pairs
from reward_server.config_base import ConfigError

# chosen/rejected log-probs and reference log-probs of two pairs
LOGP_C = torch.tensor([-3.0, -5.0])
LOGP_R = torch.tensor([-4.0, -4.0])
REF_C = torch.tensor([-3.5, -4.0])
REF_R = torch.tensor([-3.0, -4.5])
# h = (logp_c - ref_c) - (logp_r - ref_r): pair 0: 0.5 - (-1.0) = 1.5; pair 1: -1.0 - 0.5 = -1.5


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_sigmoid_loss_by_hand() -> None:
    out = dpo_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.1)
    # -log sigmoid(0.1 * 1.5) and -log sigmoid(-0.15)
    expected = [-math.log(_sig(0.15)), -math.log(_sig(-0.15))]
    assert out.loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.tolist() == pytest.approx([0.620957, 0.770957], abs=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.1], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.05], abs=1e-6)


def test_conservative_dpo_by_hand() -> None:
    eps = 0.2
    out = dpo_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5, label_smoothing=eps)
    h = [0.75, -0.75]
    expected = [
        -(1 - eps) * math.log(_sig(x)) - eps * math.log(_sig(-x)) for x in h
    ]  # 0.8 * 0.386871 + 0.2 * 1.136871 = 0.536871; 0.8 * 1.136871 + 0.2 * 0.386871 = 0.986871
    assert out.loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.tolist() == pytest.approx([0.536871, 0.986871], abs=1e-5)
    # eps = 0 is plain DPO
    plain = dpo_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5)
    assert plain.loss.tolist() == pytest.approx([-math.log(_sig(x)) for x in h], abs=1e-6)


def test_ipo_loss_by_hand() -> None:
    lc, lr = torch.tensor([2.0, 1.0]), torch.tensor([4.0, 3.0])
    out = dpo_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5, loss_type="ipo",
                   chosen_lengths=lc, rejected_lengths=lr)  # fmt: skip
    # per-token log-ratios: pair 0: 0.5/2 - (-1.0)/4 = 0.5; pair 1: -1.0/1 - 0.5/3 = -7/6
    # (h - 1/(2*0.5))^2 = (0.5 - 1)^2 = 0.25; (-7/6 - 1)^2 = 169/36
    assert out.loss.tolist() == pytest.approx([0.25, 169 / 36], abs=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5, loss_type="ipo")


def test_dpo_gradient_direction() -> None:
    """The sigmoid loss's gradient raises the chosen log-prob and lowers the rejected one."""
    c = LOGP_C.clone().requires_grad_(True)
    r = LOGP_R.clone().requires_grad_(True)
    dpo_loss(c, r, REF_C, REF_R, beta=0.1).loss.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    # d/dlogp_c of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    assert c.grad.tolist() == pytest.approx([-0.1 * _sig(-0.15), -0.1 * _sig(0.15)], abs=1e-6)


def test_analytic_kl_of_best_of_n() -> None:
    assert analytic_kl(1) == 0.0
    assert analytic_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert analytic_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)


def test_dpo_config_checks(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {policy: p}\ndata: {preferences: x.jsonl}\ndpo: {beta: 0.2}\n")
    cfg = load_dpo_config(path, ["dpo.loss_type=ipo"])
    assert cfg.dpo.loss_type == "ipo" and cfg.dpo.beta == 0.2
    with pytest.raises(ConfigError, match="loss_type"):
        load_dpo_config(path, ["dpo.loss_type=hinge"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_dpo_config(path, ["dpo.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_dpo_config(path, ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_dpo_config(path, ["dpo.batch_size=8", "dpo.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="data.preferences"):
        load_dpo_config(None, ["model.policy=p"])


def test_preference_formats(tiny_ckpts, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpts.reference)
    eos = tok.eos_token_id
    recs = [
        {"prompt": "the cat", "chosen": " is good", "rejected": " is bad"},
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
            "rejected": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "bad"},
            ],
        },
        {"prompt": "a dog", "responses": [" red", " blue", " green"], "ranking": [2, 0, 1]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs, skipped = load_preference_pairs(str(path), tok, 64, 64)
    assert not skipped and len(pairs) == 1 + 1 + 3
    p0 = pairs[0]
    assert p0.prompt_ids == tok("the cat")["input_ids"]
    assert p0.chosen_ids == tok(" is good", add_special_tokens=False)["input_ids"] + [eos]
    assert p0.rejected_ids[-1] == eos and p0.location.endswith(":1")
    chat = pairs[1]
    assert tok.decode(chat.prompt_ids) == "<|user|>hi\n<|assistant|>"
    assert tok.decode(chat.chosen_ids[:-1]) == "good\n" and chat.chosen_ids[-1] == eos
    # ranking [2, 0, 1]: (2 over 0), (2 over 1), (0 over 1)
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    green, red, blue = (tok(t, add_special_tokens=False)["input_ids"] + [eos]
                        for t in (" green", " red", " blue"))  # fmt: skip
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs[2:]] == [
        (green, red), (green, blue), (red, blue)
    ]  # fmt: skip
    # a malformed record: stop names its place; skip counts it
    path.write_text(path.read_text() + json.dumps({"prompt": "x", "chosen": " a"}) + "\n")
    with pytest.raises(ConfigError, match=r"p.jsonl:4: missing field 'rejected'"):
        load_preference_pairs(str(path), tok, 64, 64)
    pairs, skipped = load_preference_pairs(str(path), tok, 64, 64, on_error="skip")
    assert len(pairs) == 5 and len(skipped) == 1
