"""Forward time against batch shape, in-process: is a forward's cost linear in padded tokens on
this device (the batcher's cost model), or does a small batch cost nearly as much as a full one?

    python -m bench.shapes --kind gpt2-1b --device cuda
"""

from __future__ import annotations

import argparse
import json

from bench.inprocess import forward_seconds
from bench.models import DEFAULT_DIR, build

SHAPES = [(1, 64), (1, 256), (8, 128), (16, 256), (41, 153), (64, 128), (64, 256), (128, 128)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="gpt2-small")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    import torch

    from reward_server.devices import resolve_dtype
    from reward_server.models.reward import RewardRunner

    dtype = torch.float32 if a.device == "cpu" else resolve_dtype("auto", a.device)
    runner = RewardRunner(
        "rm", str(build(a.kind, "reward", DEFAULT_DIR)), device=a.device, dtype=dtype
    )
    runner.forward(runner.warmup_items(16384, 128))
    for b, t in SHAPES:
        s = forward_seconds(runner, b, t)
        row = {"batch": b, "length": t, "tokens": b * t, "ms": round(s * 1e3, 2)}
        row["us_per_token"] = round(s * 1e6 / (b * t), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
