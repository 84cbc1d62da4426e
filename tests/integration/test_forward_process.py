"""`--forward-process` through the real server on loopback: the same scores and log-probs as the
in-thread path, the prefix-sharing metrics still counted, a killed worker answered as UNAVAILABLE
while the server keeps serving and restarts it, a reload through AdminService moving to new
worker processes, and no worker left behind after SIGTERM or SIGKILL of the server."""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import numpy as np
import psutil
import pytest

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import RewardClient, RewardServiceError
from tests.conftest import start_server
from tests.helpers import fixed_pairs, scrape
from tests.integration.test_model_versions import _variant

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "fp-admin-token"
PAIRS = fixed_pairs(6, seed=5, max_words=12)
PROMPT = "A long shared question about the weather in the mountains this week, in detail: "
GROUP = [(PROMPT, f"answer number {k} is sunny") for k in range(4)]  # one prefix, four samples
SEQS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _workers(log: str) -> dict[str, dict[int, int]]:
    """The latest forward process pid of each model's worker slots, from the server's log."""
    out: dict[str, dict[int, int]] = {}
    for name, slot, pid in re.findall(
        r"model '([^']+)': forward process (\d+) \(pid (\d+)\) started", log
    ):
        out.setdefault(name, {})[int(slot)] = int(pid)
    return out


def _wait(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(tiny_ckpts, tmp_path_factory):
    """The same models served in-thread and with --forward-process (admin token and a 1 s
    transition window on the latter); "b" is a variant of the reward model, for the reload."""
    d = tmp_path_factory.mktemp("fp")
    b = _variant(tiny_ckpts.reward, d / "rm_b", seed=2)
    (d / "admin").write_text(ADMIN_TOKEN + "\n")
    args = [
        "--reward-model", f"rm={tiny_ckpts.reward}",
        "--reward-model", f"rm2={tiny_ckpts.multihead_reward}",
        "--reward-model", f"b={b}",
        "--reference-model", f"ref={tiny_ckpts.reference}",
        "--max-wait-ms", "5",
        "--batch-overhead-tokens", "1e9",  # a request is one batch on both: the same padding
        # two forward streams of one thread on both (the same float sums; a set thread count
        # turns the workers' elastic threads off); with --forward-process, two workers a model
        "--forward-streams", "2", "--intra-op-threads", "1",
    ]  # fmt: skip
    thread = start_server(args, d, metrics=True, wait=False)
    proc = start_server(
        [
            *args,
            "--forward-process",
            "--admin-token-file", str(d / "admin"),
            "--reload-transition-s", "1",
        ],
        d,
        metrics=True,
        wait=False,
    )  # fmt: skip
    try:
        for sp in (thread, proc):
            sp.wait_serving(180)
        yield {"thread": thread, "proc": proc, "b": b}
    finally:
        proc.stop()
        thread.stop()


def _answers(address: str, model: str = "rm") -> tuple[list, list]:
    """Scores of PAIRS and GROUP (one request each, so each is one batch) and the head scores."""
    with RewardClient(address) as c:
        res = c.score(PAIRS, model=model) + c.score(GROUP, model=model)
    return [r.score for r in res], [r.head_scores for r in res]


def test_scores_and_logprobs_equal_the_in_thread_path(servers) -> None:
    for model in ("rm", "rm2"):
        assert _answers(servers["proc"].address, model) == _answers(
            servers["thread"].address, model
        )
    lp = {}
    for key in ("thread", "proc"):
        with RewardClient(servers[key].address) as c:
            lp[key] = c.reference_logprobs(SEQS, [2, 1], model="ref")
    for a, b in zip(lp["proc"], lp["thread"], strict=True):
        np.testing.assert_array_equal(a, b)
    # each model's forwards run in a worker process of the server
    pids = _workers(servers["proc"].log())
    assert set(pids) == {"rm", "rm2", "b", "ref"}
    assert all(sorted(slots) == [0, 1] for slots in pids.values())
    children = {c.pid for c in psutil.Process(servers["proc"].proc.pid).children()}
    assert {pid for slots in pids.values() for pid in slots.values()} <= children


def test_prefix_sharing_metrics_are_counted(servers) -> None:
    key = 'reward_server_prefix_tokens_saved_total{model="rm"}'
    saved = {}
    for name in ("thread", "proc"):
        sp = servers[name]
        before = scrape(sp.metrics_port).get(key, 0.0)
        with RewardClient(sp.address) as c:
            c.score(GROUP, model="rm")
        saved[name] = scrape(sp.metrics_port).get(key, 0.0) - before
    assert saved["proc"] == saved["thread"] > 0


def test_killed_worker_is_an_error_then_restarted(servers) -> None:
    sp = servers["proc"]
    want = _answers(sp.address)
    olds = set(_workers(sp.log())["rm"].values())
    for pid in olds:  # both of its workers: the next batch finds a dead one
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: not any(map(_alive, olds)), 10)
    with RewardClient(sp.address, max_retries=0) as c:
        with pytest.raises(RewardServiceError) as ei:
            c.score(PAIRS, model="rm")
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        assert "forward process" in ei.value.details and "restarted" in ei.value.details
        # the other models never noticed
        rm2 = [r.score for r in c.score(PAIRS, model="rm2")]
        assert rm2 == _answers(sp.address, "rm2")[0][: len(PAIRS)]
    # the replacements answer (a request waits for one; the client retries a batch sent to the
    # other dead worker), with the same numbers; each slot is replaced (in the background, a
    # few seconds) once a batch found it dead
    end = time.monotonic() + 90
    while True:
        assert _answers(sp.address) == want
        new = _workers(sp.log())["rm"]
        if all(p not in olds and _alive(p) for p in new.values()):
            break
        assert time.monotonic() < end, f"rm's workers not all replaced: {new} (killed {olds})"
        time.sleep(0.2)
    assert sp.proc.poll() is None
    assert "exited (signal 9) during a batch" in sp.log()


def test_reload_moves_to_new_worker_processes(servers) -> None:
    sp = servers["proc"]
    want_b = _answers(sp.address, "b")[0]  # scores (a lone head is named after its model)
    old = set(_workers(sp.log())["rm"].values())
    with grpc.insecure_channel(sp.address) as ch:
        r = pb_grpc.AdminServiceStub(ch).ReloadModel(
            pb.ReloadModelRequest(model="rm", source=str(servers["b"])),
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            timeout=180,
        )
    assert r.status == "reloaded"
    new = set(_workers(sp.log())["rm"].values())
    assert len(new) == 2 and not new & old and all(map(_alive, new))
    assert _answers(sp.address, "rm")[0] == want_b
    _wait(lambda: not any(map(_alive, old)), 30)  # the old version's workers stop after its window


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_no_worker_outlives_the_server(tiny_ckpts, tmp_path, how) -> None:
    sp = start_server(
        ["--reward-model", str(tiny_ckpts.reward), "--forward-process"], tmp_path, timeout=180
    )
    try:
        with RewardClient(sp.address) as c:
            assert len(c.score(PAIRS)) == len(PAIRS)
        workers = [
            c.pid
            for c in psutil.Process(sp.proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(c.cmdline())
        ]
        # the default: one worker per usable core
        assert len(workers) == len(os.sched_getaffinity(0)) and all(map(_alive, workers))
        if how == "sigterm":
            assert sp.terminate(60) == 0
        else:
            sp.proc.kill()
            sp.proc.wait(10)
        _wait(lambda: not any(map(_alive, workers)), 15)
    finally:
        sp.stop()
