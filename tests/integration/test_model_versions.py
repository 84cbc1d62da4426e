"""Model versions and reload without downtime, through the real server on loopback: versions in
GetServerInfo and every response, the version pin, AdminService.ReloadModel (tokens, a reload
under load from concurrent clients, a corrupt checkpoint, the transition window), SIGHUP from a
config file, and a PPO run that stops cleanly when its reward model changes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import RewardClient, RewardServiceError
from reward_server.model_version import combination_version, source_version
from tests.conftest import REPO, free_port, start_server
from tests.helpers import fixed_pairs
from tests.integration.test_trainer_cli import (  # noqa: F401 - fixture
    SERVER_ENV,
    _restore_torch_threads,
    cli_env,
    write_config,
)

pytestmark = pytest.mark.integration

SCORING_TOKEN = "score-token-1"
ADMIN_TOKEN = "admin-token-1"
WINDOW = 4.0  # the module server's --reload-transition-s
PAIRS = fixed_pairs(6, seed=3, max_words=12)


def _variant(src: Path, dst: Path, seed: int) -> Path:
    """A copy of reward checkpoint `src` with every weight moved by seeded noise (same shapes,
    same tokenizer, other scores)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(src, dst)
    model = AutoModelForSequenceClassification.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    return dst


def _corrupt(src: Path, dst: Path) -> Path:
    """A copy of `src` whose weights file is cut short (an interrupted copy)."""
    shutil.copytree(src, dst)
    (w,) = dst.glob("*.safetensors")
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    return dst


@pytest.fixture(scope="module")
def ckpts(tiny_ckpts, tmp_path_factory):
    base = tmp_path_factory.mktemp("versions")
    a = Path(tiny_ckpts.reward)
    return {
        "a": a,
        "b": _variant(a, base / "rm_b", seed=1),
        "corrupt": _corrupt(a, base / "rm_corrupt"),
        "ref": Path(tiny_ckpts.reference),
        "dir": base,
    }


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    """rm = checkpoint A (reloaded to B by the tests, in order), b = checkpoint B (its scores
    and version known in advance), a combination of both, the reference; scoring and admin
    tokens; a 4 s transition window."""
    d = tmp_path_factory.mktemp("srv")
    (d / "tokens").write_text(SCORING_TOKEN + "\n")
    (d / "admin").write_text(ADMIN_TOKEN + "\n")
    sp = start_server(
        [
            "--reward-model", f"rm={ckpts['a']}",
            "--reward-model", f"b={ckpts['b']}",
            "--reference-model", f"ref={ckpts['ref']}",
            "--combination", "both=weighted:rm=1,b=1",
            "--auth-token-file", str(d / "tokens"),
            "--admin-token-file", str(d / "admin"),
            "--reload-transition-s", str(WINDOW),
            "--max-wait-ms", "5",
        ],
        d,
        env=SERVER_ENV,
        ready_kwargs={"token": SCORING_TOKEN},
    )  # fmt: skip
    yield sp
    sp.stop()


def _admin(address: str, token: str | None):
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.AdminServiceStub(channel)
    md = [("authorization", f"Bearer {token}")] if token else None

    def reload(model: str, source: str = "", timeout: float = 120) -> pb.ReloadModelResponse:
        return stub.ReloadModel(
            pb.ReloadModelRequest(model=model, source=source), metadata=md, timeout=timeout
        )

    return channel, reload


def _versions(c: RewardClient) -> dict[str, str]:
    return {m.name: m.model_version for m in c.server_info().models}


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises((RewardServiceError, grpc.RpcError)) as ei:
        fn()
    e = ei.value
    if isinstance(e, RewardServiceError):
        return e.code, e.details
    return e.code(), e.details() or ""


