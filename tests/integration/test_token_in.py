"""Token-in scoring (`ScoreItem.token_ids` + `ScoreRequest.tokenizer_fingerprint`) through a real
server: ids score as the text they tokenise to, ids are scored exactly as given (no decode and
re-encode), and every way to get it wrong is refused with the right code, naming the culprit."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import AsyncRewardClient, RewardClient, RewardServiceError
from reward_server.fingerprint import tokenizer_fingerprint
from tests.conftest import free_port, start_server
from tests.helpers import fixed_pairs
from tests.integration.test_http_front_door import request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory):
    """A tiny reward model with another tokenizer (another vocabulary, another fingerprint)."""
    from reward_server.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("other"), vocab_size=384, seed=3)


@pytest.fixture(scope="module")
def server(tiny_ckpts, other_vocab, tmp_path_factory):
    from reward_server.tiny import build_tiny_bert_rm

    bert = build_tiny_bert_rm(tmp_path_factory.mktemp("bert") / "bert")
    port = free_port()
    sp = start_server(
        [
            "--reward-model", f"rm={tiny_ckpts.reward}",
            "--reward-model", f"rm2={tiny_ckpts.multihead_reward}",
            "--reward-model", f"other={other_vocab.reward}",
            "--reward-model", f"bert={bert}",
            "--combination", "both=weighted:rm=1,rm2=0.5",
            "--combination", "mixed=min:rm,other",
            "--default-reward-model", "rm",
            "--reference-model", f"ref={tiny_ckpts.reference}",
            "--max-wait-ms", "5",
            "--http-port", str(port),
        ],
        tmp_path_factory.mktemp("srv"),
    )  # fmt: skip
    sp.http_port = port
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def tok(tiny_ckpts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpts.reward)


def in_process(path, ids: list[int]) -> float:
    """The reward model's own forward on exactly these ids."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def refused(fn) -> RewardServiceError:
    with pytest.raises(RewardServiceError) as ei:
        fn()
    return ei.value


def test_ids_score_as_the_text_they_tokenise_to(server, tok):
    fp = tokenizer_fingerprint(tok)
    pairs = fixed_pairs(12, seed=4)
    ids = [tok(p + c, add_special_tokens=True)["input_ids"] for p, c in pairs]
    # the round trip is exact for these texts, so text and ids must be the same input
    assert all(tok(tok.decode(x), add_special_tokens=True)["input_ids"] == x for x in ids)
    with RewardClient(server.address) as c:
        info = {m.name: m.tokenizer_fingerprint for m in c.server_info().models}
        assert info["rm"] == info["rm2"] == info["ref"] == fp != info["other"]
        for model in ("rm", "rm2", "both"):
            text = c.score(pairs, model=model)
            by_ids = c.score_ids(ids, tokenizer_fingerprint=fp, model=model)
            np.testing.assert_allclose(
                [r.score for r in by_ids], [r.score for r in text], atol=1e-5
            )
            assert [r.num_tokens for r in by_ids] == [len(x) for x in ids]
            assert [r.num_tokens for r in text] == [len(x) for x in ids]
            assert by_ids[0].head_scores.keys() == text[0].head_scores.keys()


def test_ids_score_what_was_generated_not_its_re_tokenisation(server, tok, tiny_ckpts):
    """Tokens one character each decode to a string that re-tokenises into merged tokens: the
    server scores the generated tokens, the text path scores the merged ones."""
    fp = tokenizer_fingerprint(tok)
    text = "the cat sat on the mat"
    split = [t for ch in text for t in tok(ch, add_special_tokens=False)["input_ids"]]
    assert tok.decode(split) == text
    merged = tok(text, add_special_tokens=True)["input_ids"]
    assert merged != split and len(merged) < len(split)
    with RewardClient(server.address) as c:
        (by_ids,) = c.score_ids([split], tokenizer_fingerprint=fp)
        (by_text,) = c.score([("", text)])
    assert by_ids.num_tokens == len(split) and by_text.num_tokens == len(merged)
    assert by_ids.score == pytest.approx(in_process(tiny_ckpts.reward, split), abs=1e-4)
    assert by_text.score == pytest.approx(in_process(tiny_ckpts.reward, merged), abs=1e-4)
    assert abs(by_ids.score - by_text.score) > 1e-3


