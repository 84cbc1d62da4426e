"""The real console scripts: serve (subprocess), health, info, score; reflection lists the service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from reward_server.client import RewardClient
from tests.conftest import REPO

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "reward-server"), *args], capture_output=True, text=True, timeout=120
    )


def test_health_info_and_reflection(tiny_server):
    r = run("health", "--server", tiny_server.address)
    assert r.returncode == 0 and r.stdout.strip() == "SERVING", r.stderr
    info = json.loads(run("info", "--server", tiny_server.address).stdout)
    names = {m["name"]: m["role"] for m in info["models"]}
    assert names == {
        "reward": "MODEL_ROLE_REWARD",
        "rm2": "MODEL_ROLE_REWARD",
        "reference": "MODEL_ROLE_REFERENCE",
    }
    assert info["maxItemsPerRequest"] == 64 and info["defaultRewardModel"] == "reward"
    with grpc.insecure_channel(tiny_server.address) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "rlhf.v1.RewardService" in services
    assert "grpc.health.v1.Health" in services


def test_health_fails_when_nothing_listens():
    from tests.conftest import free_port

    r = run("health", "--server", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert r.returncode == 1
    assert r.stdout.strip() == "UNAVAILABLE"


def test_score_subcommand_writes_one_line_per_input_in_order(tiny_server, tmp_path):
    rows = [
        {"prompt": "the cat", "completion": " is good"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "the dog"},
            ]
        },
        {"prompt": "a", "completion": " dog ran fast", "id": 7},
    ] * 3
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run(
        "score",
        "--server",
        tiny_server.address,
        "--input",
        str(inp),
        "--output",
        str(out),
        "--batch-size",
        "4",
    )
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(rows)
    with RewardClient(tiny_server.address) as c:
        expected = c.score(rows)
    for g, src, e in zip(got, rows, expected, strict=True):
        assert abs(g["score"] - e.score) < 1e-6
        assert {k: g[k] for k in src} == src  # input fields kept, in order


def test_score_subcommand_reports_bad_input_line(tiny_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a", "completion": " b"}\nnot json\n')
    r = run(
        "score",
        "--server",
        tiny_server.address,
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "o.jsonl"),
    )
    assert r.returncode != 0
    assert "in.jsonl:2" in r.stderr


def test_serve_refuses_bad_config_clearly(tmp_path):
    r = run(
        "serve",
        "--port",
        "0",
        "--reward-model",
        str(tmp_path / "missing"),
        "--device",
        "cpu",
        "--no-warmup",
    )
    assert r.returncode == 2
    assert "cannot start" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("serve", "--reward-model", "x", "--truncation", "middle")
    assert r.returncode == 2
    assert "truncation must be one of error, left, right, got 'middle'" in r.stderr
    bad = tmp_path / "serve.yaml"
    bad.write_text("reward_models: {rm: x}\nmax_batch_token: 4096\n")
    r = run("serve", "--config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"unknown key 'max_batch_token' in {bad}; did you mean 'max_batch_tokens'?" in r.stderr
    # A flag the chosen backend cannot honour is refused, never ignored.
    r = run("serve", "--backend", "onnx", "--reward-model", "rm=x", "--adapter", "rm=a")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "adapters apply to the torch backend only (--adapter with --backend onnx)" in r.stderr


def test_yaml_config_with_flag_override(tiny_ckpts, tmp_path):
    from tests.conftest import start_server

    cfg = tmp_path / "server.yaml"
    cfg.write_text(
        f"reward_models:\n  yaml_rm: {tiny_ckpts.reward}\nmax_items_per_request: 7\nmax_wait_ms: 1\n"
    )
    sp = start_server(["--config", str(cfg), "--max-items-per-request", "9"], tmp_path)
    try:
        with RewardClient(sp.address) as c:
            info = c.server_info()
            assert info.max_items_per_request == 9  # the flag wins
            assert [m.name for m in info.models] == ["yaml_rm"]
            assert len(c.score([("a", " b")] * 20)) == 20  # split into parts of 9
    finally:
        sp.stop()


def test_requests_before_models_are_loaded_get_unavailable(tiny_ckpts, tmp_path):
    """While loading, health is NOT_SERVING and work is refused with UNAVAILABLE (retry later)."""
    import grpc

    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
    from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
    from tests.conftest import start_server

    # A slow-loading model list: several copies, so the window before SERVING is long enough.
    args = []
    for i in range(12):
        args += ["--reward-model", f"m{i}={tiny_ckpts.reward}"]
    sp = start_server(args, tmp_path, wait=False)
    try:
        seen = set()
        with grpc.insecure_channel(sp.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            with RewardClient(sp.address) as c:
                for _ in range(600):
                    status = c.health()
                    if status == "SERVING":
                        break
                    if status == "NOT_SERVING":
                        try:
                            stub.Score(
                                pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", completion=" b")]),
                                timeout=5,
                            )
                        except grpc.RpcError as err:
                            seen.add((err.code(), "still loading" in (err.details() or "")))
                    __import__("time").sleep(0.02)
                assert c.health() == "SERVING"
                assert len(c.score([("a", " b")])) == 1
        assert (grpc.StatusCode.UNAVAILABLE, True) in seen, seen
    finally:
        sp.stop()


def test_a_port_taken_before_the_bind_is_retried(tiny_ckpts, tmp_path, monkeypatch):
    """`start_local_server` picks a free port, but on a shared machine another process can take
    it before the server binds: the server then exits 'Address already in use' and is started
    again on new ports (this failed one CI run)."""
    import socket

    import reward_server.local_server as ls

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    ports = iter([busy])
    real = ls.free_port
    monkeypatch.setattr(ls, "free_port", lambda: next(ports, None) or real())
    try:
        sp = ls.start_local_server(["--reward-model", str(tiny_ckpts.reward)], tmp_path, cwd=REPO)
        try:
            assert sp.port != busy
            with RewardClient(sp.address) as c:
                assert c.health() == "SERVING"
        finally:
            sp.stop()
    finally:
        taken.close()
    assert "Address already in use" in (tmp_path / f"server-{busy}.log").read_text()
