"""The 2-minute version of `bench soak`: mixed normal and hostile traffic (malformed bytes,
oversize inputs and messages, unknown models, cancelled calls, expired deadlines, aborted
streams) against a real server; after the warm-up its memory stays flat (< 5% growth) and so do
its open file descriptors. The 1-hour figure is in docs/BENCHMARKS.md ("Soak")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_two_minute_soak_keeps_memory_and_descriptors_flat(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "bench", "soak", "--duration", "120", "--warmup", "30",
         "--sample-every", "5", "--clients", "3", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (result_file,) = tmp_path.glob("soak-*.json")
    res = json.loads(result_file.read_text())
    kinds = {k.split()[0] for k in res["outcomes"]}
    assert {"score", "logprobs", "cancelled", "stream-abort", "error"} <= kinds, res["outcomes"]
    codes = {k for k in res["outcomes"] if k.startswith("error")}
    assert {
        "error INVALID_ARGUMENT",
        "error DEADLINE_EXCEEDED",
        "error RESOURCE_EXHAUSTED",
    } <= codes, codes
    assert not {"error INTERNAL", "error UNKNOWN"} & codes, codes
    assert res["rss_growth_after_warmup"] < 0.05, res["rss_growth_after_warmup"]
    lo, hi = res["fds_after_warmup"]
    assert hi - lo <= 2, res["fds_after_warmup"]
    assert len(list(tmp_path.glob("soak-*.png"))) == 1
    (log,) = (tmp_path / "logs").glob("soak-*.log")
    assert "malloc settings" in log.read_text()  # the server set its allocator itself
