"""Shared-prefix planning (pure) and the runners' shared path against their plain path."""

from __future__ import annotations

import random

import numpy as np
import pytest

from reward_server.models.prefix import (
    Group,
    batch_lengths,
    common_prefix_len,
    pack_rows,
    plan_groups,
    tokens_saved,
)

P = list(range(100, 140))  # a 40-token prompt


def _by_members(groups: list[Group]) -> dict[tuple[int, ...], int]:
    return {tuple(sorted(g.members)): g.prefix_len for g in groups}


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([5], [6]) == 0


def test_plan_groups_finds_groups_whatever_the_order():
    seqs = [P + [1, 2], [7] * 30, P + [3], P[:20] + [9] * 5, P + [1, 5, 6], P[:20] + [8] * 3]
    groups = plan_groups(seqs, min_saved=0)
    assert sorted(i for g in groups for i in g.members) == list(range(len(seqs)))
    by = _by_members(groups)
    assert by[(0, 2, 4)] == 40  # [1, 2] and [1, 5, 6] share 41, but item 2 only 40
    assert by[(3, 5)] == 20
    assert by[(1,)] == 0
    assert tokens_saved(groups) == 2 * 40 + 20


def test_plan_groups_keeps_a_long_group_apart_from_a_short_match():
    # 6 share 40 tokens, 3 more share 21: all 9 together would save 8 x 20 < 5 x 40 + 2 x 21
    seqs = [P + [i] for i in range(6)] + [P[:20] + [200, i] for i in range(3)]
    by = _by_members(plan_groups(seqs))
    assert by[(0, 1, 2, 3, 4, 5)] == 40
    assert by[(6, 7, 8)] == 21


def test_plan_groups_limits_min_shared_and_duplicates():
    # below the minimum: nobody shares
    assert all(len(g.members) == 1 for g in plan_groups([[1] * 10 + [2], [1] * 10 + [3]]))
    # two items sharing 20 tokens save too little (MIN_SAVED_TOKENS); three save enough
    assert all(len(g.members) == 1 for g in plan_groups([P[:20] + [1], P[:20] + [2]]))
    assert len(plan_groups([P[:20] + [1], P[:20] + [2], P[:20] + [3]])) == 1
    # identical items: each keeps its last token for the continuation pass
    groups = plan_groups([P, P, P])
    assert [(sorted(g.members), g.prefix_len) for g in groups] == [([0, 1, 2], 39)]
    # an explicit limit caps the prefix
    assert plan_groups([P + [1], P + [2]], limits=[33, 35])[0].prefix_len == 33


def test_batch_lengths_count_a_groups_prefix_once():
    seqs = [P + [1] * 8, P + [2] * 4, P + [3] * 6, [7] * 50]
    lengths = batch_lengths(seqs)
    # 3 members, prefix 40, longest continuation 8: each costs 8 + ceil(40 / 3) = 22
    assert lengths == [22, 22, 22, 50]


def _items(rng: random.Random) -> list[tuple[str, str]]:
    from reward_server.tiny import WORDS

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    prompt, other = words(40), words(25)
    pairs = [(prompt, " " + words(rng.randint(1, 12))) for _ in range(5)]
    pairs += [(other, " " + words(rng.randint(1, 6))) for _ in range(3)]
    pairs += [(prompt[:-2], prompt[-2:] + " ok"), ("short one", " alone"), (other, " x")]
    return pairs


