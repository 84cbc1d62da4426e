"""The demo's other methods on the same task, reward model and server as PPO: best-of-n
(`policy-trainer best-of-n`, one run per n) and DPO (`policy-trainer dpo` on the reward model's
own training pairs), and the evaluation that puts all three on one gold-reward-against-KL plot, as
the over-optimisation papers draw it (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", figure 1; Stiennon et al. 2020, figure 5).

KL is measured the same way for every trained policy: sample it on the evaluation prompts, and
average over samples the sum over generated tokens of log pi - log pi_ref, the reference's
log-probs coming from the server's ReferenceLogProbs (the k1 estimator the PPO run logs).
Best-of-n's KL is the analytic ``ln n - (n - 1) / n`` (Stiennon et al. 2020, appendix G.3; an
upper bound on the exact value, Beirami et al. 2024, "Theoretical guarantees on the best-of-n
alignment policy").
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from policy_trainer.best_of_n_config import analytic_kl
from policy_trainer.demo.evaluate import golds, proxy
from policy_trainer.demo.sft import Sample
from policy_trainer.demo.task import Prompt, gold_reward, parse_prompt, response_words


def write_prompts(path: Path, prompts: Sequence[Prompt]) -> Path:
    """Prompts as the trainer reads them ({"prompt": ...} JSONL)."""
    path.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
    return path


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_policy(
    policy_dir: str | Path,
    prompts: Sequence[Prompt],
    client: Any,
    *,
    reference: str,
    seed: int,
    max_new_tokens: int,
    missing_eos_penalty: float,
    batch: int = 256,
) -> dict[str, Any]:
    """One sample per prompt, drawn as the trainer draws rollouts (`sample_responses`: EOS
    suppressed for the first token, no other special tokens); per sample the gold reward, the
    proxy (reward model over RPC, missing-EOS penalty as in PPO) and the k1 KL against the
    server's reference model. Returns arrays (``gold``, ``proxy``, ``kl``) and the samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policy_trainer.models import ActorCritic
    from policy_trainer.rollout import policy_logprobs
    from policy_trainer.sampling import (
        SamplingMask,
        left_pad,
        sample_responses,
        truncate_after_eos,
    )

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = ActorCritic(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), None).eval()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    suppress = sorted({int(i) for i in tok.all_special_ids} - {int(eos)})
    drawn = SamplingMask(int(eos), tuple(suppress), 1)
    gen = torch.Generator().manual_seed(seed)
    samples: list[Sample] = []
    kls: list[float] = []
    for a in range(0, len(prompts), batch):
        part = prompts[a : a + batch]
        p_ids = [tok(p.text)["input_ids"] for p in part]
        q, qm = left_pad(p_ids, pad, torch.device("cpu"))  # [B, P]
        raw = sample_responses(model.policy, q, qm, max_new_tokens, 1.0, eos, pad, gen, 1, suppress)
        resp, rmask, has_eos = truncate_after_eos(raw, eos, pad)  # [B, R]
        logp, _ = policy_logprobs(model, q, qm, resp, rmask, 1.0, drawn)  # [B, R], 0 on padding
        lengths = rmask.sum(dim=1).tolist()
        r_ids = [resp[i, : lengths[i]].tolist() for i in range(len(part))]
        ref = client.reference_logprobs(
            [p + r for p, r in zip(p_ids, r_ids, strict=True)],
            [len(p) for p in p_ids],
            temperature=1.0,
            model=reference,
        )
        for i, p in enumerate(part):
            kls.append(float(logp[i, : lengths[i]].sum()) - float(np.sum(ref[i])))
            text = tok.decode(r_ids[i], skip_special_tokens=True)
            samples.append(Sample(p, text, response_words(text), bool(has_eos[i])))
    return {
        "samples": samples,
        "gold": golds(samples),
        "proxy": proxy(client, samples, missing_eos_penalty),
        "kl": np.array(kls),
    }


