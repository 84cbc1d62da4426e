"""The engine: scores items, computes reference log-probs and combines reward models, on top of
the model registry (`registry`) and one dynamic batcher per model (`batcher`).

The path of one request (docs/ARCHITECTURE.md, "The path of one request"): the servicer calls
`score` or `reference_logprobs`, which check the request against the limits, resolve the model
through the registry, and submit the items to that model's batcher, which runs the model
runner's forward. Validation lives here and in the runners, so every transport shares it.
Imports no grpc."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from reward_server import __version__
from reward_server.config import ServerConfig
from reward_server.engine import calibration
from reward_server.engine.batcher import BatchObserver, DynamicBatcher
from reward_server.engine.registry import ModelRegistry
from reward_server.errors import FailedPrecondition, InvalidArgument
from reward_server.models.prefix import Group, SharingObserver, batch_lengths, tokens_saved
from reward_server.models.reference import RefSequence, validate_temperature
from reward_server.models.reward import ScoreInput
from reward_server.models.runner import one_at_a_time
from reward_server.score_result import ScoreResult

log = logging.getLogger(__name__)


@dataclass
class ScoreItemInput(ScoreInput):
    """A `ScoreInput` with the request's per-item flags that only combination rules read."""

    safety_prompt: bool = False
    """The item's prompt is a safety prompt (the ``safety_gate`` rule scores it with the safety
    model whatever its score)."""


@dataclass
class Timing:
    """Server-side timing of one request, seconds."""

    queue: float = 0.0
    tokenize: float = 0.0
    inference: float = 0.0
    total: float = 0.0


def _text_chars(items: list[ScoreInput]) -> int:
    total = 0
    for it in items:
        total += len(it.prompt) + len(it.completion)
        for m in it.messages or ():
            total += len(m.get("content", "")) + len(m.get("role", ""))
    return total


def _sharing_reporter(on_groups: Callable[[str, int, list[int]], None]) -> SharingObserver:
    """A runner's sharing callback feeding the observer: tokens saved and group sizes."""

    def report(model: str, groups: Sequence[Group]) -> None:
        on_groups(model, tokens_saved(groups), [len(g.members) for g in groups])

    return report


