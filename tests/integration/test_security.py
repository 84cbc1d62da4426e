"""TLS, mutual TLS and bearer tokens; safetensors only; no remote code unless asked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
import pytest

from reward_server.client import RewardClient, RewardServiceError
from tests.certs import make_certs
from tests.conftest import start_server

pytestmark = pytest.mark.integration
PAIR = [("the cat", " is good")]


def _expect(code: grpc.StatusCode, fn) -> str:
    with pytest.raises(RewardServiceError) as ei:
        fn()
    assert ei.value.code == code, ei.value
    return ei.value.details


def test_tls_server(tiny_ckpts, tmp_path):
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other", prefix="other-")
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
        ],
        tmp_path,
        ready_kwargs={"tls_ca": str(certs.ca)},
    )
    try:
        with RewardClient(sp.address, tls_ca=str(certs.ca)) as c:
            assert len(c.score(PAIR)) == 1
        with RewardClient(sp.address, max_retries=0, timeout=3) as c:  # plaintext client
            _expect(grpc.StatusCode.UNAVAILABLE, lambda: c.score(PAIR))
        with RewardClient(
            sp.address, tls_ca=str(other.ca), max_retries=0, timeout=3
        ) as c:  # wrong CA
            _expect(grpc.StatusCode.UNAVAILABLE, lambda: c.score(PAIR))
    finally:
        sp.stop()
    assert "TLS" in sp.log()


def test_mutual_tls_requires_a_client_certificate(tiny_ckpts, tmp_path):
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other", prefix="other-")
    ok = {
        "tls_ca": str(certs.ca),
        "tls_cert": str(certs.client_cert),
        "tls_key": str(certs.client_key),
    }
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--tls-client-ca",
            str(certs.ca),
        ],
        tmp_path,
        ready_kwargs=ok,
    )
    try:
        with RewardClient(sp.address, **ok) as c:
            assert len(c.score(PAIR)) == 1
        with RewardClient(
            sp.address, tls_ca=str(certs.ca), max_retries=0, timeout=3
        ) as c:  # no client cert
            _expect(grpc.StatusCode.UNAVAILABLE, lambda: c.score(PAIR))
        bad = {
            "tls_ca": str(certs.ca),
            "tls_cert": str(other.client_cert),
            "tls_key": str(other.client_key),
        }
        with RewardClient(sp.address, max_retries=0, timeout=3, **bad) as c:  # cert from another CA
            _expect(grpc.StatusCode.UNAVAILABLE, lambda: c.score(PAIR))
    finally:
        sp.stop()


def test_bearer_tokens_and_open_health(tiny_ckpts, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("s3cret-token-one\n\nsecond-token\n")
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--auth-token-file",
            str(token_file),
            "--open-health",
        ],
        tmp_path,
        env={"RLHF_AUTH_TOKENS": "env-token"},
    )
    try:
        for tok in ("s3cret-token-one", "second-token", "env-token"):
            with RewardClient(sp.address, token=tok) as c:
                assert len(c.score(PAIR)) == 1
        with RewardClient(sp.address, token="", max_retries=0) as c:
            assert "missing bearer token" in _expect(
                grpc.StatusCode.UNAUTHENTICATED, lambda: c.score(PAIR)
            )
            assert c.health() == "SERVING"  # probes need no token with --open-health
        with RewardClient(sp.address, token="wrong", max_retries=0) as c:
            assert "invalid bearer token" in _expect(
                grpc.StatusCode.UNAUTHENTICATED, lambda: c.server_info()
            )
            _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: c.reference_logprobs([[1, 2]], [1]))
    finally:
        sp.stop()
    log = sp.log()
    assert "s3cret-token-one" not in log and "env-token" not in log and "wrong" not in log


def test_health_needs_token_without_open_health(tiny_ckpts, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("tok\n")
    sp = start_server(
        ["--reward-model", str(tiny_ckpts.reward), "--auth-token-file", str(token_file)],
        tmp_path,
        ready_kwargs={"token": "tok"},
    )
    try:
        with RewardClient(sp.address, token="") as c:
            assert c.health() == "UNAUTHENTICATED"
    finally:
        sp.stop()


def _serve_fails(args: list[str]) -> str:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "reward_server.cli",
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--no-warmup",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_pickled_weights_are_refused(tiny_ckpts, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_ckpts.reward, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    err = _serve_fails(["--reward-model", str(d)])
    assert "pytorch_model.bin" in err and "safetensors only" in err


def test_remote_code_is_not_run_unless_asked(tiny_ckpts, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(tiny_ckpts.reward, d)
    marker = tmp_path / "remote-code-ran"
    (d / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import GPT2ForSequenceClassification, GPT2Config\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'custom_gpt2'\n"
        "class CustomModel(GPT2ForSequenceClassification):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "custom_gpt2"
    cfg["auto_map"] = {
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForSequenceClassification": "custom_model.CustomModel",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    err = _serve_fails(["--reward-model", str(d)])
    assert "trust-remote-code" in err or "trust_remote_code" in err
    assert not marker.exists()


def test_trainer_runs_against_a_mutual_tls_server_with_a_token(tiny_ckpts, tmp_path):
    import os

    import yaml

    certs = make_certs(tmp_path / "certs")
    token_file = tmp_path / "tokens"
    token_file.write_text("trainer-token\n")
    tls = {
        "tls_ca": str(certs.ca),
        "tls_cert": str(certs.client_cert),
        "tls_key": str(certs.client_key),
    }
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reference-model",
            str(tiny_ckpts.reference),
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--tls-client-ca",
            str(certs.ca),
            "--auth-token-file",
            str(token_file),
        ],
        tmp_path,
        ready_kwargs={**tls, "token": "trainer-token"},
    )
    cfg = {
        "model": {"policy": str(tiny_ckpts.reference)},
        "data": {"prompts": ["the cat", "a dog"]},
        "rollout": {
            "prompts_per_iteration": 2,
            "samples_per_prompt": 2,
            "chunk_size": 4,
            "max_new_tokens": 4,
        },
        "server": {"address": sp.address, "token_env": "MY_RM_TOKEN", **tls},
        "ppo": {"epochs": 1, "minibatch_size": 4},
        "run": {
            "output_dir": str(tmp_path / "run"),
            "iterations": 1,
            "num_threads": 1,
            "progress": False,
        },
    }
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "policy_trainer.cli",
                "ppo",
                "--config",
                str(tmp_path / "ppo.yaml"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "MY_RM_TOKEN": "trainer-token"},
        )
    finally:
        sp.stop()
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert "trainer-token" not in r.stderr + r.stdout + sp.log()
