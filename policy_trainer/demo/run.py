"""The demo pipeline: synthetic task -> SFT -> preferences -> `reward-server train` ->
`reward-server serve` (own process) -> `policy-trainer ppo`, `policy-trainer best-of-n` and
`policy-trainer dpo` against it over gRPC -> before/after report and the three methods compared.

Every stage after SFT runs through the real command lines, as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent


def _cli(name: str) -> list[str]:
    exe = BIN / name
    if exe.exists():
        return [str(exe)]
    module = "reward_server.cli" if name == "reward-server" else "policy_trainer.cli"
    return [sys.executable, "-m", module]


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def ppo_config(out: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """The PPO run config (written to out/ppo.yaml)."""
    over = args.overoptimization
    return {
        "model": {"policy": str(out / "sft"), "value_model": "shared"},
        "data": {"prompts": str(out / "prompts.jsonl"), "max_prompt_tokens": 8},
        "rollout": {
            "prompts_per_iteration": args.prompts_per_iteration,
            "samples_per_prompt": 2,
            "chunk_size": args.prompts_per_iteration,
            "temperature": 1.0,
            "max_new_tokens": args.max_new_tokens,
            "missing_eos_penalty": 4.0,
            # Log-probs under the distribution sampled from: under the full softmax the policy
            # put its first-token mass on the (never sampled) EOS and its measured KL fell to ~0.
            "logprobs_as_sampled": True,
        },
        "server": {"address": f"127.0.0.1:{port}", "timeout": 60.0},
        "ppo": {
            "advantage_estimator": "gae",
            "kl_estimator": "k1",
            # Fixed beta; near 0 for the over-optimisation run (Gao et al. 2022). Beta 0.5 and 150
            # iterations: PPO converges toward the KL-regularised optimum pi_ref * exp(r / beta)
            # (Ziegler et al. 2019, section 2.2, eq. 2), here at a KL of ~2.4 nats, inside
            # best-of-64's 3.17; beta 0.1 kept the policy climbing the proxy past the gold peak
            # (KL 7.1 after 60 iterations, gold 0.67x best-of-64's), beta 0.3 ends at 3.3 nats.
            "kl_coef": 0.0005 if over else args.beta,
            "adaptive_kl": False,
            "epochs": 4,
            "minibatch_size": 16,
            "lr": args.lr,
            "vf_coef": 0.1,
            "max_grad_norm": 1.0,
        },
        "run": {
            "output_dir": str(out / "ppo"),
            "iterations": args.iterations,
            "seed": args.seed,
            "save_every": 0,
            "keep_checkpoints": 1,
            "plot_every": 5,
            "num_threads": 1,
            "sample_metrics": "policy_trainer.demo.task:gold_metrics",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m policy_trainer.demo", description=__doc__)
    p.add_argument("--output", default="runs/demo", help="run directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--overoptimization",
        action="store_true",
        help="beta near 0: watch the proxy rise while gold falls",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=150,
        help="PPO iterations",
    )
    p.add_argument("--prompts-per-iteration", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.5, help="fixed KL coefficient")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--pairs", type=int, default=20000, help="training preference pairs")
    # 3,000 held-out pairs: the RM accuracy's sampling error is ~ +-0.6 points (800: +-1.2)
    p.add_argument("--heldout-pairs", type=int, default=3000)
    p.add_argument(
        "--rm-epochs",
        type=int,
        default=None,
        help="reward model epochs (default 3; 2 with --overoptimization)",
    )
    p.add_argument(
        "--rm-lr",
        type=float,
        default=None,
        help="reward model learning rate (default 3e-3; 1e-3 with --overoptimization)",
    )
    p.add_argument("--eval-prompts", type=int, default=512)
    p.add_argument(
        "--bon-n",
        default="1,4,16,64",
        help="best-of-n: the n values (one `policy-trainer best-of-n` run each)",
    )
    p.add_argument(
        "--bon-prompts",
        type=int,
        default=256,
        help="best-of-n: the first this many evaluation prompts",
    )
    p.add_argument("--dpo-epochs", type=int, default=1, help="DPO passes over the RM's pairs")
    p.add_argument("--dpo-lr", type=float, default=3e-4)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.monotonic()
    out = Path(args.output)
    if (out / "ppo").exists():
        import shutil

        shutil.rmtree(out / "ppo")
    out.mkdir(parents=True, exist_ok=True)

    import random

    import torch

    from policy_trainer.demo.prefs import build_preferences
    from policy_trainer.demo.sft import train_sft
    from policy_trainer.demo.task import sample_prompts

    # One intra-op thread everywhere (this process, reward-server train, the trainer runs, the
    # server): the model is tiny, and on a shared 2-core machine a second OpenMP thread that is
    # descheduled stalls every parallel region (measured 2026-11-27 under load: an SFT step took
    # 2.35 s with 2 threads, 0.08 s with 1).
    torch.set_num_threads(1)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    _step("1/8 synthetic task and SFT: a tiny GPT-2 learns well-formed, unremarkable responses")
    train_sft(out / "sft", steps=args.sft_steps, seed=args.seed)
    with open(out / "prompts.jsonl", "w") as fh:
        for pr in sample_prompts(2000, random.Random(args.seed + 7)):
            fh.write(json.dumps({"prompt": pr.text}) + "\n")

    _step(
        "2/8 preference pairs sampled from SFT, labelled by the hidden gold function (Bradley-Terry noise)"
    )
    prefs = build_preferences(
        out / "sft", out / "prefs", n_train=args.pairs, n_heldout=args.heldout_pairs, seed=args.seed
    )
    print(
        f"{args.pairs} training pairs, {args.heldout_pairs} held out; Bayes ceiling of the noisy labels {prefs['bayes_ceiling']:.3f}"
    )

    _step("3/8 reward model: reward-server train (Bradley-Terry, initialised from the SFT model)")
    rm_cmd = [
        *_cli("reward-server"),
        "train",
        "--data",
        str(prefs["train"]),
        "--eval-data",
        str(prefs["heldout"]),
        "--base-model",
        str(out / "sft"),
        "--output",
        str(out / "rm"),
        "--epochs",
        str(args.rm_epochs or (2 if args.overoptimization else 3)),
        "--batch-size",
        "32",
        "--lr",
        # the over-optimisation run keeps the weaker proxy (held-out 0.858 against 0.872): a
        # smaller or less trained reward model is over-optimised sooner (Gao et al. 2022, s3)
        str(args.rm_lr or (1e-3 if args.overoptimization else 3e-3)),
        "--max-length",
        "32",
        "--seed",
        str(args.seed),
        "--no-progress",
    ]
    subprocess.run(rm_cmd, check=True, env=one_thread)
    rm_evals = [
        json.loads(line) for line in (out / "rm" / "metrics.jsonl").read_text().splitlines()
    ]
    rm_eval = [m for m in rm_evals if m.get("eval_accuracy") is not None][-1]

    _step(
        "4/8 reward-server serve: the reward model and the SFT model (as reference) in their own process"
    )
    from reward_server.client import RewardClient
    from reward_server.local_server import start_local_server

    server = start_local_server(
        [
            *("--reward-model", f"rm={out / 'rm'}"),
            *("--reference-model", f"sft={out / 'sft'}"),
            *("--max-wait-ms", "2"),
        ],
        out,
        program=_cli("reward-server"),
        log_name="server.log",
        env={"OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    port = server.port
    client = RewardClient(server.address, timeout=60)
    try:
        print(f"server SERVING on {server.address} (log: {server.log_path})")

        _step(f"5/8 policy-trainer ppo against the server over gRPC ({args.iterations} iterations)")
        cfg = ppo_config(out, port, args)
        (out / "ppo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        subprocess.run(
            [*_cli("policy-trainer"), "ppo", "--config", str(out / "ppo.yaml")], check=True
        )
        metrics = [
            json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()
        ]
        # the server's telemetry window of the PPO run (before best-of-n and DPO score too)
        server_stats = server_telemetry(client)

        from policy_trainer.checkpoint import latest_checkpoint
        from policy_trainer.demo import methods
        from policy_trainer.demo.evaluate import compare, plot_curves

        final = latest_checkpoint(out / "ppo")
        assert final is not None, "the PPO run left no checkpoint"
        eval_prompts = sample_prompts(args.eval_prompts, random.Random(args.seed + 100))
        ns = [int(x) for x in args.bon_n.split(",") if x.strip()]
        _step(
            f"6/8 policy-trainer best-of-n from SFT, scored by the same reward model, n = {ns} "
            f"({args.bon_prompts} prompts)"
        )
        bon = methods.run_best_of_n(
            out,
            server.address,
            ns,
            eval_prompts[: args.bon_prompts],
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            cli=_cli("policy-trainer"),
        )
        _step("7/8 policy-trainer dpo on the reward model's training pairs (reference: the server)")
        dpo_policy, dpo_last = methods.run_dpo(out, server.address, args, _cli("policy-trainer"))

        _step("8/8 evaluation: SFT, PPO and DPO on the same fresh prompts (KL via the server)")
        res = compare(
            out / "sft",
            final / "policy",
            client,
            n=args.eval_prompts,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            missing_eos_penalty=cfg["rollout"]["missing_eos_penalty"],
        )
        evals = {}
        for i, (name, path) in enumerate(
            (("sft", out / "sft"), ("ppo", final / "policy"), ("dpo", dpo_policy))
        ):
            evals[name] = methods.evaluate_policy(
                path,
                eval_prompts,
                client,
                reference="sft",
                seed=args.seed + 200 + i,
                max_new_tokens=args.max_new_tokens,
                missing_eos_penalty=cfg["rollout"]["missing_eos_penalty"],
            )
    finally:
        client.close()
        code = server.terminate(timeout=60)
    tail = metrics[-5:]
    points = {
        k: methods.policy_summary(v, evals["sft"] if k != "sft" else None) for k, v in evals.items()
    }
    points["ppo"]["kl_training_final"] = sum(m["kl_mean"] for m in tail) / len(tail)
    points["dpo"]["training"] = {
        k: dpo_last[k]
        for k in ("step", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        if k in dpo_last
    }
    points["dpo"]["config"] = {"beta": args.dpo_beta, "lr": args.dpo_lr, "epochs": args.dpo_epochs}
    summary = {
        "rm_heldout_accuracy": rm_eval["eval_accuracy"],
        "rm_heldout_loss": rm_eval["eval_loss"],
        "rm_bayes_ceiling": prefs["bayes_ceiling"],
        "rm_heldout_gold_accuracy": prefs["gold_accuracy"],
        **{k: v for k, v in res.items() if k != "examples_final"},
        "kl_final": sum(m["kl_mean"] for m in tail) / len(tail),
        "proxy_reward_first_iteration": metrics[0]["reward_mean"],
        "gold_reward_first_iteration": metrics[0].get("gold_reward_mean"),
        "beta": cfg["ppo"]["kl_coef"],
        "iterations": args.iterations,
        "overoptimization": args.overoptimization,
        "server_exit_code": code,
        "seed": args.seed,
        "wall_seconds": time.monotonic() - t_start,
        "examples_final": res["examples_final"],
        "sft": points["sft"],
        "ppo": points["ppo"],
        "best_of_n": bon,
        "dpo": points["dpo"],
        "comparison": methods.compare_methods(bon, points, metrics),
        "telemetry": telemetry_summary(metrics, server_stats),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    title = (
        "beta ~ 0: over-optimisation"
        if args.overoptimization
        else f"PPO, beta {cfg['ppo']['kl_coef']}"
    )
    plot_curves(metrics, out / "curves.png", title)
    methods.plot_methods(
        out / "methods.png",
        bon,
        metrics,
        {k: points[k] for k in ("sft", "ppo", "dpo")},
        title=f"seed {args.seed}: best-of-n, PPO (beta {cfg['ppo']['kl_coef']}) and DPO on one reward model",
    )
    print_report(summary, out)
    return 0 if code == 0 else 1


TELEMETRY_KEYS = ("score_mean", "score_std", "length_corr", "score_drift_sigma")
"""The trainer's reward-hacking figures (metrics.jsonl keys ``telemetry/...``) in the summary."""