def test_pack_rows_places_every_member_once_in_rows_of_about_equal_length():
    seqs = [P + [1] * n for n in (30, 10, 25, 5, 40)] + [P[:20] + [2] * 8, P[:20] + [3] * 9]
    groups = [Group([0, 1, 2, 3, 4], 40), Group([5, 6], 20)]
    rows = pack_rows(groups, seqs, max_tokens=50)
    # group 0: 110 continuation tokens -> ceil(110 / 50) = 3 rows; group 1: 17 -> 1 row
    assert [r.group for r in rows] == [0, 0, 0, 1]
    assert sorted(i for r in rows for i in r.members) == list(range(7))
    for r in rows:
        p = groups[r.group].prefix_len
        assert r.lengths == [len(seqs[i]) - p for i in r.members]
        assert r.starts == [sum(r.lengths[:k]) for k in range(len(r.lengths))]  # no gaps
    assert [r.width for r in rows] == [40, 30, 40, 17]
    one_each = pack_rows(groups, seqs, max_tokens=1)  # never splits a member
    assert [len(r.members) for r in one_each] == [1, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reward_runner_shared_equals_plain(family, packed, tiny_ckpts, tiny_llama):
    import torch

    from reward_server.models.reward import RewardRunner, ScoreInput

    paths = tiny_ckpts if family == "gpt2" else tiny_llama
    rm = RewardRunner(
        "rm",
        str(paths.multihead_reward),
        device="cpu",
        dtype=torch.float32,
        pack_continuations=packed,
    )
    assert rm.prefix_sharing
    assert (rm.packed_head is not None) == packed
    seen: list[list[int]] = []
    rm.on_sharing = lambda _name, groups: seen.append([len(g.members) for g in groups])
    items = [ScoreInput(p, c) for p, c in _items(random.Random(1))]
    enc = rm.encode(items, "error")
    plain = rm._forward_plain(enc)
    shared = rm.forward(enc)
    np.testing.assert_allclose(np.stack(shared), np.stack(plain), atol=1e-5)
    assert seen and sorted(seen[0]) == [4, 6]
    rm.cache_bytes = 1  # one member (padded) or one row (packed) per continuation pass
    np.testing.assert_allclose(np.stack(rm.forward(enc)), np.stack(plain), atol=1e-5)
    rm.cache_bytes, rm.pack_row_tokens = 1 << 30, 7  # several packed rows per group
    np.testing.assert_allclose(np.stack(rm.forward(enc)), np.stack(plain), atol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reference_runner_shared_equals_plain(family, packed, tiny_ckpts, tiny_llama):
    import torch

    from reward_server.models.reference import ReferenceRunner, RefSequence

    paths = tiny_ckpts if family == "gpt2" else tiny_llama
    ref = ReferenceRunner(
        "ref", str(paths.reference), device="cpu", dtype=torch.float32, pack_continuations=packed
    )
    assert ref.prefix_sharing and ref.pack_continuations == packed
    rng = random.Random(2)
    p = [rng.randrange(3, 400) for _ in range(50)]
    seqs = [RefSequence(p + [rng.randrange(3, 400) for _ in range(rng.randint(1, 9))], 50, 0.7)]
    seqs += [RefSequence(p + [rng.randrange(3, 400) for _ in range(5)], 50, 0.7) for _ in range(4)]
    # response_start inside the shared prefix: those log-probs come from the prefix pass
    seqs += [RefSequence(p[:30] + [5, 6, 7], 12, 0.7), RefSequence(p[:30] + [5, 8], 31, 0.7)]
    seqs += [RefSequence([1, 2, 3], 1, 0.7)]
    plain = ref._forward_plain(seqs)
    for rows_of in (256, 4):  # one packed row per group, then several
        ref.pack_row_tokens = rows_of
        shared = ref.forward(seqs)
        for a, b in zip(shared, plain, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_encoder_reward_model_takes_the_plain_path():
    from transformers import BertConfig, BertForSequenceClassification

    from reward_server.models.reward import RewardRunner
    from reward_server.tiny import train_tokenizer

    tok = train_tokenizer()
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    rm = RewardRunner("bert", "bert", model=model, tokenizer=tok, device="cpu")
    assert not rm.prefix_sharing


def test_warmup_items_share_no_prefix_even_with_a_small_vocabulary():
    from reward_server.models.prefix import distinct_heads

    heads = distinct_heads(64, 36, avoid=1)
    assert len({tuple(h) for h in heads}) == 64
    assert all(0 <= t < 36 and t != 1 for h in heads for t in h)
    items = [h + [0] * 40 for h in heads]
    assert all(len(g.members) == 1 for g in plan_groups(items))
