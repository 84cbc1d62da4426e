"""Rollout mechanics on the tiny causal LM: padding, position ids, EOS truncation, sampling,
and log-prob invariance to left padding and batch composition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policy_trainer.config import DataConfig, ModelConfig
from policy_trainer.data import PromptSampler, load_prompts
from policy_trainer.losses import logprobs_from_logits
from policy_trainer.models import ActorCritic, load_policy, load_tokenizer, position_ids_from_mask
from policy_trainer.rollout import policy_logprobs
from policy_trainer.sampling import left_pad, right_pad, sample_responses, truncate_after_eos

T = torch.tensor


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models are far faster single-threaded on a shared machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_policy(tiny_ckpts):
    cfg = ModelConfig(policy=str(tiny_ckpts.reference))
    tok = load_tokenizer(cfg)
    model = ActorCritic(load_policy(cfg, torch.device("cpu")), "shared").eval()
    return tok, model


def test_padding_and_position_ids() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = right_pad([[5], [6, 7]], pad_id=1, width=3)
    assert ids.tolist() == [[5, 1, 1], [6, 7, 1]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0]]
    full = torch.cat([T([[0, 0, 1, 1]]), T([[1, 1, 0]])], dim=1)
    assert position_ids_from_mask(full).tolist() == [[0, 0, 0, 1, 2, 3, 4]]


def test_truncate_after_first_eos() -> None:
    eos, pad = 0, 9
    resp = T([[4, 0, 5, 0], [4, 5, 6, 7], [0, 3, 3, 3]])
    out, mask, has_eos = truncate_after_eos(resp, eos, pad)
    assert out.tolist() == [[4, 0, 9, 9], [4, 5, 6, 7], [0, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_tokenizer_pad_is_left_and_not_eos(tiny_policy) -> None:
    tok, model = tiny_policy
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


def _unpadded_logprobs(model: ActorCritic, seq: list[int], start: int, temp: float) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= start from one unpadded forward, logits / T."""
    with torch.no_grad():
        logits = model.policy(torch.tensor([seq])).logits[0].float()  # [L, V]
    sl = logits[start - 1 : -1].unsqueeze(0)  # [1, n, V]
    return logprobs_from_logits(sl / temp, torch.tensor([seq[start:]]))[0]


def test_logprobs_invariant_to_left_padding_and_batch_composition(tiny_policy) -> None:
    tok, model = tiny_policy
    prompts = [tok(t)["input_ids"] for t in ["the cat", "a big red car on the road today", "one"]]
    responses = [[40, 41, 42, 43], [50, 51], [60, 61, 62]]
    q, qm = left_pad(prompts, tok.pad_token_id)
    r, rm = right_pad(responses, tok.pad_token_id, width=6)
    lp, values = policy_logprobs(model, q, qm, r, rm, temperature=0.7)
    # extra left padding
    q2, qm2 = left_pad(prompts, tok.pad_token_id, width=q.shape[1] + 5)
    lp2, _ = policy_logprobs(model, q2, qm2, r, rm, temperature=0.7)
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=0)
    # each row alone (another batch composition, no padding at all for the prompt)
    for i in range(3):
        qi, qmi = left_pad([prompts[i]], tok.pad_token_id)
        lpi, _ = policy_logprobs(model, qi, qmi, r[i : i + 1], rm[i : i + 1], temperature=0.7)
        torch.testing.assert_close(lpi[0], lp[i], atol=1e-5, rtol=0)
        # and the plain unpadded forward with logits / T
        n = len(responses[i])
        seq = prompts[i] + responses[i]
        expect = _unpadded_logprobs(model, seq, len(prompts[i]), 0.7)
        torch.testing.assert_close(lp[i, :n], expect, atol=1e-5, rtol=0)
        assert (lp[i, n:] == 0).all()
    # zero-initialised value head: values are exactly 0 at the start
    assert values is not None and values.abs().max().item() == 0.0


def test_cached_sampling_matches_full_forward_greedy(tiny_policy) -> None:
    """At a tiny temperature sampling is argmax: each token must be the argmax of a full,
    uncached forward over the left-padded batch, so positions and the KV cache line up."""
    tok, model = tiny_policy
    prompts = [tok(t)["input_ids"] for t in ["the cat and the dog", "one", "a happy bird"]]
    q, qm = left_pad(prompts, tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    resp = sample_responses(model.policy, q, qm, 6, 1e-4, tok.eos_token_id, tok.pad_token_id, g)
    for i, p in enumerate(prompts):
        seq = list(p)
        for t in range(resp.shape[1]):
            with torch.no_grad():
                nxt = int(model.policy(torch.tensor([seq])).logits[0, -1].argmax())
            assert int(resp[i, t]) == nxt, (i, t)
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)


