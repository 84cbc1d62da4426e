"""Tenants through the real server: named tokens, tenant metadata with auth off, the HTTP door's
X-Tenant header, per-tenant metrics and per-tenant queue quotas."""

from __future__ import annotations

import json
import threading
import urllib.request

import grpc
import pytest

from reward_server.client import RewardClient, RewardServiceError
from tests.conftest import free_port, start_server

pytestmark = pytest.mark.integration
PAIRS = [("the cat", " sat on the mat"), ("a dog", " ran"), ("one", " two three")]


def _m(samples: dict[str, float], name: str, **labels: str) -> float:
    key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return samples.get(f"reward_server_{name}{{{key}}}", 0.0)


def test_named_tokens_are_tenants_in_the_metrics(tiny_ckpts, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("alice:tok-alice\nbob:tok-bob\nunnamed-token\nops:tok-ops\n")
    sp = start_server(
        [
            "--reward-model",
            f"rm={tiny_ckpts.reward}",
            "--auth-token-file",
            str(token_file),
            "--stats-viewers",
            "ops",
        ],
        tmp_path,
        metrics=True,
        ready_kwargs={"token": "tok-alice"},
    )
    try:
        # alice claims bob's tenant in metadata: ignored, the token names the tenant
        with RewardClient(sp.address, token="tok-alice", tenant="bob") as c:
            alice_tokens = sum(c.score(PAIRS[:1])[0].num_tokens for _ in range(3))
        with RewardClient(sp.address, token="tok-bob") as c:
            bob_tokens = sum(r.num_tokens for r in c.score(PAIRS))
        with RewardClient(sp.address, token="unnamed-token") as c:
            assert len(c.score(PAIRS[:2])) == 2
        m = sp.metrics()
        # requests: Score, and the client's GetServerInfo (it learns the request size limit)
        assert _m(m, "tenant_requests_total", tenant="alice", code="OK") >= 3
        assert _m(m, "tenant_requests_total", tenant="bob", code="OK") >= 1
        assert _m(m, "tenant_requests_total", tenant="token-3", code="OK") >= 1
        assert _m(m, "tenant_items_total", tenant="token-3") == 2
        assert _m(m, "tenant_items_total", tenant="alice") == 3
        assert _m(m, "tenant_items_total", tenant="bob") == 3
        assert _m(m, "tenant_queue_seconds_count", model="rm", tenant="alice") == 3
        assert _m(m, "tenant_queue_seconds_count", model="rm", tenant="bob") == 3
        assert _m(m, "tenant_tokens_total", model="rm", tenant="alice") == alice_tokens
        assert _m(m, "tenant_tokens_total", model="rm", tenant="bob") == bob_tokens
        # GetStats: a tenant sees its own telemetry windows only; a stats viewer sees them all
        with RewardClient(sp.address, token="tok-alice") as c:
            assert [w.tenant for w in c.stats().windows] == ["alice"]
            assert [w.tenant for w in c.stats(tenant="alice").windows] == ["alice"]
            with pytest.raises(RewardServiceError) as err:
                c.stats(tenant="bob")
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "'alice'" in err.value.details and "'bob'" in err.value.details
            assert len(c.score(PAIRS[:1])) == 1  # and the caller keeps being served
        with RewardClient(sp.address, token="tok-ops") as c:
            assert {w.tenant for w in c.stats().windows} == {"alice", "bob", "token-3"}
            assert [w.tenant for w in c.stats(tenant="bob").windows] == ["bob"]
        # no label value is ever a token
        assert not any("tok-" in key or "unnamed-token" in key for key in m)
        assert "tok-alice" not in sp.log() and "unnamed-token" not in sp.log()
    finally:
        sp.stop()


def test_metadata_tenants_quotas_and_the_http_header(tiny_ckpts, tmp_path):
    http_port = free_port()
    sp = start_server(
        [
            "--reward-model",
            f"rm={tiny_ckpts.reward}",
            "--tenant-max-queued-items",
            "2",
            "--tenant-quota",
            "calm=64",
            "--tenant-share",
            "calm=2",
            "--max-metadata-tenants",
            "2",
            "--http-port",
            str(http_port),
        ],
        tmp_path,
        metrics=True,
    )
    try:
        # over its quota in one request: RESOURCE_EXHAUSTED naming the tenant; another tenant
        # with a larger quota is served the same request
        with RewardClient(sp.address, tenant="hog", max_retries=0) as hog:
            with pytest.raises(RewardServiceError) as err:
                hog.score(PAIRS)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant 'hog'" in err.value.details and "quota of 2" in err.value.details
            assert len(hog.score(PAIRS[:2])) == 2  # within its quota
        with RewardClient(sp.address, tenant="calm") as calm:
            assert len(calm.score(PAIRS)) == 3

        # hog floods (2-item requests from 16 threads), calm keeps being served meanwhile
        hog_codes: list[grpc.StatusCode] = []
        stop = threading.Event()

        def flood() -> None:
            with RewardClient(sp.address, tenant="hog", max_retries=0) as c:
                while not stop.is_set():
                    try:
                        c.score([(p, c_ * 20) for p, c_ in PAIRS[:2]])
                        hog_codes.append(grpc.StatusCode.OK)
                    except RewardServiceError as exc:
                        hog_codes.append(exc.code)
                        assert "tenant 'hog'" in exc.details

        threads = [threading.Thread(target=flood) for _ in range(16)]
        for t in threads:
            t.start()
        try:
            with RewardClient(sp.address, tenant="calm", max_retries=0) as calm:
                for _ in range(20):
                    assert len(calm.score(PAIRS)) == 3
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert set(hog_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert grpc.StatusCode.OK in hog_codes

        # a malformed tenant name is INVALID_ARGUMENT; names beyond the cap count as "other"
        with RewardClient(sp.address, tenant="not a name", max_retries=0) as bad:
            with pytest.raises(RewardServiceError) as err:
                bad.score(PAIRS[:1])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with RewardClient(sp.address, tenant="third") as c:  # beyond hog and calm: "other"
            c.score(PAIRS[:1])
        with RewardClient(sp.address) as c:  # no tenant: "default"
            c.score(PAIRS[:1])

        # the HTTP door: the X-Tenant header
        body = json.dumps({"items": [{"prompt": "a", "completion": " b"}]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/score",
            body,
            {"Content-Type": "application/json", "X-Tenant": "web"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert len(json.loads(resp.read())["scores"]) == 1

        m = sp.metrics()
        assert _m(m, "tenant_requests_total", tenant="hog", code="RESOURCE_EXHAUSTED") >= 1
        assert _m(m, "tenant_requests_total", tenant="calm", code="OK") >= 21
        assert _m(m, "tenant_items_total", tenant="calm") == 63
        assert _m(m, "tenant_requests_total", tenant="calm", code="RESOURCE_EXHAUSTED") == 0
        assert _m(m, "tenant_items_total", tenant="other") == 2  # third, web
        assert _m(m, "tenant_items_total", tenant="default") == 2  # no name, a bad name
        assert not any('tenant="third"' in k or 'tenant="web"' in k for k in m)
        assert _m(m, "dropped_items_total", model="rm", reason="tenant_quota") >= 3
    finally:
        sp.stop()
