"""python -m bench COMMAND ...: the benchmark commands (each writes JSON under runs/bench/)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "models": ("bench.models", "build the random-init benchmark checkpoints"),
    "compare": ("bench.compare", "server vs in-process limit vs naive server, interleaved"),
    "latency": ("bench.latency", "one client, one item: p50 against the in-process time"),
    "curves": ("bench.curves", "throughput and p99 against concurrency and length (PNG)"),
    "reference": ("bench.reference", "ReferenceLogProbs memory, throughput and protobuf cost"),
    "budget": ("bench.budget", "in-process throughput against the padded-token budget"),
    "onnx": ("bench.onnx_speed", "ONNX Runtime against torch on the same batches"),
    "quantized": ("bench.quantized", "bitsandbytes 8/4-bit reward models: ranks and memory"),
    "groups": ("bench.groups", "k samples of a prompt: prefix sharing against unshared"),
    "report": ("bench.report", "markdown tables of saved compare results"),
    "soak": ("bench.soak", "hours of mixed and hostile traffic: server RSS and descriptors"),
    "fuzz": ("bench.fuzz", "random and hostile input on every RPC: counts by status code"),
    "profile": ("bench.profile", "py-spy: where the server's time goes, by thread and job"),
    "tenants": ("bench.tenants", "fair sharing: a light tenant beside a heavy one, shares 3:1"),
    "telemetry": ("bench.telemetry", "reward-hacking telemetry: its cost per item on Score"),
    "trainer": (
        "bench.trainer_rpc",
        "PPO iteration time blocked on RPCs, overlap modes side by side",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:10s} {help_}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    mod = importlib.import_module(COMMANDS[argv[0]][0])
    if argv[0] == "models":
        mod.main(argv[1:])
        return
    p = argparse.ArgumentParser(prog=f"python -m bench {argv[0]}", description=mod.__doc__)
    mod.add_arguments(p)
    mod.run(p.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
