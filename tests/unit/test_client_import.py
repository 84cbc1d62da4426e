"""`reward_server.client` must import without torch or transformers."""

import subprocess
import sys


def test_client_imports_without_torch():
    code = (
        "import sys, reward_server.client, reward_server.fingerprint; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_split_targets_and_chunks():
    from reward_server.client import chunks, split_targets

    assert split_targets("h1:1,h2:2") == ["h1:1", "h2:2"]
    assert split_targets("dns:///svc.ns:50051") == ["dns:///svc.ns:50051"]
    assert chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunks(0, 3) == []


def test_retry_policy_leaves_in_channel_retries_to_grpc_and_failover_to_itself():
    import grpc
    import pytest

    from reward_server.client import RetryPolicy, RewardServiceError
    from reward_server.client.retry import Failure

    one = RetryPolicy(targets=1, max_retries=8, backoff_base=0.1, backoff_max=1.0)
    assert one.service_config_retry() == {
        "maxAttempts": 5,  # gRPC's cap
        "initialBackoff": "0.100s",
        "maxBackoff": "1.000s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
    }
    assert RetryPolicy(targets=1, max_retries=0).service_config_retry() is None
    two = RetryPolicy(targets=2, max_retries=1)
    assert two.service_config_retry() is None  # the client fails over between the channels
    state = two.start("Score", ["a:1", "b:2"])
    down = Failure(grpc.StatusCode.UNAVAILABLE, "down")
    step = state.after_failure([(0, down)])
    assert step.target == 1 and step.wait_serving_until is None
    with pytest.raises(RewardServiceError, match=r"gave up after 2 attempt") as ei:
        state.after_failure([(1, down)])  # max_retries=1 spent
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    bad = Failure(grpc.StatusCode.INVALID_ARGUMENT, "item 0")
    with pytest.raises(RewardServiceError) as ei:
        two.start("Score", ["a:1", "b:2"]).after_failure([(0, down), (1, bad)])
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT  # never retried


def test_a_budget_starts_new_rounds_then_gives_up():
    import grpc
    import pytest

    from reward_server.client import RetryPolicy, RewardServiceError
    from reward_server.client.retry import Failure

    late = Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
    policy = RetryPolicy(targets=1, timeout=1.0, backoff_base=0.01, budget_seconds=60.0)
    state = policy.start("Score", ["a:1"])
    step = state.after_failure([(0, late)])  # DEADLINE_EXCEEDED of a round is retried too
    assert step.wait_serving_until == pytest.approx(state.start + 60.0)  # one address: wait
    assert state.remaining() == pytest.approx(1.0, abs=0.05)  # a fresh deadline
    with pytest.raises(RewardServiceError) as ei:  # without a budget it is final
        RetryPolicy(targets=1).start("Score", ["a:1"]).after_failure([(0, late)])
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    spent = RetryPolicy(targets=1, budget_seconds=0.0).start("Score", ["a:1"])
    with pytest.raises(RewardServiceError, match="retry budget of 0s spent"):
        spent.after_failure([(0, Failure(grpc.StatusCode.UNAVAILABLE, "down"))])
