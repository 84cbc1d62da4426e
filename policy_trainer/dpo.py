"""DPO over the service: the reference log-probs of every chosen and rejected response come from
the server's ``ReferenceLogProbs`` (tokenizer fingerprint checked), once, and are cached next to
the run (``ref_logprobs.pt``), so a second epoch or a resumed run never asks again; the policy is
trained here (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7; IPO and conservative
DPO as options: `policy_trainer.losses.dpo_loss`).

Metrics use the names of TRL's DPOTrainer (trl/trainer/dpo_trainer.py): ``loss``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``, ``grad_norm``, ``learning_rate``; evaluations over every pair
carry the Hugging Face Trainer's ``eval_`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from policy_trainer.checkpoint import (
    capture_rng,
    checkpoint_to_resume,
    load_trainer_state,
    restore_rng,
    save_checkpoint,
)
from policy_trainer.dpo_config import DPOConfig
from policy_trainer.losses import dpo_loss, logprobs_from_logits
from policy_trainer.models import ActorCritic, load_policy, load_tokenizer, resolve_device
from policy_trainer.preferences import PreferencePair, load_preference_pairs
from policy_trainer.remote import (
    UNAVAILABLE,
    VERSIONS_FILE,
    ServerRejectedError,
    ServerUnavailableError,
    check_reference,
    open_client,
    pin_model_versions,
)
from policy_trainer.rollout import trimmed_forward
from policy_trainer.run_logging import RunLogger
from policy_trainer.sampling import left_pad, right_pad
from policy_trainer.update import build_optimizer
from reward_server.client import RewardServiceError
from reward_server.fingerprint import tokenizer_fingerprint
from reward_server.seeding import seed_everything

log = logging.getLogger(__name__)

CACHE_NAME = "ref_logprobs.pt"
DPO_PANELS: tuple[tuple[str | tuple[str, ...], str], ...] = (
    ("loss", "DPO loss"),
    (("rewards/chosen", "rewards/rejected", "rewards/margins"), "implicit rewards"),
    (("rewards/accuracies", "eval_rewards/accuracies"), "implicit reward accuracy"),
    (("logps/chosen", "logps/rejected"), "policy log-probs"),
)
"""curves.png of a DPO run."""


def pair_sequences(pairs: list[PreferencePair]) -> tuple[list[list[int]], list[int]]:
    """Token ids and response starts of every pair's chosen then rejected sequence (2N)."""
    ids = [p.prompt_ids + p.chosen_ids for p in pairs] + [
        p.prompt_ids + p.rejected_ids for p in pairs
    ]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    return ids, starts