def test_truncation_applies_to_ids(server, tok, tiny_ckpts):
    fp = tokenizer_fingerprint(tok)
    long = (tok("the cat sat on the mat ")["input_ids"] * 60)[:300]  # over the 256 positions
    with RewardClient(server.address) as c:
        err = refused(lambda: c.score_ids([long], tokenizer_fingerprint=fp, truncation="error"))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 256" in str(err)
        (left,) = c.score_ids([long], tokenizer_fingerprint=fp, truncation="left")
    assert left.truncated and left.num_tokens == 256
    assert left.score == pytest.approx(in_process(tiny_ckpts.reward, long[-256:]), abs=1e-4)


def test_bad_token_in_requests_are_refused_and_the_server_keeps_serving(server, tok, other_vocab):
    fp = tokenizer_fingerprint(tok)
    ok = tok("the cat")["input_ids"]
    with RewardClient(server.address, max_retries=0) as c:

        def code_and_text(**kw) -> tuple[grpc.StatusCode, str]:
            kw.setdefault("tokenizer_fingerprint", fp)
            err = refused(lambda: c.score_ids(**kw))
            return err.code, str(err)

        code, msg = code_and_text(token_ids=[ok], tokenizer_fingerprint="v1:0000000000000000")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "v1:0000000000000000" in msg and fp in msg and "'rm'" in msg
        code, msg = code_and_text(token_ids=[ok, [1, 2, len(tok) + 5]])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "item 1" in msg
        assert f"token id {len(tok) + 5} out of vocabulary" in msg
        code, msg = code_and_text(token_ids=[[-1, 4]])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "item 0" in msg
        # a text-pair model reads separator and segment ids that token ids do not carry
        bert_fp = {m.name: m.tokenizer_fingerprint for m in c.server_info().models}["bert"]
        code, msg = code_and_text(token_ids=[ok], tokenizer_fingerprint=bert_fp, model="bert")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "pair" in msg
        # a combination: every member must have the fingerprint; the message names the one
        code, msg = code_and_text(token_ids=[ok], model="mixed")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'other'" in msg
        with pytest.raises(ValueError, match="tokenizer_fingerprint"):
            c.score_ids([ok], tokenizer_fingerprint="")
        assert c.score([("the", " cat")])[0].num_tokens > 0  # still serving

    # what the client method cannot send: raw requests
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RewardServiceStub(ch)

        def raw(req: pb.ScoreRequest) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as ei:
                stub.Score(req, timeout=30)
            return ei.value.code(), ei.value.details()

        code, msg = raw(pb.ScoreRequest(items=[pb.ScoreItem(token_ids=ok)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "token_ids need tokenizer_fingerprint" in msg
        both = pb.ScoreItem(token_ids=ok, completion=" sat")
        code, msg = raw(pb.ScoreRequest(items=[both], tokenizer_fingerprint=fp))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "item 0" in msg and "not both" in msg
        mixed = [pb.ScoreItem(token_ids=ok), pb.ScoreItem(prompt="a", completion=" b")]
        code, msg = raw(pb.ScoreRequest(items=mixed, tokenizer_fingerprint=fp))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "item 1" in msg
        # a fingerprint alone (text items) is checked too
        text = [pb.ScoreItem(prompt="a", completion=" b")]
        code, _ = raw(pb.ScoreRequest(items=text, tokenizer_fingerprint="v1:0000000000000000"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        # an old client (no new fields) is unaffected
        resp = stub.Score(pb.ScoreRequest(items=text), timeout=30)
        assert resp.scores[0].num_tokens > 0


def test_http_door_and_async_face_take_ids(server, tok):
    fp = tokenizer_fingerprint(tok)
    ids = [tok("the cat sat")["input_ids"], tok("a dog ran far")["input_ids"]]
    with RewardClient(server.address) as c:
        want = [r.score for r in c.score_ids(ids, tokenizer_fingerprint=fp)]
    body = {"tokenizerFingerprint": fp, "items": [{"tokenIds": x} for x in ids]}
    status, got, _ = request(server.http_port, "/v1/score", body)
    assert status == 200, got
    np.testing.assert_allclose([s["score"] for s in got["scores"]], want, atol=1e-5)
    status, err, _ = request(
        server.http_port, "/v1/score", {"items": [{"token_ids": ids[0]}]}
    )  # snake_case is accepted by the JSON mapping too
    assert status == 400 and "tokenizer_fingerprint" in err["error"]["message"], err

    async def run() -> list[float]:
        async with AsyncRewardClient(server.address) as ac:
            return [r.score for r in await ac.score_ids(ids, tokenizer_fingerprint=fp)]

    np.testing.assert_allclose(asyncio.run(run()), want, atol=1e-5)


def test_trainer_sends_ids_when_the_reward_model_shares_its_tokenizer(
    server, tok, tiny_ckpts, tmp_path
):
    """Decided once at start from GetServerInfo and recorded in the run directory; the rollout's
    scores are those of the generated token ids."""
    import json

    from policy_trainer.config import load_config
    from policy_trainer.remote import decide_score_input
    from policy_trainer.trainer import PPOTrainer
    from tests.integration.test_trainer_cli import write_config

    fp = tokenizer_fingerprint(tok)  # the policy (tiny reference) has the reward's tokenizer
    run_dir = tmp_path / "run"
    cfg = load_config(
        write_config(
            tmp_path / "run.yaml", tiny_ckpts, server.address, run_dir,
            server={"reward_model": "rm", "reference_model": "ref"},
            rollout={"prompts_per_iteration": 3},
        )
    )  # fmt: skip
    with RewardClient(server.address) as c:
        info = c.server_info()
    decide = {
        name: decide_score_input(info, type(cfg.server)(reward_model=name), fp)[0]
        for name in ("rm", "both", "other", "mixed", "bert")
    }
    assert decide == {
        "rm": "token_ids", "both": "token_ids", "other": "text", "mixed": "text", "bert": "text"
    }  # fmt: skip
    off = type(cfg.server)(reward_model="rm", score_token_ids=False)
    assert decide_score_input(info, off, fp)[0] == "text"

    trainer = PPOTrainer(cfg)
    try:
        trainer.connect()
        record = json.loads((run_dir / "reward_input.json").read_text())
        assert record["score_input"] == "token_ids"
        assert (
            record["policy_tokenizer_fingerprint"] == fp == record["reward_tokenizer_fingerprint"]
        )
        batch, _ = trainer.collect(trainer.sampler.next_indices())
        assert trainer.remote is not None and trainer.remote.score_fingerprint == fp
        eos = tok.eos_token_id
        ids = []
        for q, qm, r, rm in zip(
            batch.query, batch.query_mask, batch.response, batch.response_mask, strict=True
        ):
            resp = r[rm.bool()].tolist()
            ids.append(q[qm.bool()].tolist() + (resp[:-1] if resp and resp[-1] == eos else resp))
        valid = batch.valid.tolist()
        texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
        with RewardClient(server.address) as c:
            want = [s.score for s in c.score_ids(ids, tokenizer_fingerprint=fp, model="rm")]
            as_text = [s.score for s in c.score([("", t) for t in texts], model="rm")]
        got = batch.scores.tolist()
        assert any(valid)
        for v, g, w in zip(valid, got, want, strict=True):
            if v:
                assert g == pytest.approx(w, abs=1e-4)
        # sampled tokens rarely re-tokenise to themselves: those items' scores are not the text's
        drift = [i for i, t in enumerate(texts) if valid[i] and tok(t)["input_ids"] != ids[i]]
        assert drift
        assert any(abs(got[i] - as_text[i]) > 1e-3 for i in drift)
    finally:
        trainer.close()
