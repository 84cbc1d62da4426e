"""The trainer side: the share of a PPO iteration spent blocked on the reward service's RPCs,
with and without overlapping them with generation, side by side against one real server.

    python -m bench trainer --kind small --modes none,chunk,batch --repeats 3

Each mode is a short `policy-trainer ppo` run (a subprocess, the real CLI) against the same
`reward-server serve` process on loopback; the modes run in a rotating order per repeat. The
policy starts from the reference checkpoint, as in real RLHF. `rollout.overlap`:

- ``none``: each chunk's Score and ReferenceLogProbs are awaited as soon as they are sent (how a
  trainer that calls its reward model synchronously after generating works);
- ``chunk``: chunk i's RPCs run while chunk i+1 is sampled; each chunk's policy forward follows
  its own generation, so the last chunk's RPCs overlap only that chunk's forward;
- ``batch`` (the default): all chunks are sampled first, then all policy forwards run while the
  last chunks' RPCs finish.

By default the server and the trainer get one thread each (`--server-threads`,
`--trainer-threads`), so on a 2-core machine each has a core, as on separate machines.
The first iteration of each run (warm-up, compilation of kernels, first RPCs) is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import machine
from bench.models import DEFAULT_DIR, build
from bench.servers import REPO, start_reward_server
from reward_server.tiny import WORDS

TIMES = (
    "iteration_seconds",
    "rpc_wait_seconds",
    "rpc_wait_share",
    "generation_seconds",
    "policy_forward_seconds",
    "update_seconds",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="small", help="shape of the policy and the reference")
    p.add_argument("--reward-kind", default="", help="shape of the reward model (default: --kind)")
    p.add_argument("--modes", default="none,chunk,batch")
    p.add_argument("--prompts-per-iteration", type=int, default=16)
    p.add_argument("--samples", type=int, default=2, help="responses per prompt")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--iterations", type=int, default=4, help="per run; the first is warm-up")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--trainer-threads", type=int, default=1)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of 8..24 benchmark words (one token each)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def trainer_config(a: argparse.Namespace, policy: Path, address: str, out_dir: Path) -> dict:
    """A `policy-trainer ppo` config for one run."""
    return {
        "model": {"policy": str(policy), "value_model": "shared"},
        "data": {"prompts": prompts(4 * a.prompts_per_iteration), "max_prompt_tokens": 32},
        "rollout": {
            "prompts_per_iteration": a.prompts_per_iteration,
            "samples_per_prompt": a.samples,
            "chunk_size": a.chunk_size,
            "max_new_tokens": a.max_new_tokens,
            "min_new_tokens": a.max_new_tokens // 2,
        },
        "server": {"address": address, "retry_budget_seconds": 60},
        "ppo": {"epochs": 1, "minibatch_size": a.chunk_size},
        "run": {
            "output_dir": str(out_dir),
            "iterations": a.iterations,
            "seed": 0,
            "save_every": 0,
            "plot_every": a.iterations,
            "progress": False,
            "num_threads": a.trainer_threads,
        },
    }


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_trainer(
    cfg: dict, mode: str, workdir: Path, threads: int, server_pid: int
) -> tuple[list[dict], dict]:
    """One trainer run in `mode`; returns its metrics lines and the machine's load meanwhile
    (ours = the server and the trainer)."""
    path = workdir / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out_dir = Path(cfg["run"]["output_dir"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "policy_trainer.cli", "ppo", "--config", str(path)]
    cmd.append(f"rollout.overlap={mode}")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    meter, cpu0 = machine.LoadMeter([server_pid]), _children_cpu()
    log, _ = proc.communicate()
    window = meter.stop()
    window.ours_cores += (_children_cpu() - cpu0) / window.seconds
    load = window.summary()
    if proc.returncode != 0:
        raise RuntimeError(f"trainer ({mode}) exited {proc.returncode}:\n{log.decode()[-3000:]}")
    lines = [json.loads(s) for s in (out_dir / "metrics.jsonl").read_text().splitlines() if s]
    return lines, load


def summarise(lines: list[dict]) -> dict:
    """Means over the iterations after the first."""
    kept = lines[1:] or lines
    return {k: statistics.mean(m[k] for m in kept) for k in TIMES}


def run(a: argparse.Namespace) -> dict:
    reward = build(a.reward_kind or a.kind, "reward", a.models_dir)
    reference = build(a.kind, "reference", a.models_dir)
    modes = a.modes.split(",")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = f"{a.kind}-rm-{a.reward_kind}" if a.reward_kind else a.kind
    workdir = a.out / f"trainer-{label}-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--reward-model", str(reward), "--reference-model", str(reference)]
    env = {"OMP_NUM_THREADS": str(a.server_threads)}
    sp = start_reward_server("trainer-bench", args, a.out / "logs", env=env)
    rows = []
    try:
        for rep in range(a.repeats):
            for k in range(len(modes)):
                mode = modes[(rep + k) % len(modes)]
                cfg = trainer_config(a, reference, sp.address, workdir / f"{mode}-{rep}")
                lines, load = run_trainer(cfg, mode, workdir, a.trainer_threads, sp.proc.pid)
                rows.append({"repeat": rep, "mode": mode, **summarise(lines), "load": load})
                print(json.dumps(rows[-1]))
    finally:
        sp.stop()
    table = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        table[mode] = {k: statistics.median(r[k] for r in mine) for k in TIMES}
    print(f"\n{'mode':8s} " + " ".join(f"{k:>22s}" for k in TIMES))
    for mode, vals in table.items():
        print(f"{mode:8s} " + " ".join(f"{vals[k]:22.3f}" for k in TIMES))
    out = {
        "config": {k: str(v) for k, v in vars(a).items()},
        "rows": rows,
        "medians": table,
        "machine": machine.describe(),
    }
    (a.out / f"trainer-{label}-{stamp}.json").write_text(json.dumps(out, indent=1))
    return out