def test_versions_pins_and_admin_auth(server, ckpts) -> None:
    with RewardClient(server.address, token=SCORING_TOKEN) as c:
        v = _versions(c)
        va, vb = source_version(str(ckpts["a"])), source_version(str(ckpts["b"]))
        assert v["rm"] == va and v["b"] == vb and va != vb and len(va) == 12
        assert v["ref"] == source_version(str(ckpts["ref"]))
        assert v["both"] == combination_version("weighted:rm=1,b=1", [("rm", va), ("b", vb)])
        # every response carries the version that answered; an old-style request (no pin) works
        res = c.score(PAIRS, model="rm")
        assert {r.model_version for r in res} == {va}
        assert {r.model_version for r in c.score(PAIRS, model="both")} == {v["both"]}
        assert c.score(PAIRS, model="rm", model_version=va)[0].score == res[0].score
        # a pin to another version: FAILED_PRECONDITION naming both, Score and ReferenceLogProbs
        code, msg = _code(lambda: c.score(PAIRS, model="rm", model_version=vb))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and va in msg and vb in msg
        code, msg = _code(lambda: c.reference_logprobs([[5, 6, 7]], [1], model_version="0" * 12))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "0" * 12 in msg and v["ref"] in msg
        lp = c.reference_logprobs([[5, 6, 7]], [1], model_version=v["ref"])
        assert len(lp[0]) == 2
        stub = pb_grpc.RewardServiceStub(grpc.insecure_channel(server.address))
        md = [("authorization", f"Bearer {SCORING_TOKEN}")]
        resp = stub.ReferenceLogProbs(
            pb.ReferenceLogProbsRequest(
                sequences=[pb.TokenSequence(token_ids=[5, 6], response_start=1)]
            ),
            metadata=md,
        )
        assert resp.model_version == v["ref"]
    # AdminService: no token, a scoring token, a wrong token are refused; nothing changes
    for token, want in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (SCORING_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
        ("nope", grpc.StatusCode.PERMISSION_DENIED),
    ):
        ch, reload = _admin(server.address, token)
        with ch:
            code, _ = _code(lambda reload=reload: reload("rm", str(ckpts["b"])))
        assert code == want
    # the admin token is not a scoring token
    with RewardClient(server.address, token=ADMIN_TOKEN, max_retries=0) as c:
        code, _ = _code(lambda: c.score(PAIRS))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(server.address, token=SCORING_TOKEN) as c:
        assert _versions(c)["rm"] == va


