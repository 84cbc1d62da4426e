"""From rollout to update: masking of missing scores, penalties, group baselines, and the sign of
the PPO update on the tiny causal LM."""

from __future__ import annotations

import pytest
import torch

from policy_trainer.config import ModelConfig, PPOConfig
from policy_trainer.experience import final_scores, make_experience
from policy_trainer.models import ActorCritic, load_policy, load_tokenizer
from policy_trainer.rollout import RolloutBatch, policy_logprobs
from policy_trainer.sampling import left_pad, right_pad
from policy_trainer.update import build_optimizer, minibatch_losses, ppo_update

T = torch.tensor


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models are far faster single-threaded on a shared machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(scores: list[float], has_eos: list[bool], values: bool = True) -> RolloutBatch:
    n = len(scores)
    logp = torch.full((n, 3), -1.0)
    ref = torch.full((n, 3), -1.2)
    return RolloutBatch(
        query=torch.ones(n, 2, dtype=torch.long),
        query_mask=torch.ones(n, 2, dtype=torch.long),
        response=torch.ones(n, 3, dtype=torch.long),
        response_mask=T([[1, 1, 0]] * n),
        old_logprobs=logp * T([[1, 1, 0]]),
        ref_logprobs=ref * T([[1, 1, 0]]),
        old_values=torch.zeros(n, 3) if values else None,
        scores=T(scores),
        has_eos=T(has_eos),
        valid=torch.ones(n, dtype=torch.bool),
        completions=[""] * n,
    )


def test_missing_scores_are_masked_not_zeroed() -> None:
    batch = _batch([2.0, float("nan"), 4.0, 0.0], [True, True, True, False])
    exp = make_experience(
        batch, PPOConfig(whiten_advantages=False), 0.1, 1, missing_eos_penalty=1.0
    )
    assert exp.n_valid == 3
    assert exp.mask[1].sum() == 0 and (exp.advantages[1] == 0).all()
    # valid scores after the EOS penalty: 2, 4, 0 - 1
    assert exp.stats["reward_mean"] == pytest.approx((2 + 4 - 1) / 3)
    assert exp.stats["valid_fraction"] == pytest.approx(0.75)
    # k1 KL per token = logp - ref = 0.2 on two tokens -> 0.4 per sequence
    assert exp.stats["kl_mean"] == pytest.approx(0.4, abs=1e-6)
    assert exp.kl_sum == pytest.approx(1.2, abs=1e-6)
    # a server failure must not look like a score of 0: the row with NaN differs from a real 0
    zero = make_experience(
        _batch([2.0, 0.0, 4.0, 0.0], [True] * 3 + [False]), PPOConfig(), 0.1, 1, 1.0
    )
    assert zero.n_valid == 4


def test_final_scores_penalty_then_clip() -> None:
    out = final_scores(T([3.0, 3.0, float("nan")]), T([True, False, False]), 1.0, clip=2.5)
    assert out[:2].tolist() == [2.5, 2.0]
    assert torch.isnan(out[2])


def test_group_estimators_broadcast_one_advantage_per_sequence() -> None:
    batch = _batch([1.0, 2.0, 3.0, 6.0], [True] * 4, values=False)
    cfg = PPOConfig(advantage_estimator="rloo", whiten_advantages=False, kl_coef=0.0)
    exp = make_experience(batch, cfg, 0.0, 4, None)
    torch.testing.assert_close(exp.advantages[:, 0], T([-8 / 3, -4 / 3, 0.0, 4.0]))
    torch.testing.assert_close(exp.advantages[:, 1], exp.advantages[:, 0])
    assert (exp.advantages[:, 2] == 0).all() and exp.returns is None


@pytest.fixture(scope="module")
def tiny_ac(tiny_ckpts):
    cfg = ModelConfig(policy=str(tiny_ckpts.reference))
    tok = load_tokenizer(cfg)
    return tok, ActorCritic(load_policy(cfg, torch.device("cpu")), "shared").eval()