def server_telemetry(client: Any) -> dict[str, Any]:
    """The server's telemetry window of the reward model (GetStats): its last items' figures."""
    resp = client.stats(model="rm")
    if not resp.windows:
        return {}
    w = resp.windows[0]
    return {
        "window_items": w.window_items,
        "total_items": w.total_items,
        "score_mean": w.score_mean,
        "baseline_mean": w.baseline_mean,
        "drift_sigma": w.drift_sigma,
        "length_correlation": w.length_correlation,
    }


def telemetry_summary(metrics: list[dict[str, Any]], server: dict[str, Any]) -> dict[str, Any]:
    """The reward-hacking figures at the start of PPO (mean of the first 5 iterations) and at
    its end (the last 5), from the trainer's metrics.jsonl, and the server's window."""

    def mean(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [m[key] for m in rows if m.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Any] = {}
    for key in TELEMETRY_KEYS:
        out[f"{key}_first"] = mean(metrics[:5], f"telemetry/{key}")
        out[f"{key}_final"] = mean(metrics[-5:], f"telemetry/{key}")
    out["server"] = server
    return out


def print_report(s: dict[str, Any], out: Path) -> None:
    """The before/after table."""
    rows = [
        ("gold reward (hidden judge)", s["gold_reward_sft"], s["gold_reward_final"]),
        ("proxy reward (reward model)", s["proxy_reward_sft"], s["proxy_reward_final"]),
        ("KL to reference (nats/seq)", 0.0, s["kl_final"]),
        ("EOS rate", s["eos_rate_sft"], s["eos_rate_final"]),
        ("response length (words)", s["response_length_sft"], s["response_length_final"]),
    ]
    print("\n" + "=" * 64)
    print(f"{'':34s}{'SFT':>12s}{'after PPO':>14s}")
    for name, a, b in rows:
        print(f"{name:34s}{a:12.3f}{b:14.3f}")
    print(f"{'gold win-rate of final vs SFT':34s}{'':12s}{s['gold_win_rate_vs_sft']:14.3f}")
    t = s["telemetry"]
    print(f"{'reward-hacking telemetry (trainer)':34s}{'first 5 it.':>12s}{'last 5 it.':>14s}")
    for key in TELEMETRY_KEYS:
        a, b = t[f"{key}_first"], t[f"{key}_final"]
        fa = "-" if a is None else f"{a:.3f}"
        fb = "-" if b is None else f"{b:.3f}"
        print(f"{'  ' + key:34s}{fa:>12s}{fb:>14s}")
    if t["server"]:
        sv = t["server"]
        print(
            f"server window (last {sv['window_items']} of {sv['total_items']} PPO items): "
            f"length corr {sv['length_correlation']:.3f}, drift {sv['drift_sigma']:.2f} sigma"
        )
    print(
        f"reward model held-out accuracy {s['rm_heldout_accuracy']:.3f} (Bayes ceiling {s['rm_bayes_ceiling']:.3f}), "
        f"loss {s['rm_heldout_loss']:.3f} (ln 2 = 0.693)"
    )
    print(f"(the gold function itself scores {s['rm_heldout_gold_accuracy']:.3f} on these labels)")
    print("final policy samples:")
    for ex in s["examples_final"]:
        print(f"  {ex}")
    print_methods(s)
    print(
        f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'curves.png'}, "
        f"{out / 'methods.png'} in {s['wall_seconds']:.0f}s"
    )


