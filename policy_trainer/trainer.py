"""The PPO loop: rollout -> rewards/advantages -> update -> KL controller -> log -> checkpoint."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from policy_trainer.checkpoint import (
    capture_rng,
    checkpoint_dir,
    checkpoint_to_resume,
    load_trainer_state,
    load_value_head,
    restore_rng,
    save_checkpoint,
)
from policy_trainer.config import ConfigError, TrainerConfig
from policy_trainer.data import PromptSampler, load_prompts
from policy_trainer.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    check_ranks_in_sync,
    dist_info_from_env,
    gather_objects,
    init_distributed,
    mean_over_ranks,
)
from policy_trainer.experience import make_experience
from policy_trainer.kl import AdaptiveKLController, FixedKLController
from policy_trainer.models import (
    ActorCritic,
    load_critic,
    load_policy,
    load_tokenizer,
    resolve_device,
)
from policy_trainer.remote import (
    VERSIONS_FILE,
    RemoteRewards,
    ServerRejectedError,
    ServerUnavailableError,
    check_server,
    combination_members,
    decide_score_input,
    describe_server,
    open_client,
    pin_model_versions,
)
from policy_trainer.rollout import RolloutBatch, collect_rollout
from policy_trainer.run_logging import RunLogger, add_score_drift, telemetry_metrics
from policy_trainer.update import build_optimizer, ppo_update
from reward_server.client import RewardClient
from reward_server.fingerprint import tokenizer_fingerprint
from reward_server.seeding import seed_everything

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped early for a reason the user must see (e.g. the server went away); a
    checkpoint of the last completed iteration has been written (``checkpoint``)."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _load_callable(spec: str) -> Any:
    """``module:function`` -> the function (ConfigError naming the key when it cannot be found)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"run.sample_metrics: cannot import {spec!r} ({e})") from None