def policy_summary(ev: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Means of an `evaluate_policy` result; with ``base`` (SFT on the same prompts), the gold
    win-rate against it (ties count half)."""
    out = {
        "gold_reward": float(ev["gold"].mean()),
        "gold_reward_stderr": float(ev["gold"].std(ddof=1) / np.sqrt(len(ev["gold"]))),
        "proxy_reward": float(ev["proxy"].mean()),
        "kl": float(ev["kl"].mean()),
        "eos_rate": float(np.mean([s.has_eos for s in ev["samples"]])),
        "response_length": float(np.mean([len(s.words) for s in ev["samples"]])),
        "examples": [f"{s.prompt.text} {s.text}" for s in ev["samples"][:3]],
    }
    if base is not None:
        g0, g1 = base["gold"], ev["gold"]
        out["gold_win_rate_vs_sft"] = float(np.mean((g1 > g0) + 0.5 * (g1 == g0)))
    return out


# --------------------------------------------------------------------------- best-of-n
def best_of_n_config(
    out: Path, address: str, n: int, prompts_path: Path, max_new_tokens: int, seed: int
) -> dict[str, Any]:
    """The `policy-trainer best-of-n` config of one n (sampling from SFT, scored by the RM)."""
    return {
        "model": {"policy": str(out / "sft")},
        "data": {"prompts": str(prompts_path), "max_prompt_tokens": 8},
        "sampling": {
            "n": n,
            "chunk_size": min(n, 64),
            "temperature": 1.0,
            "max_new_tokens": max_new_tokens,
        },
        "server": {"address": address, "timeout": 60.0},
        "run": {
            "output_dir": str(out / "best_of_n" / f"n{n}"),
            "seed": seed,
            "progress": True,
            "num_threads": 1,
        },
    }


def run_best_of_n(
    out: Path,
    address: str,
    ns: Sequence[int],
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    seed: int,
    cli: list[str],
) -> dict[str, Any]:
    """`policy-trainer best-of-n` for every n on the same prompts; per n the gold and proxy
    reward of the kept completions at the analytic KL."""
    from transformers import AutoTokenizer

    eos = int(AutoTokenizer.from_pretrained(out / "sft").eos_token_id)
    prompts_path = write_prompts(out / "best_of_n_prompts.jsonl", prompts)
    points = []
    for n in ns:
        cfg = best_of_n_config(out, address, n, prompts_path, max_new_tokens, seed)
        run_dir = Path(cfg["run"]["output_dir"])
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir.parent / f"n{n}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.monotonic()
        subprocess.run(
            [*cli, "best-of-n", "--config", str(run_dir.parent / f"n{n}.yaml")], check=True
        )
        seconds = time.monotonic() - t0
        rows = [json.loads(x) for x in (run_dir / "best_of_n.jsonl").read_text().splitlines()]
        gold = []
        for r in rows:
            ids = r["completion_token_ids"] or []
            has_eos = bool(ids) and ids[-1] == eos  # the kept ids end at EOS
            words = response_words(r["completion"] or "")
            gold.append(gold_reward(parse_prompt(r["prompt"]), words, has_eos))
        best = [r["score"] for r in rows if r["score"] is not None]
        every = [s for r in rows for s in r["scores"] if s is not None]
        points.append(
            {
                "n": n,
                "analytic_kl": analytic_kl(n),
                "gold_reward": float(np.mean(gold)),
                "gold_reward_stderr": float(np.std(gold, ddof=1) / np.sqrt(len(gold))),
                "proxy_reward": float(np.mean(best)),
                "proxy_reward_all_samples": float(np.mean(every)),
                "prompts": len(rows),
                "seconds": seconds,
            }
        )
    return {"prompts": len(prompts), "points": points}


def interpolate(points: list[dict[str, Any]], kl: float) -> float | None:
    """Best-of-n gold reward at ``kl`` by linear interpolation between n values (None outside
    their KL range: no extrapolation)."""
    xs = [p["analytic_kl"] for p in points]
    ys = [p["gold_reward"] for p in points]
    if not xs or kl < min(xs) or kl > max(xs):
        return None
    order = np.argsort(xs)
    return float(np.interp(kl, np.asarray(xs)[order], np.asarray(ys)[order]))


def compare_methods(
    bon: dict[str, Any], points: dict[str, dict[str, Any]], ppo_metrics: list[dict[str, Any]]
) -> dict[str, Any]:
    """The issue's targets, measured: PPO's gold reward at its evaluated KL against best-of-n's
    at the same KL (linear interpolation between n values; outside their range, against the
    largest n, flagged), DPO's gold win-rate against SFT, and PPO's training trajectory (running
    mean of 5 rollout batches) at each best-of-n KL it passes."""
    ppo, dpo = points["ppo"], points["dpo"]
    pts = sorted(bon["points"], key=lambda p: p["analytic_kl"])
    at = interpolate(pts, ppo["kl"])
    out: dict[str, Any] = {
        "ppo_kl": ppo["kl"],
        "ppo_gold_reward": ppo["gold_reward"],
        "best_of_n_gold_at_ppo_kl": at,
        "ppo_over_best_of_n_gold": ppo["gold_reward"] / at if at else None,
        "ppo_kl_beyond_best_of_n": at is None and bool(pts) and ppo["kl"] > pts[-1]["analytic_kl"],
        "dpo_kl": dpo["kl"],
        "dpo_gold_reward": dpo["gold_reward"],
        "best_of_n_gold_at_dpo_kl": interpolate(pts, dpo["kl"]),
        "dpo_gold_win_rate_vs_sft": dpo["gold_win_rate_vs_sft"],
        "ppo_gold_win_rate_vs_sft": ppo["gold_win_rate_vs_sft"],
    }
    if at is None and pts:
        top = pts[-1]
        out["largest_n"] = top["n"]
        out["ppo_over_best_of_largest_n_gold"] = ppo["gold_reward"] / top["gold_reward"]
    kl = _running_mean([m["kl_mean"] for m in ppo_metrics], 5)
    gold = _running_mean([m.get("gold_reward_mean", float("nan")) for m in ppo_metrics], 5)
    along = []
    for p in pts:
        hit = next((i for i, k in enumerate(kl) if k >= p["analytic_kl"]), None)
        if p["n"] > 1 and hit is not None:
            along.append(
                {
                    "n": p["n"],
                    "kl": p["analytic_kl"],
                    "iteration": ppo_metrics[hit]["iteration"],
                    "ppo_training_gold": gold[hit],
                    "best_of_n_gold": p["gold_reward"],
                }
            )
    out["ppo_trajectory_at_best_of_n_kl"] = along
    return out


# --------------------------------------------------------------------------- DPO
def dpo_config(out: Path, address: str, args: Any) -> dict[str, Any]:
    """The `policy-trainer dpo` config: the reward model's training pairs, the server's
    reference model (the SFT policy) for the reference log-probs, full fine-tuning of the tiny
    policy."""
    return {
        "model": {"policy": str(out / "sft")},
        "data": {
            "preferences": str(out / "prefs" / "prefs_train.jsonl"),
            "max_prompt_tokens": 8,
            "max_response_tokens": args.max_new_tokens + 1,
        },
        "server": {"address": address, "reference_model": "sft", "timeout": 60.0},
        "dpo": {
            "loss_type": "sigmoid",
            "beta": args.dpo_beta,
            "epochs": args.dpo_epochs,
            "batch_size": 32,
            "lr": args.dpo_lr,
            "lr_schedule": "linear",
            "ref_batch_size": 256,
        },
        "run": {
            "output_dir": str(out / "dpo"),
            "seed": args.seed,
            "keep_checkpoints": 1,
            "num_threads": 1,
        },
    }


def run_dpo(out: Path, address: str, args: Any, cli: list[str]) -> tuple[Path, dict[str, Any]]:
    """Run `policy-trainer dpo`; return the final policy directory and its last metrics line."""
    from policy_trainer.checkpoint import latest_checkpoint

    if (out / "dpo").exists():
        import shutil

        shutil.rmtree(out / "dpo")
    cfg = dpo_config(out, address, args)
    (out / "dpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([*cli, "dpo", "--config", str(out / "dpo.yaml")], check=True)
    final = latest_checkpoint(out / "dpo")
    assert final is not None, "the DPO run left no checkpoint"
    lines = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return final / "policy", lines[-1]


# --------------------------------------------------------------------------- plot
def plot_methods(
    path: Path,
    bon: dict[str, Any] | None,
    ppo_metrics: list[dict[str, Any]],
    methods: dict[str, dict[str, Any]],
    smooth: int = 5,
    title: str = "",
) -> None:
    """Gold reward (left) and proxy reward (right) against KL: best-of-n over n, PPO's trajectory
    over iterations (rollout batches, running mean of ``smooth``) and final evaluation, DPO and
    SFT as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "gold_reward", "gold reward (hidden judge)"),
        (axes[1], "proxy_reward", "proxy reward (reward model)"),
    ):
        if bon:
            pts = bon["points"]
            ax.plot(
                [p["analytic_kl"] for p in pts], [p[key] for p in pts], "o-", color="C0",
                label="best-of-n (n = " + ", ".join(str(p["n"]) for p in pts) + ")",
            )  # fmt: skip
            for p in pts:
                ax.annotate(f"n={p['n']}", (p["analytic_kl"], p[key]), fontsize=7,
                            xytext=(3, -10), textcoords="offset points")  # fmt: skip
        mkey = "gold_reward_mean" if key == "gold_reward" else "reward_mean"
        if ppo_metrics and all(mkey in m for m in ppo_metrics):
            kl = _running_mean([m["kl_mean"] for m in ppo_metrics], smooth)
            y = _running_mean([m[mkey] for m in ppo_metrics], smooth)
            ax.plot(kl, y, "-", color="C1", alpha=0.7, label=f"PPO iterations (mean of {smooth})")
        style: dict[str, tuple[str, str]] = {
            "sft": ("k", "s"),
            "ppo": ("C1", "*"),
            "dpo": ("C2", "D"),
        }
        for name, m in methods.items():
            color, marker = style.get(name, ("C3", "x"))
            ax.plot([m["kl"]], [m[key]], marker, color=color, ms=10 if marker == "*" else 7,
                    ls="none", label=f"{name.upper()} (evaluation)")  # fmt: skip
        ax.set_xlabel("KL(policy || SFT reference), nats per sequence")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "gold and proxy reward against KL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _running_mean(xs: Sequence[float], k: int) -> list[float]:
    k = max(1, min(k, len(xs)))
    return [float(np.mean(xs[max(0, i - k + 1) : i + 1])) for i in range(len(xs))]