class Engine:
    """Answers scoring and log-prob requests with the registry's models, through their batchers."""

    def __init__(self, config: ServerConfig, observer: BatchObserver | None = None) -> None:
        self.config = config
        self.observer = observer
        self.registry = ModelRegistry(config)
        self.batchers: dict[str, DynamicBatcher] = {}
        self.device = "cpu"
        self.max_batch_tokens = 0
        self.streams = 1
        self.overhead_tokens: float | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._tokenizer_pool = ThreadPoolExecutor(
            config.tokenizer_threads, thread_name_prefix="tokenize"
        )
        self.version = __version__

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Resolve the device, set the threads and load every model (blocking; before serving)."""
        from reward_server.devices import resolve_device

        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.streams = cfg.resolved_forward_streams(self.device)
        self.overhead_tokens = cfg.resolved_batch_overhead_tokens(self.device)
        threads = calibration.apply_intra_op_threads(
            cfg.resolved_intra_op_threads(), self.streams, self.device
        )
        self.max_batch_tokens = cfg.resolved_max_batch_tokens(self.device)
        self.registry.load(self.device, threads)

    def start(self) -> None:
        """Create the device's forward streams (worker threads) and one batcher per model (on
        the running loop)."""
        cfg = self.config
        self._worker = ThreadPoolExecutor(self.streams, thread_name_prefix=f"forward-{self.device}")
        # the batcher's settings that are config keys of the same name
        same = ("max_batch_items", "max_wait_ms", "skip_wait_when_idle", "max_queue_items")
        settings = {key: getattr(cfg, key) for key in same}
        on_groups = getattr(self.observer, "on_prefix_groups", None)
        for name, runner in self.registry.runners().items():
            if on_groups is not None and getattr(runner, "prefix_sharing", False):
                runner.on_sharing = _sharing_reporter(on_groups)
            b = DynamicBatcher(
                name,
                one_at_a_time(runner.forward) if cfg.batch_invariant else runner.forward,
                self._worker,
                max_batch_tokens=self.max_batch_tokens,
                max_inflight=self.streams,
                observer=self.observer,
                **settings,
            )
            if self.overhead_tokens is not None:  # set, or CUDA's; else measured at warm-up
                b.overhead_tokens = self.overhead_tokens
            b.start()
            self.batchers[name] = b

    async def warmup(self) -> None:
        """One largest-batch forward per model (docs/ARCHITECTURE.md, "Lifecycle"), then, unless
        the operator set it, the forward's fixed cost is measured for the batcher
        (`calibration.measure_overhead_tokens`)."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        for name, runner in self.registry.runners().items():
            t0 = time.monotonic()
            items = runner.warmup_items(self.max_batch_tokens, cfg.max_batch_items)
            await loop.run_in_executor(self._worker, runner.forward, items)
            log.info("warmed up %r with %d items in %.2fs", name, len(items), time.monotonic() - t0)
            if self.overhead_tokens is not None:
                continue
            overhead = await calibration.measure_overhead_tokens(
                runner, self.max_batch_tokens, cfg.max_batch_items, self._worker, self.streams
            )
            self.batchers[name].overhead_tokens = overhead
            # refitted from the forwards served from now on (calibration.OverheadLearner)
            self.batchers[name].overhead_learner = calibration.OverheadLearner(overhead)
            log.info("model %r: a forward's fixed cost is %.0f tokens' worth", name, overhead)

    def close(self) -> None:
        """Refuse new work; queued work still completes."""
        for b in self.batchers.values():
            b.close()

    async def stop(self) -> None:
        """Stop the batchers and the worker threads."""
        for b in self.batchers.values():
            await b.stop()
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests
    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument(f"empty batch: the request has no {what}")
        if n > self.config.max_items_per_request:
            raise InvalidArgument(
                f"too many {what}: {n} > max_items_per_request {self.config.max_items_per_request}; split the batch"
            )

    def _check_fingerprint(self, name: str, items: list[ScoreInput], fingerprint: str) -> None:
        """Token-in scoring: ids need the request's fingerprint, and a fingerprint (sent with or
        without ids) must be the model's, every member's for a combination."""
        if not fingerprint:
            if any(it.token_ids for it in items):
                raise InvalidArgument(
                    "token_ids need tokenizer_fingerprint: send the fingerprint of the tokenizer "
                    "that produced them (GetServerInfo lists each model's)"
                )
            return
        comb = self.registry.combinations.get(name)
        for member in comb.members if comb is not None else [name]:
            have = self.registry.rewards[member].fingerprint
            if fingerprint != have:
                raise FailedPrecondition(
                    f"tokenizer fingerprint {fingerprint!r} does not match model {member!r} "
                    f"({have!r}): the token ids come from another vocabulary; send text instead"
                )

    async def score(
        self,
        model: str,
        items: list[ScoreInput],
        truncation: str,
        deadline: float | None,
        fingerprint: str = "",
    ) -> tuple[str, list[ScoreResult], Timing]:
        """Score items with a reward model or a combination. Items may carry token ids instead of
        text (all or none of them), with `fingerprint` the tokenizer's that produced them."""
        t0 = time.monotonic()
        self._check_count(len(items), "items")
        name = self.registry.resolve(model, "reward")
        self._check_fingerprint(name, items, fingerprint)
        truncation = truncation or self.config.truncation
        if name in self.registry.combinations:
            comb = self.registry.combinations[name]
            parts = await asyncio.gather(
                *(self._score_one(m, items, truncation, deadline) for m in comb.members)
            )
            results = []
            for i in range(len(items)):
                per = {m: parts[k][0][i].score for k, m in enumerate(comb.members)}
                safety_prompt = getattr(items[i], "safety_prompt", False)
                normed = {m: parts[k][0][i].normalized_score for k, m in enumerate(comb.members)}
                normalized = None
                if comb.kind == "safety_gate":  # whitened with the selected member's statistics
                    normalized = normed[comb.selected(per, safety_prompt)]
                elif all(v is not None for v in normed.values()):
                    # The rule over the members' normalised scores: a weighted sum of z-scores,
                    # so members on different scales weigh as configured.
                    normalized = comb.apply(normed, safety_prompt)  # type: ignore[arg-type]
                results.append(
                    ScoreResult(
                        score=comb.apply(per, safety_prompt),
                        head_scores=per,
                        num_tokens=max(p[0][i].num_tokens for p in parts),
                        truncated=any(p[0][i].truncated for p in parts),
                        normalized_score=normalized,
                    )
                )
            timing = Timing(
                **{
                    f: max(getattr(p[1], f) for p in parts)
                    for f in ("queue", "tokenize", "inference")
                }
            )
        else:
            results, timing = await self._score_one(name, items, truncation, deadline)
        timing.total = time.monotonic() - t0
        return name, results, timing

    async def _score_one(
        self, name: str, items: list[ScoreInput], truncation: str, deadline: float | None
    ) -> tuple[list[ScoreResult], Timing]:
        runner = self.registry.rewards[name]
        t0 = time.monotonic()
        if _text_chars(items) <= self.config.inline_tokenize_chars:
            # a short request costs less to tokenise here (~0.15 ms per 100-token item) than the
            # hop to the tokenizer pool and back (thread wake-ups and GIL hand-offs)
            encoded = runner.encode(items, truncation)
        else:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(
                self._tokenizer_pool, runner.encode, items, truncation
            )
        tok_s = time.monotonic() - t0
        ids = [e.input_ids for e in encoded]
        if getattr(runner, "prefix_sharing", False):
            lengths = batch_lengths(ids, [runner.share_limit(s) for s in ids])
        else:
            lengths = [len(s) for s in ids]
        sub = await self.batchers[name].submit(encoded, lengths, deadline)
        results = []
        for enc, values in zip(encoded, sub.results, strict=True):
            score = runner.combine(values)
            results.append(
                ScoreResult(
                    score=score,
                    head_scores=runner.head_values(values),
                    num_tokens=len(enc.input_ids),
                    truncated=enc.truncated,
                    normalized_score=runner.normalize(score),
                )
            )
        return results, Timing(
            queue=sub.queue_seconds, tokenize=tok_s, inference=sub.inference_seconds
        )

    async def reference_logprobs(
        self,
        model: str,
        seqs: list[RefSequence],
        temperature: float,
        fingerprint: str,
        deadline: float | None,
    ) -> tuple[str, list[np.ndarray], Timing]:
        """Per-token log-probs of the response positions of each sequence."""
        t0 = time.monotonic()
        self._check_count(len(seqs), "sequences")
        name = self.registry.resolve(model, "reference")
        runner = self.registry.references[name]
        temp = validate_temperature(temperature)
        if fingerprint and fingerprint != runner.fingerprint:
            raise FailedPrecondition(
                f"tokenizer fingerprint {fingerprint!r} does not match model {name!r} ({runner.fingerprint!r}): "
                "the token ids come from another vocabulary"
            )
        runner.validate(seqs)
        for s in seqs:
            s.temperature = temp
        ids = [s.token_ids for s in seqs]
        lengths = batch_lengths(ids) if runner.prefix_sharing else [len(s) for s in ids]
        sub = await self.batchers[name].submit(seqs, lengths, deadline)
        return (
            name,
            sub.results,
            Timing(
                queue=sub.queue_seconds,
                inference=sub.inference_seconds,
                total=time.monotonic() - t0,
            ),
        )