class PPOTrainer:
    """Builds everything from a config; ``run()`` trains. One instance per process (rank)."""

    def __init__(self, cfg: TrainerConfig, resume: bool = False, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or dist_info_from_env()
        self.run_dir = Path(cfg.run.output_dir)
        if cfg.run.num_threads is not None:
            torch.set_num_threads(cfg.run.num_threads)
        self.device = resolve_device(cfg.model, self.dist.local_rank)
        init_distributed(self.dist, self.device)
        seed_everything(cfg.run.seed)
        ckpt = checkpoint_to_resume(self.run_dir, resume)
        self.resumed = ckpt is not None
        self.tokenizer = load_tokenizer(cfg.model)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.sample_metrics = (
            _load_callable(cfg.run.sample_metrics) if cfg.run.sample_metrics else None
        )
        self.prompts = load_prompts(cfg.data, self.tokenizer)
        self.uses_values = cfg.ppo.advantage_estimator == "gae"
        self.model = self._build_model(ckpt)
        self.ddp: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        steps_per_iter = cfg.ppo.epochs * (cfg.rollout_batch_size // cfg.ppo.minibatch_size)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.ppo, cfg.run.iterations * steps_per_iter
        )
        p = cfg.ppo
        self.kl_ctl: AdaptiveKLController | FixedKLController = (
            AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
            if p.adaptive_kl
            else FixedKLController(p.kl_coef)
        )
        self.sampler = PromptSampler(
            len(self.prompts),
            cfg.rollout.prompts_per_iteration,
            cfg.run.seed,
            cfg.data.shuffle,
            self.dist.rank,
            self.dist.world_size,
        )
        self.sample_gen = torch.Generator(self.device).manual_seed(
            cfg.run.seed + 7919 * self.dist.rank
        )
        self.shuffle_gen = torch.Generator().manual_seed(
            cfg.run.seed + 104729 * (self.dist.rank + 1)
        )
        self.iteration = 0
        if ckpt is not None:
            self._load_state(ckpt)
        self.logger = RunLogger(
            self.run_dir,
            self.dist.is_main,
            cfg.run.tensorboard,
            resume_after=self.iteration if ckpt is not None else None,
        )
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            )
        self.client: RewardClient | None = None
        self.remote: RemoteRewards | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ setup
    def _build_model(self, ckpt: Path | None) -> ActorCritic:
        m = self.cfg.model
        policy = load_policy(m, self.device, ckpt / "policy" if ckpt else None)
        critic = None
        value_model = m.value_model if self.uses_values else None
        if value_model == "critic":
            critic = load_critic(m, self.device, ckpt / "critic" if ckpt else None)
            self._check_critic_vocab(critic)
        model = ActorCritic(policy, value_model, critic)
        if ckpt is not None:
            load_value_head(model, ckpt)
        model.eval()  # dropout off; gradients still flow
        return model

    def _check_critic_vocab(self, critic: torch.nn.Module) -> None:
        src = self.cfg.model.critic_path
        if not src:
            return
        try:
            from transformers import AutoTokenizer

            fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(src))
        except (OSError, ValueError):
            return  # no tokenizer saved with the critic: nothing to compare
        if fp != self.fingerprint:
            raise ConfigError(
                f"model.critic_path={src}: its tokenizer differs from the policy's ({fp} != "
                f"{self.fingerprint}); the critic reads policy token ids"
            )

    def _load_state(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"--resume: {ckpt} was written by {state['world_size']} rank(s), this job has "
                f"{self.dist.world_size}; resume with the same number of processes"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"][self.dist.rank], self.sample_gen, self.shuffle_gen)
        self.iteration = int(state["iteration"])
        changed = _changed_keys(state.get("config", {}), self.cfg.to_dict())
        changed = [
            k for k in changed if not k.startswith(("server.", "run.stop_after", "run.progress"))
        ]
        if changed:
            log.warning(
                "resuming with a config that differs from the checkpoint's in: %s",
                ", ".join(changed),
            )
        log.info("resumed from %s (iteration %d)", ckpt, self.iteration)

    def connect(self) -> None:
        """Open this rank's client, wait for the server and check its models."""
        s = self.cfg.server
        self.client, info = open_client(s)
        check_server(info, s, self.fingerprint)
        log.info(describe_server(info))
        pins = pin_model_versions(
            info, s, self.run_dir / VERSIONS_FILE, resume=self.resumed, write=self.dist.is_main
        )
        self.remote = RemoteRewards(
            self.client,
            s,
            self.cfg.rollout.temperature,
            self.fingerprint if s.check_fingerprint else None,
        )
        self.remote.score_version = pins.get("reward", "")
        self.remote.ref_version = pins.get("reference", "")
        self.remote.members = combination_members(info, s)
        self._decide_score_input(info)

    def _decide_score_input(self, info: Any) -> None:
        """Token ids or text to Score, once for the run: logged and written to
        ``reward_input.json`` in the run directory."""
        assert self.remote is not None
        mode, reward_fp, reason = decide_score_input(info, self.cfg.server, self.fingerprint)
        self.remote.score_fingerprint = self.fingerprint if mode == "token_ids" else ""
        log.info("Score gets %s: %s", mode, reason)
        if self.dist.is_main:
            record = {
                "score_input": mode,
                "reason": reason,
                "policy_tokenizer_fingerprint": self.fingerprint,
                "reward_tokenizer_fingerprint": reward_fp,
            }
            (self.run_dir / "reward_input.json").write_text(json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        if self.client is not None:
            self.client.close()
        self.logger.close()

    # ------------------------------------------------------------------ state
    def _trainer_state(
        self, iteration: int, rng: list[Any], sampler: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "sampler": sampler,
            "rng": rng,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
        }

    def save(
        self,
        iteration: int,
        rng: dict[str, Any] | None = None,
        sampler: dict[str, int] | None = None,
    ) -> Path:
        """Checkpoint (collective: every rank calls it; rank 0 writes)."""
        rngs = gather_objects(
            rng if rng is not None else capture_rng(self.sample_gen, self.shuffle_gen)
        )
        path = checkpoint_dir(self.run_dir, iteration)
        if self.dist.is_main:
            state = self._trainer_state(iteration, rngs, sampler or self.sampler.state_dict())
            path = save_checkpoint(
                self.run_dir,
                iteration,
                self.model,
                self.tokenizer,
                state,
                self.cfg.run.keep_checkpoints,
            )
        barrier()
        return path

    # ------------------------------------------------------------------ loop
    def collect(self, prompt_indices: list[int]) -> tuple[RolloutBatch, dict[str, float]]:
        """One rollout batch for the given prompts (``connect()`` first)."""
        assert self.remote is not None, "call connect() first"
        prompts = [self.prompts[i] for i in prompt_indices]
        return collect_rollout(
            self.model,
            prompts,
            self.cfg.rollout,
            self.remote,
            self.tokenizer,
            self.device,
            self.sample_gen,
        )

    def train_iteration(self, iteration: int) -> dict[str, Any]:
        """Rollout, update and KL-controller step; returns the metrics (averaged over ranks)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        indices = self.sampler.next_indices()
        error: ServerUnavailableError | ServerRejectedError | None = None
        try:
            batch, timing = self.collect(indices)
        except (ServerUnavailableError, ServerRejectedError) as e:
            error = e
        if any_rank(error is not None, self.device):
            raise error or ServerUnavailableError("another rank lost the reward server")
        beta = self.kl_ctl.value
        exp = make_experience(
            batch, cfg.ppo, beta, cfg.rollout.samples_per_prompt, cfg.rollout.missing_eos_penalty
        )
        t1 = time.perf_counter()
        upd = ppo_update(
            self.ddp,
            self.optimizer,
            self.scheduler,
            batch,
            exp,
            cfg.ppo,
            cfg.rollout.temperature,
            self.shuffle_gen,
            self.uses_values,
        )
        t2 = time.perf_counter()
        kl_sum, n_valid, n_total = all_reduce_sum(
            [exp.kl_sum, exp.n_valid, len(batch)], self.device
        )
        global_kl = kl_sum / max(n_valid, 1.0)
        self.kl_ctl.update(global_kl, int(n_total))
        local = {**exp.stats, **upd, **timing, "update_seconds": t2 - t1}
        if self.sample_metrics is not None:
            k = cfg.rollout.samples_per_prompt
            texts = [self.prompts[indices[j // k]].text for j in range(len(batch))]
            local.update(self.sample_metrics(texts, batch.completions, batch.has_eos.tolist()))
        local["failed_rpc_items"] = float(self.remote.failed_items if self.remote else 0)
        local.update(self._telemetry(batch))
        metrics: dict[str, Any] = {"iteration": iteration, **mean_over_ranks(local, self.device)}
        metrics.update(
            kl_mean=global_kl,
            beta=beta,
            beta_next=self.kl_ctl.value,
            sequences=int(n_total),
            iteration_seconds=time.perf_counter() - t0,
        )
        metrics["rpc_wait_share"] = metrics["rpc_wait_seconds"] / metrics["iteration_seconds"]
        if cfg.run.check_rank_sync and self.dist.enabled:
            metrics["weights_digest"] = check_ranks_in_sync(self.model)
        add_score_drift(metrics, self.logger.history)
        if self.dist.is_main:
            metrics["sample_completion"] = batch.completions[0]
        return metrics

    def _telemetry(self, batch: RolloutBatch) -> dict[str, float]:
        """The iteration's reward-hacking figures (`run_logging.telemetry_metrics`): the
        server's telemetry computed on this run's own rollouts."""
        members = self.remote.members if self.remote is not None else ()
        rows = self.remote.pop_member_scores() if self.remote is not None else []
        return telemetry_metrics(
            batch.scores.tolist(),
            batch.response_mask.sum(dim=1).tolist(),
            members,
            rows,
        )

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, frame: Any) -> None:
            log.warning("signal %d: checkpointing after this iteration, then stopping", signum)
            self._stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)

    def run(self) -> int:
        """Train from the current iteration to ``run.iterations`` (or ``run.stop_after``); returns
        the last completed iteration. Raises TrainingStopped after checkpointing if the server
        stays down past the retry budget or refuses the work."""
        cfg = self.cfg.run
        if self.remote is None:
            self.connect()
        self._install_signal_handlers()
        last = min(cfg.iterations, cfg.stop_after or cfg.iterations)
        bar = tqdm(
            total=cfg.iterations,
            initial=self.iteration,
            desc="ppo",
            disable=not (self.dist.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        try:
            while self.iteration < last:
                it = self.iteration + 1
                rng_snapshot = capture_rng(self.sample_gen, self.shuffle_gen)
                sampler_snapshot = self.sampler.state_dict()
                try:
                    metrics = self.train_iteration(it)
                except (ServerUnavailableError, ServerRejectedError) as e:
                    raise self._stop_on_failure(e, rng_snapshot, sampler_snapshot) from None
                self.iteration = it
                self.logger.log(metrics)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}"
                )
                stop = any_rank(self._stop_requested, self.device)
                if it % cfg.plot_every == 0 or it == last or stop:
                    self.logger.plot()
                if (cfg.save_every and it % cfg.save_every == 0) or it == last or stop:
                    self.save(it)
                if stop:
                    break
        finally:
            bar.close()
        return self.iteration

    def _stop_on_failure(
        self, error: RuntimeError, rng: dict[str, Any], sampler: dict[str, int]
    ) -> TrainingStopped:
        """Checkpoint the last completed iteration (state as it was before the failed rollout)."""
        done = self.iteration
        # Always (re)written, on every rank's say-so alike (the save is collective); the RNG and
        # data snapshots equal the state right after iteration `done`.
        path = self.save(done, rng=rng, sampler=sampler) if done > 0 else None
        self.logger.plot()
        where = f"; checkpoint of iteration {done}: {path} (resume with --resume)" if path else ""
        return TrainingStopped(f"{error}{where}", path)