def print_methods(s: dict[str, Any]) -> None:
    """The three methods on the same reward model: gold and proxy reward against KL."""
    print("\n" + "=" * 64)
    print(f"{'method':22s}{'KL (nats)':>11s}{'gold':>9s}{'proxy':>9s}{'win vs SFT':>12s}")
    print(
        f"{'SFT':22s}{s['sft']['kl']:11.3f}{s['sft']['gold_reward']:9.3f}{s['sft']['proxy_reward']:9.3f}"
    )
    for p in s["best_of_n"]["points"]:
        name = f"best-of-{p['n']} (analytic KL)"
        print(f"{name:22s}{p['analytic_kl']:11.3f}{p['gold_reward']:9.3f}{p['proxy_reward']:9.3f}")
    for key, name in (("ppo", "PPO"), ("dpo", "DPO")):
        m = s[key]
        print(
            f"{name:22s}{m['kl']:11.3f}{m['gold_reward']:9.3f}{m['proxy_reward']:9.3f}"
            f"{m['gold_win_rate_vs_sft']:12.3f}"
        )
    c = s["comparison"]
    if c["best_of_n_gold_at_ppo_kl"] is not None:
        print(
            f"PPO / best-of-n gold at PPO's KL {c['ppo_kl']:.2f}: {c['ppo_over_best_of_n_gold']:.3f}"
        )
    elif "largest_n" in c:
        print(
            f"PPO's KL {c['ppo_kl']:.2f} lies beyond best-of-{c['largest_n']}'s; PPO / "
            f"best-of-{c['largest_n']} gold: {c['ppo_over_best_of_largest_n_gold']:.3f}"
        )