def cache_key(ids: list[list[int]], starts: list[int], fingerprint: str, reference: str) -> str:
    """What the cached log-probs were computed from: the sequences, the policy's vocabulary and
    the configured reference model name."""
    h = hashlib.sha256()
    h.update(json.dumps([fingerprint, reference, starts]).encode())
    for s in ids:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class DPOTrainer:
    """Builds everything from a config; ``run()`` trains."""

    def __init__(self, cfg: DPOConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        if cfg.run.num_threads is not None:
            torch.set_num_threads(cfg.run.num_threads)
        self.device = resolve_device(cfg.model)
        seed_everything(cfg.run.seed)
        ckpt = checkpoint_to_resume(self.run_dir, resume)
        self.tokenizer = load_tokenizer(cfg.model)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        d = cfg.data
        self.pairs, skipped = load_preference_pairs(
            d.preferences,
            self.tokenizer,
            d.max_prompt_tokens,
            d.max_response_tokens,
            split=d.split,
            on_error=d.on_error,
        )
        if skipped:
            log.warning("skipped %d malformed record(s), first: %s", len(skipped), skipped[0])
        self.model = ActorCritic(
            load_policy(cfg.model, self.device, ckpt / "policy" if ckpt else None), None
        )
        self.model.eval()  # dropout off; gradients still flow
        p = cfg.dpo
        self.steps_per_epoch = math.ceil(len(self.pairs) / p.batch_size)
        self.total_steps = p.epochs * self.steps_per_epoch
        self.optimizer, self.scheduler = build_optimizer(self.model, p, self.total_steps)  # type: ignore[arg-type]
        self.gen = torch.Generator().manual_seed(cfg.run.seed)
        self.step = 0
        if ckpt is not None:
            state = load_trainer_state(ckpt)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng(state["rng"], self.gen, self.gen)
            self.step = int(state["step"])
            log.info("resumed from %s (step %d)", ckpt, self.step)
        self.logger = RunLogger(
            self.run_dir,
            True,
            False,
            resume_after=self.step if ckpt is not None else None,
            step_key="step",
            panels=DPO_PANELS,
        )
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.ref_chosen: torch.Tensor | None = None
        self.ref_rejected: torch.Tensor | None = None
        self.rpc_calls = 0

    # ------------------------------------------------------------------ reference log-probs
    def reference_logprobs(self) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Per-token reference log-probs of the 2N sequences (chosen then rejected): from the
        cache next to the run when it matches the data and the tokenizer, else from the server
        (and then cached). Returns (arrays, cache info)."""
        ids, starts = pair_sequences(self.pairs)
        key = cache_key(ids, starts, self.fingerprint, self.cfg.server.reference_model)
        path = self.run_dir / CACHE_NAME
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=False)
            if cached.get("key") == key:
                log.info("reference log-probs from the cache %s", path)
                return cached["logprobs"], cached
            log.warning("%s was computed from other data or another tokenizer: refetching", path)
        arrays, name = self._fetch(ids, starts)
        info = {
            "key": key,
            "logprobs": arrays,
            "reference_model": name,
            "fingerprint": self.fingerprint,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(info, tmp)
        tmp.replace(path)
        return arrays, info

    def _fetch(self, ids: list[list[int]], starts: list[int]) -> tuple[list[np.ndarray], str]:
        s = self.cfg.server
        client, server_info = open_client(s)
        try:
            name = check_reference(server_info, s, self.fingerprint)
            # the reference log-probs are fetched once: pinned and recorded for this fetch
            pins = pin_model_versions(
                server_info,
                s,
                self.run_dir / VERSIONS_FILE,
                resume=False,
                write=True,
                roles=("reference",),
            )
            out: list[np.ndarray] = []
            size = self.cfg.dpo.ref_batch_size
            bar = tqdm(
                total=len(ids), desc="reference log-probs", disable=not self.cfg.run.progress
            )
            for a in range(0, len(ids), size):
                try:
                    got = client.reference_logprobs(
                        ids[a : a + size],
                        starts[a : a + size],
                        temperature=1.0,
                        model=s.reference_model,
                        tokenizer_fingerprint=self.fingerprint if s.check_fingerprint else None,
                        model_version=pins.get("reference", ""),
                    )
                except RewardServiceError as e:
                    cls = ServerUnavailableError if e.code in UNAVAILABLE else ServerRejectedError
                    raise cls(
                        f"ReferenceLogProbs at {s.address}: {e.code.name}: {e.details}"
                    ) from None
                self.rpc_calls += 1
                out += [np.asarray(g, dtype=np.float32) for g in got]
                bar.update(len(got))
            bar.close()
        finally:
            client.close()
        for i, (lp, seq, st) in enumerate(zip(out, ids, starts, strict=True)):
            if len(lp) != len(seq) - st:
                raise ServerRejectedError(
                    f"ReferenceLogProbs: sequence {i} got {len(lp)} log-probs, expected {len(seq) - st}"
                )
        return out, name

    # ------------------------------------------------------------------ forward
    def sequence_logps(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy log-probs (sums over the response tokens) of the chosen and rejected responses
        of pairs ``idx`` ([b] each, with gradients), and the response lengths [2b]."""
        pairs = [self.pairs[i] for i in idx]
        pad = self.tokenizer.pad_token_id
        prompts = [p.prompt_ids for p in pairs] * 2
        responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        q, qm = left_pad(prompts, pad, self.device)  # [2b, P]
        resp, rmask = right_pad(responses, pad, self.device)  # [2b, R]
        logits, _, r = trimmed_forward(self.model, q, qm, resp, rmask, 1.0, with_values=False)
        logp = logprobs_from_logits(logits, resp[:, :r]) * rmask[:, :r].float()  # [2b, r]
        sums = logp.sum(dim=1)  # [2b]
        b = len(pairs)
        return sums[:b], sums[b:], rmask.sum(dim=1).float()

    def _losses(self, idx: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.ref_chosen is not None and self.ref_rejected is not None
        p = self.cfg.dpo
        chosen, rejected, lengths = self.sequence_logps(idx)
        t = torch.tensor(idx, dtype=torch.long)
        b = len(idx)
        out = dpo_loss(
            chosen,
            rejected,
            self.ref_chosen[t].to(self.device),
            self.ref_rejected[t].to(self.device),
            p.beta,
            p.loss_type,
            p.label_smoothing,
            lengths[:b],
            lengths[b:],
        )
        stats = {
            "loss": out.loss.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }
        return out.loss, stats

    # ------------------------------------------------------------------ steps
    def pair_order(self, epoch: int) -> np.ndarray:
        """The pair order of an epoch (seeded by run.seed and the epoch: resumes exactly)."""
        return np.random.default_rng([self.cfg.run.seed, epoch]).permutation(len(self.pairs))

    def batch_indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step ``step`` (from 1)."""
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        bs = self.cfg.dpo.batch_size
        return [int(i) for i in self.pair_order(epoch)[pos * bs : (pos + 1) * bs]]

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (gradient accumulation over micro-batches)."""
        p = self.cfg.dpo
        t0 = time.perf_counter()
        idx = self.batch_indices(step)
        micro = p.micro_batch_size or p.batch_size
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for a in range(0, len(idx), micro):
            part = idx[a : a + micro]
            loss, stats = self._losses(part)
            (loss.sum() / len(idx)).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        params = [q for q in self.model.parameters() if q.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(
            params, p.max_grad_norm if p.max_grad_norm > 0 else float("inf")
        )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": (step - 1) // self.steps_per_epoch + 1,
            **{k: v / len(idx) for k, v in sums.items()},
            "grad_norm": float(norm),
            "learning_rate": lr,
            "pairs": len(idx),
            "step_seconds": time.perf_counter() - t0,
        }
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The DPO metrics over every pair, ``eval_``-prefixed (no gradients)."""
        sums: dict[str, float] = {}
        bs = self.cfg.dpo.micro_batch_size or self.cfg.dpo.batch_size
        for a in range(0, len(self.pairs), bs):
            _, stats = self._losses(list(range(a, min(a + bs, len(self.pairs)))))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        return {f"eval_{k}": v / len(self.pairs) for k, v in sums.items()}

    def save(self) -> Path:
        """Checkpoint the current step."""
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(self.gen, self.gen),
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            state,
            self.cfg.run.keep_checkpoints,
        )

    def run(self) -> int:
        """Train from the current step to the end (or ``run.stop_after``); returns the last
        completed step. Reference log-probs first (cache or server): a server that refuses the
        policy's tokenizer stops the run before any training."""
        arrays, _ = self.reference_logprobs()
        n = len(self.pairs)
        sums = torch.tensor([float(a.sum()) for a in arrays], dtype=torch.float32)
        self.ref_chosen, self.ref_rejected = sums[:n], sums[n:]
        r = self.cfg.run
        last = min(self.total_steps, r.stop_after or self.total_steps)
        if self.step == 0:
            self.logger.log({"step": 0, **self.evaluate()})
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="dpo",
            disable=not r.progress,
            dynamic_ncols=True,
        )
        try:
            while self.step < last:
                metrics = self.train_step(self.step + 1)
                self.step += 1
                if self.step == self.total_steps or (
                    r.eval_every and self.step % r.eval_every == 0
                ):
                    metrics.update(self.evaluate())
                self.logger.log(metrics)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}"
                )
                if self.step == last or (r.save_every and self.step % r.save_every == 0):
                    self.save()
        finally:
            bar.close()
            self.logger.plot()
        return self.step

    def close(self) -> None:
        self.logger.close()