def test_sampling_is_reproducible_and_pads_after_eos(tiny_policy) -> None:
    tok, model = tiny_policy
    q, qm = left_pad([tok("the cat")["input_ids"]] * 8, tok.pad_token_id)
    a = sample_responses(
        model.policy,
        q,
        qm,
        10,
        1.0,
        tok.eos_token_id,
        tok.pad_token_id,
        torch.Generator().manual_seed(3),
    )
    b = sample_responses(
        model.policy,
        q,
        qm,
        10,
        1.0,
        tok.eos_token_id,
        tok.pad_token_id,
        torch.Generator().manual_seed(3),
    )
    c = sample_responses(
        model.policy,
        q,
        qm,
        10,
        1.0,
        tok.eos_token_id,
        tok.pad_token_id,
        torch.Generator().manual_seed(4),
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # force an EOS: a model whose EOS logit is huge at the first step ends every row at once
    eos_bias = torch.zeros(model.policy.config.vocab_size)
    eos_bias[tok.eos_token_id] = 1e4
    handle = model.policy.lm_head.register_forward_hook(lambda m, i, o: o + eos_bias)
    try:
        d = sample_responses(model.policy, q, qm, 10, 1.0, tok.eos_token_id, tok.pad_token_id)
    finally:
        handle.remove()
    assert d.shape == (8, 1) and (d == tok.eos_token_id).all()


def test_prompt_loading_and_sampler(tmp_path: Path, tiny_policy) -> None:
    tok, _ = tiny_policy
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "the cat " * 40})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hello"}]})
        + "\n"
        + json.dumps("one two")
        + "\n"
    )
    prompts = load_prompts(DataConfig(prompts=str(f), max_prompt_tokens=8), tok)
    assert len(prompts) == 3
    assert len(prompts[0].token_ids) == 8  # truncated, left side dropped
    assert prompts[0].token_ids == tok("the cat " * 40)["input_ids"][-8:]
    assert prompts[1].messages == [{"role": "user", "content": "hello"}]
    assert prompts[1].text.endswith("<|assistant|>")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b b"]}), tmp_path / "p.parquet")
    assert [p.text for p in load_prompts(DataConfig(prompts=str(tmp_path / "p.parquet")), tok)] == [
        "a",
        "b b",
    ]
    from policy_trainer.config import ConfigError

    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="prompt 0: no 'prompt' string"):
        load_prompts(DataConfig(prompts=str(tmp_path / "bad.jsonl")), tok)
    with pytest.raises(ConfigError, match="tokenizes to no tokens"):
        load_prompts(DataConfig(prompts=[""]), tok)

    # the sampler: 2 ranks split each global batch, passes are permutations, state resumes
    s0 = PromptSampler(5, per_rank=2, seed=1, shuffle=True, rank=0, world_size=2)
    s1 = PromptSampler(5, per_rank=2, seed=1, shuffle=True, rank=1, world_size=2)
    first = s0.next_indices() + s1.next_indices()
    assert len(set(first)) == 4
    state = s0.state_dict()
    nxt = s0.next_indices()
    s2 = PromptSampler(5, per_rank=2, seed=1, shuffle=True, rank=0, world_size=2)
    s2.load_state_dict(state)
    assert s2.next_indices() == nxt


class _RecordingRemote:
    """Stands in for RemoteRewards: records when each chunk's RPCs are sent and collected, and
    answers with a score derived from the completion and zero reference log-probs."""

    def __init__(self, events: list[str]) -> None:
        self.events, self.n = events, 0

    def submit(self, items, token_ids, starts, reward_ids=None):
        i, self.n = self.n, self.n + 1
        self.events.append(f"submit{i}")
        scores = np.array([float(len(c)) for _, c in items], dtype=np.float32)
        refs = [
            np.zeros(len(t) - s, dtype=np.float32) for t, s in zip(token_ids, starts, strict=True)
        ]
        return (i, scores, refs)

    def collect(self, rpcs):
        i, scores, refs = rpcs
        self.events.append(f"collect{i}")
        return scores, refs

    def pop_wait_seconds(self) -> float:
        return 0.0