def test_admin_is_off_unless_configured(tiny_server) -> None:
    ch, reload = _admin(tiny_server.address, ADMIN_TOKEN)
    with ch:
        code, _ = _code(lambda: reload("reward"))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_reload_corrupt_then_under_load_then_window(server, ckpts) -> None:
    va, vb = source_version(str(ckpts["a"])), source_version(str(ckpts["b"]))
    ch, reload = _admin(server.address, ADMIN_TOKEN)
    with RewardClient(server.address, token=SCORING_TOKEN) as c, ch:
        want = {
            va: np.array([r.score for r in c.score(PAIRS, model="rm")]),
            vb: np.array([r.score for r in c.score(PAIRS, model="b")]),  # B's, known in advance
        }
        assert np.abs(want[va] - want[vb]).max() > 1e-2
        both_old = _versions(c)["both"]

        # a corrupt checkpoint: the RPC says why, nothing changes
        code, msg = _code(lambda: reload("rm", str(ckpts["corrupt"])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "rm_corrupt" in msg and va in msg and "keeps serving" in msg
        assert _versions(c)["rm"] == va
        np.testing.assert_allclose(
            [r.score for r in c.score(PAIRS, model="rm")], want[va], atol=1e-4
        )
        # a combination is reloaded through its members
        code, msg = _code(lambda: reload("both"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "member models" in msg
        # unchanged source: nothing loaded
        r = reload("rm")
        assert (r.status, r.old_version, r.new_version) == ("unchanged", va, va)

        # reload A -> B while 4 clients score continuously
        seen: list[tuple[str, np.ndarray]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def client_loop() -> None:
            with RewardClient(server.address, token=SCORING_TOKEN) as cc:
                while not stop.is_set():
                    try:
                        res = cc.score(PAIRS, model="rm")
                    except BaseException as e:  # noqa: BLE001 - every failure counts
                        errors.append(e)
                        return
                    versions = {x.model_version for x in res}
                    assert len(versions) == 1
                    seen.append((versions.pop(), np.array([x.score for x in res])))

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for t in threads:
            t.start()
        while len(seen) < 8 and not errors:
            time.sleep(0.01)
        t0 = time.monotonic()
        r = reload("rm", str(ckpts["b"]))
        took = time.monotonic() - t0
        n_at_swap = len(seen)
        while len(seen) < n_at_swap + 8 and not errors:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert (r.status, r.old_version, r.new_version) == ("reloaded", va, vb)
        assert r.source == str(ckpts["b"]) and r.transition_seconds == WINDOW
        print(f"reload of the tiny RM under load: {took:.2f}s, load_seconds {r.load_seconds:.2f}")
        assert {v for v, _ in seen} == {va, vb}
        for version, scores in seen:  # every response's scores are its version's
            np.testing.assert_allclose(scores, want[version], atol=1e-4)
        assert seen[-1][0] == vb  # once switched, the new version answers
        assert _versions(c)["rm"] == vb
        assert server.proc.poll() is None

        # inside the window: pinned-old requests still answer with A (so does the old combination)
        old = c.score(PAIRS, model="rm", model_version=va)
        assert {x.model_version for x in old} == {va}
        np.testing.assert_allclose([x.score for x in old], want[va], atol=1e-4)
        assert {x.model_version for x in c.score(PAIRS, model="both", model_version=both_old)} == {
            both_old
        }
        new = c.score(PAIRS, model="rm")
        np.testing.assert_allclose([x.score for x in new], want[vb], atol=1e-4)
        # after it: FAILED_PRECONDITION naming both
        time.sleep(WINDOW + 0.5)
        code, msg = _code(lambda: c.score(PAIRS, model="rm", model_version=va))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and va in msg and vb in msg
        code, _ = _code(lambda: c.score(PAIRS, model="both", model_version=both_old))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"version {va} of 'rm' dropped" in server.log()


def test_sighup_rereads_the_config_file(ckpts, tmp_path) -> None:
    va, vb = source_version(str(ckpts["a"])), source_version(str(ckpts["b"]))
    conf = tmp_path / "serve.yaml"
    http = free_port()
    base = {"reward_models": {"rm": str(ckpts["a"])}, "max_wait_ms": 5, "http_port": http}
    conf.write_text(yaml.safe_dump(base))
    sp = start_server(["--config", str(conf)], tmp_path, env=SERVER_ENV)
    try:
        with RewardClient(sp.address) as c:
            assert _versions(c)["rm"] == va
            # the HTTP door: the version answered, and the pin (412 naming both)
            item = {"prompt": "a", "completion": " b"}
            got = _post(http, "/v1/score", {"items": [item]})
            assert got == (200, va)
            status, body = _post(http, "/v1/score", {"items": [item], "modelVersion": vb})
            assert status == 412 and va in body and vb in body
            assert _post(http, f"/get_reward?model_version={va}", {"query": ["a b"]}) == (200, va)
            # a broken checkpoint in the file: logged, the old version keeps serving
            conf.write_text(
                yaml.safe_dump({**base, "reward_models": {"rm": str(ckpts["corrupt"])}})
            )
            sp.proc.send_signal(signal.SIGHUP)
            _wait(lambda: "SIGHUP: rm: reload failed" in sp.log(), 60)
            assert _versions(c)["rm"] == va and c.score(PAIRS)[0].model_version == va
            # the new checkpoint in the file: reloaded
            conf.write_text(yaml.safe_dump({**base, "reward_models": {"rm": str(ckpts["b"])}}))
            sp.proc.send_signal(signal.SIGHUP)
            _wait(lambda: _versions(c)["rm"] == vb, 60)
            assert {r.model_version for r in c.score(PAIRS)} == {vb}
            assert sp.proc.poll() is None
    finally:
        sp.stop()


def _post(port: int, path: str, body: dict) -> tuple[int, str]:
    """POST JSON to the HTTP door: (status, the answer's version) or (status, the error body)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
            return resp.status, out.get("modelVersion", out.get("model_version"))
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(cond, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_trainer_pins_versions_and_stops_after_a_checkpoint(ckpts, tmp_path, capsys) -> None:
    from policy_trainer.cli import main
    from policy_trainer.run_logging import read_metrics

    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    sp = start_server(
        [
            "--reward-model", f"rm={ckpts['a']}",
            "--reference-model", f"ref={ckpts['ref']}",
            "--admin-token-file", str(tmp_path / "admin"),
            "--reload-transition-s", "0",
            "--max-wait-ms", "5",
        ],
        tmp_path,
        env=SERVER_ENV,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "run.yaml", ckpts_ns(ckpts), sp.address, run_dir,
        run={"iterations": 200, "save_every": 0},
    )  # fmt: skip
    log = tmp_path / "trainer.log"
    cmd = [sys.executable, "-m", "policy_trainer.cli", "ppo", "--config", str(cfg)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=log.open("w")
    )
    va, vb = source_version(str(ckpts["a"])), source_version(str(ckpts["b"]))
    ch, reload = _admin(sp.address, ADMIN_TOKEN)
    try:
        end = time.monotonic() + 180
        while len(read_metrics(run_dir / "metrics.jsonl")) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end
            time.sleep(0.05)
        recorded = yaml.safe_load((run_dir / "model_versions.json").read_text())
        assert recorded["reward"] == {"name": "rm", "version": va}
        assert recorded["reference"]["version"] == source_version(str(ckpts["ref"]))
        assert reload("rm", str(ckpts["b"])).new_version == vb
        rc = proc.wait(180)
        err = log.read_text()
        assert rc == 3, err[-3000:]
        assert "Traceback" not in err
        assert "no longer serves the model version" in err and va in err and vb in err
        k = read_metrics(run_dir / "metrics.jsonl")[-1]["iteration"]
        assert f"checkpoint of iteration {k}" in err
        assert (run_dir / "checkpoints" / f"iter_{k:06d}" / "trainer_state.pt").is_file()
        # --resume against the server that now serves B: refused before any work, clearly
        capsys.readouterr()
        rc2 = main(["ppo", "--config", str(cfg), "--resume", f"run.stop_after={k + 1}"])
        assert rc2 != 0
        refused = capsys.readouterr().err
        assert f"this run pinned reward model 'rm' version {va}" in refused and vb in refused
        assert len(read_metrics(run_dir / "metrics.jsonl")) == k
        # back to A (a rollback, with `reward-server reload`): the resumed run continues
        from reward_server.cli import main as server_main

        reload_args = ["reload", "--server", sp.address, "--model", "rm", "--source"]
        admin = ["--admin-token-file", str(tmp_path / "admin")]
        assert server_main([*reload_args, str(ckpts["a"]), *admin]) == 0
        out = capsys.readouterr().out
        assert f'"newVersion": "{va}"' in out and '"status": "reloaded"' in out
        assert main(["ppo", "--config", str(cfg), "--resume", f"run.stop_after={k + 1}"]) == 0
        assert read_metrics(run_dir / "metrics.jsonl")[-1]["iteration"] == k + 1
    finally:
        ch.close()
        if proc.poll() is None:
            proc.kill()
        sp.stop()


def ckpts_ns(ckpts):
    """The `write_config` view of the checkpoints (policy = the reference model)."""
    from types import SimpleNamespace

    return SimpleNamespace(reference=str(ckpts["ref"]), reward=str(ckpts["a"]))


def _other_vocab(src: Path, dst: Path) -> Path:
    """A copy of `src` whose tokenizer swaps the ids of two ordinary tokens: same size, other
    fingerprint."""
    import json

    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    return dst


def test_token_in_pinned_to_an_old_version_checks_that_versions_tokenizer(ckpts, tmp_path) -> None:
    """A reload that changes the tokenizer: ids pinned to the old version are checked against
    the old version's fingerprint (served inside the window), unpinned ones against the new."""
    other = _other_vocab(ckpts["a"], tmp_path / "rm_vocab")
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    sp = start_server(
        [
            "--reward-model", f"rm={ckpts['a']}",
            "--admin-token-file", str(tmp_path / "admin"),
            "--reload-transition-s", "120",
        ],
        tmp_path,
        env=SERVER_ENV,
    )  # fmt: skip
    ch, reload = _admin(sp.address, ADMIN_TOKEN)
    try:
        with RewardClient(sp.address) as c, ch:
            (info,) = c.server_info().models
            fp_a, va = info.tokenizer_fingerprint, info.model_version
            ids = [[5, 9, 14, 7], [3, 8]]
            before = c.score_ids(ids, tokenizer_fingerprint=fp_a, model="rm")
            r = reload("rm", str(other))
            assert r.status == "reloaded" and r.old_version == va
            (info,) = c.server_info().models
            fp_b, vb = info.tokenizer_fingerprint, info.model_version
            assert fp_b != fp_a and vb != va
            pinned = c.score_ids(ids, tokenizer_fingerprint=fp_a, model="rm", model_version=va)
            assert {x.model_version for x in pinned} == {va}
            np.testing.assert_allclose(
                [x.score for x in pinned], [x.score for x in before], atol=1e-5
            )
            code, msg = _code(lambda: c.score_ids(ids, tokenizer_fingerprint=fp_a, model="rm"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and fp_b in msg
            code, _ = _code(
                lambda: c.score_ids(ids, tokenizer_fingerprint=fp_b, model="rm", model_version=va)
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            now = c.score_ids(ids, tokenizer_fingerprint=fp_b, model="rm")
            assert {x.model_version for x in now} == {vb}
    finally:
        sp.stop()
