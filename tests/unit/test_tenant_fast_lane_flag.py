"""`--tenant-fast-lane` / `--no-tenant-fast-lane` reach each model's batcher (docs/API.md,
"Tenants")."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_server.cli import build_parser, config_from_args
from reward_server.engine.engine import Engine


class _Runner:
    def forward(self, items: list) -> list:
        return list(items)


@pytest.mark.parametrize(("flags", "on"), [([], True), (["--no-tenant-fast-lane"], False)])
def test_the_fast_lane_flag_reaches_the_batcher(flags, on):
    args = build_parser().parse_args(["serve", "--reward-model", "rm=/nonexistent", *flags])
    cfg = config_from_args(args)
    assert cfg.tenant_fast_lane is on
    engine = Engine(cfg)
    engine._worker = ThreadPoolExecutor(1)
    engine.max_batch_tokens = 2048
    try:
        assert engine._batcher("rm", _Runner()).tenant_fast_lane is on
    finally:
        engine._worker.shutdown()