@pytest.mark.parametrize(
    "overlap, expected",
    [
        # every chunk sampled and sent before any policy forward: the last RPCs overlap all three
        ("batch", ["submit0", "submit1", "submit2", "fwd", "fwd", "fwd"]),
        ("chunk", ["submit0", "fwd", "submit1", "fwd", "submit2", "fwd"]),
        ("none", ["submit0", "collect0", "fwd", "submit1", "collect1", "fwd", "submit2"]),
    ],
)
def test_overlap_modes_order_work_and_give_the_same_batch(
    tiny_policy, monkeypatch, overlap, expected
) -> None:
    import policy_trainer.rollout as rollout
    from policy_trainer.config import RolloutConfig
    from policy_trainer.data import Prompt

    tok, model = tiny_policy
    prompts = [Prompt(t, tok(t)["input_ids"]) for t in ["the cat", "one two", "a red car"]]
    events: list[str] = []
    real = rollout.policy_logprobs
    monkeypatch.setattr(
        rollout, "policy_logprobs", lambda *a, **k: (events.append("fwd"), real(*a, **k))[1]
    )

    def run(mode: str) -> rollout.RolloutBatch:
        events.clear()
        cfg = RolloutConfig(samples_per_prompt=2, chunk_size=2, max_new_tokens=6, overlap=mode)
        batch, timing = rollout.collect_rollout(
            model,
            prompts,
            cfg,
            _RecordingRemote(events),
            tok,
            torch.device("cpu"),
            torch.Generator().manual_seed(5),
        )
        assert set(timing) == {
            "generation_seconds",
            "policy_forward_seconds",
            "rpc_wait_seconds",
            "prompt_tokens_saved_share",
        }
        # chunks of 2 = the 2 samples of one prompt per request: half the prompt tokens shared
        assert timing["prompt_tokens_saved_share"] == 0.5
        return batch

    got = run(overlap)
    assert events[: len(expected)] == expected
    assert sorted(e for e in events if e.startswith("collect")) == [
        "collect0",
        "collect1",
        "collect2",
    ]
    ref = run("chunk")  # the order of the work changes nothing in the result
    for name in ("response", "response_mask", "old_logprobs", "old_values", "scores", "valid"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.completions == ref.completions


def test_shared_prompt_tokens_counts_repeats_within_one_request() -> None:
    from policy_trainer.rollout import shared_prompt_tokens

    assert shared_prompt_tokens([[1, 2, 3]] * 4 + [[5, 6]] + [[7] * 10] * 2) == 3 * 3 + 10
    assert shared_prompt_tokens([[1, 2], [1, 3]]) == 0


def test_sampling_mask_gives_the_log_probs_of_the_distribution_sampled_from() -> None:
    """Mass on a never-drawn token (EOS before min_new_tokens, a suppressed id) changes nothing
    under the mask; under the full softmax it lowers every drawn token's log-prob, which is how a
    PPO policy once hid its KL (`SamplingMask`)."""
    from policy_trainer.sampling import SamplingMask

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)  # [B, R, V]
    labels = T([[3, 4, 1], [5, 6, 6]])  # EOS (1) drawn only at position 2, past min_new_tokens
    drawn = SamplingMask(eos_id=1, suppress_ids=(0, 2), min_new_tokens=2)
    masked = drawn.apply(logits)
    # exactly log_softmax over the allowed tokens of each position
    allowed = [[3, 4, 5, 6], [3, 4, 5, 6], [1, 3, 4, 5, 6]]
    for t, ids in enumerate(allowed):
        sub = torch.log_softmax(logits[:, t, ids], dim=-1)  # [B, |ids|]
        for b in range(2):
            want = sub[b, ids.index(int(labels[b, t]))]
            torch.testing.assert_close(
                logprobs_from_logits(masked, labels)[b, t], want, atol=1e-6, rtol=0
            )
    # piling mass onto the blocked EOS at position 0: the masked log-probs do not move
    hidden = logits.clone()
    hidden[:, 0, 1] += 10.0
    torch.testing.assert_close(
        logprobs_from_logits(drawn.apply(hidden), labels),
        logprobs_from_logits(masked, labels),
        atol=1e-6,
        rtol=0,
    )
    assert (
        logprobs_from_logits(hidden, labels)[:, 0] < logprobs_from_logits(logits, labels)[:, 0] - 5
    ).all()
    # finite everywhere: the entropy of a masked distribution is a number
    from policy_trainer.losses import entropy_from_logits

    assert torch.isfinite(entropy_from_logits(masked)).all()


def test_rollout_log_probs_are_under_the_sampling_mask(tiny_policy) -> None:
    import policy_trainer.rollout as rollout
    from policy_trainer.config import RolloutConfig
    from policy_trainer.data import Prompt

    tok, model = tiny_policy
    prompts = [Prompt(t, tok(t)["input_ids"]) for t in ["the cat", "one two"]]

    def collect(as_sampled: bool) -> rollout.RolloutBatch:
        cfg = RolloutConfig(
            samples_per_prompt=2, chunk_size=4, max_new_tokens=5, min_new_tokens=2,
            logprobs_as_sampled=as_sampled,
        )  # fmt: skip
        batch, _ = rollout.collect_rollout(
            model, prompts, cfg, _RecordingRemote([]), tok, torch.device("cpu"),
            torch.Generator().manual_seed(3),
        )  # fmt: skip
        return batch

    plain, batch = collect(False), collect(True)
    assert plain.sampling_mask is None  # the default: full-softmax log-probs, as before
    assert torch.equal(plain.response, batch.response)  # the same samples either way
    drawn = batch.sampling_mask
    assert drawn is not None and drawn.eos_id == tok.eos_token_id and drawn.min_new_tokens == 2
    special = {int(i) for i in tok.all_special_ids} - {tok.eos_token_id}
    assert set(drawn.suppress_ids) == special
    args = (batch.query, batch.query_mask, batch.response, batch.response_mask, 1.0)
    masked, _ = policy_logprobs(model, *args, drawn)
    full, _ = policy_logprobs(model, *args)
    torch.testing.assert_close(batch.old_logprobs, masked, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.old_logprobs, full, atol=1e-6, rtol=0)
    # the first min_new_tokens positions renormalise without EOS: higher than the full softmax's
    m = batch.response_mask.bool()
    assert (batch.old_logprobs[:, :2][m[:, :2]] > full[:, :2][m[:, :2]]).all()