def test_update_raises_logprob_of_rewarded_responses(tiny_ac) -> None:
    tok, model = tiny_ac
    prompts = [tok("the cat")["input_ids"], tok("a big red car")["input_ids"]] * 2
    responses = [[40, 41, 42], [50, 51], [60, 61, 62], [70]]
    q, qm = left_pad(prompts, tok.pad_token_id)
    r, rm = right_pad(responses, tok.pad_token_id, width=4)
    logp, values = policy_logprobs(model, q, qm, r, rm, 1.0)
    batch = RolloutBatch(
        query=q, query_mask=qm, response=r, response_mask=rm, old_logprobs=logp,
        ref_logprobs=logp.clone(), old_values=values, scores=T([5.0, -5.0, 5.0, -5.0]),
        has_eos=T([True] * 4), valid=torch.ones(4, dtype=torch.bool), completions=[""] * 4,
    )  # fmt: skip
    cfg = PPOConfig(epochs=2, minibatch_size=2, micro_batch_size=1, lr=1e-3)
    exp = make_experience(batch, cfg, 0.05, 1, None)
    # before any update: ratio exactly 1, no clipping, KL 0 (policy == reference here)
    first = minibatch_losses(model, batch, exp, torch.arange(4), cfg, 1.0, True)
    assert first.ratio_max_abs_dev.item() < 1e-5
    assert first.clipfrac.item() == 0.0
    assert exp.stats["kl_mean"] == 0.0
    opt, sched = build_optimizer(model, cfg, total_steps=4)
    g = torch.Generator().manual_seed(0)
    stats = ppo_update(model, opt, sched, batch, exp, cfg, 1.0, g, True)
    assert stats["lr"] == 0.0  # linear decay reached 0 at the last of the 4 steps
    assert stats["value_loss"] > 0 and stats["entropy"] > 0
    new_logp, new_values = policy_logprobs(model, q, qm, r, rm, 1.0)
    seq_gain = ((new_logp - logp) * rm).sum(dim=1)
    assert seq_gain[0] > 0 and seq_gain[2] > 0  # rewarded responses became more likely
    assert seq_gain[1] < 0 and seq_gain[3] < 0  # punished ones less likely
    # the value head moved toward the returns (positive for the rewarded rows)
    assert new_values[0, : len(responses[0])].mean() > new_values[1, : len(responses[1])].mean()


def test_update_takes_log_probs_under_the_batch_sampling_mask(tiny_ac) -> None:
    """The PPO ratio compares log-probs of one distribution: with a `SamplingMask` on the batch
    the update's are masked like the rollout's, so the ratio starts at exactly 1."""
    from dataclasses import replace

    from policy_trainer.sampling import SamplingMask

    tok, model = tiny_ac
    prompts = [tok("the cat")["input_ids"], tok("a big red car")["input_ids"]]
    q, qm = left_pad(prompts, tok.pad_token_id)
    r, rm = right_pad([[40, 41, tok.eos_token_id], [50, 51]], tok.pad_token_id, width=3)
    special = tuple(sorted({int(i) for i in tok.all_special_ids} - {tok.eos_token_id}))
    drawn = SamplingMask(tok.eos_token_id, special, min_new_tokens=2)
    logp, values = policy_logprobs(model, q, qm, r, rm, 1.0, drawn)
    batch = RolloutBatch(
        query=q, query_mask=qm, response=r, response_mask=rm, old_logprobs=logp,
        ref_logprobs=logp.clone(), old_values=values, scores=T([1.0, -1.0]),
        has_eos=T([True, False]), valid=torch.ones(2, dtype=torch.bool), completions=[""] * 2,
        sampling_mask=drawn,
    )  # fmt: skip
    cfg = PPOConfig(epochs=1, minibatch_size=2, micro_batch_size=2)
    exp = make_experience(batch, cfg, 0.05, 1, None)
    masked = minibatch_losses(model, batch, exp, torch.arange(2), cfg, 1.0, True)
    assert masked.ratio_max_abs_dev.item() < 1e-5
    # the same batch without its mask: the update's full-softmax log-probs are lower, ratio < 1
    full = minibatch_losses(
        model, replace(batch, sampling_mask=None), exp, torch.arange(2), cfg, 1.0, True
    )
    assert full.ratio_max_abs_dev.item() > 1e-4
    assert full.ratio_mean.item() < 1.0
