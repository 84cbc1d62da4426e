"""The engine: scores items, computes reference log-probs and combines reward models, on top of
the model registry (`registry`) and one dynamic batcher per model (`batcher`).

The path of one request (docs/ARCHITECTURE.md, "The path of one request"): the servicer calls
`score` or `reference_logprobs`, which check the request against the limits, resolve the model
through the registry, and submit the items to that model's batcher, which runs the model
runner's forward (with ``forward_process``, in the model's worker processes:
`forward_process.ForwardProcess`). Validation lives here and in the runners, so every transport
shares it. Imports no grpc."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reward_server import __version__
from reward_server.config import ConfigError, ServerConfig
from reward_server.engine import calibration
from reward_server.engine.batcher import DEFAULT_TENANT, BatchObserver, DynamicBatcher
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


@dataclass(eq=False)
class Served:
    """One loaded version of a model: its runner, its batcher and its version. A request takes the
    `Served` of its model once, at admission, and uses it to the end, so a reload never moves it
    to another version. `users` counts the requests using it; a retired version (replaced by a
    reload) answers requests pinned to it until `expires`, then stops once `users` is 0."""

    name: str
    runner: Any
    batcher: DynamicBatcher
    version: str
    users: int = 0
    expires: float = math.inf
    forwarder: Any = None
    """With ``forward_process``: the `ForwardProcess` running this version's forwards."""


@dataclass
class RetiredCombination:
    """A combination's version from before a reload of one of its members: the member versions
    it stands for, answering pinned requests until `expires`."""

    version: str
    members: dict[str, str] = field(default_factory=dict)
    expires: float = math.inf


@dataclass
class ReloadResult:
    """What `Engine.reload` did."""

    model: str
    old_version: str
    new_version: str
    status: str  # reloaded | unchanged
    source: str
    load_seconds: float
    transition_seconds: float


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
        """The current version's batcher of each model (mirrors `served`)."""
        self.served: dict[str, Served] = {}
        """The current version of each reward and reference model."""
        self.retired: dict[str, list[Served]] = {}
        """Versions replaced by a reload, still answering pinned requests in their window."""
        self.retired_combinations: dict[str, list[RetiredCombination]] = {}
        self._reload_lock: asyncio.Lock | None = None
        self._retiring: set[asyncio.Task] = set()
        self.device = "cpu"
        self.max_batch_tokens = 0
        self.streams = 1
        self.overhead_tokens: float | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._threads = 0
        self._forwarders: dict[str, Any] = {}
        """With ``forward_process``: the loaded models' `ForwardProcess`, until `start`."""
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
        self._threads = threads
        if cfg.forward_process:
            _check_forward_process(cfg, self.device)
        self.registry.load(self.device, threads)
        if cfg.forward_process:
            for name, runner in self.registry.runners().items():
                self._forwarders[name] = self._forward_process(runner)

    def _forward_process(self, runner: Any) -> Any:
        """The worker processes running `runner`'s forwards (``forward_process``), started."""
        from reward_server.engine.forward_process import ForwardProcess

        on_groups = getattr(self.observer, "on_prefix_groups", None)
        # threads not configured: a forward that starts alone may use every usable core
        cores = 0 if self.config.intra_op_threads else len(os.sched_getaffinity(0))
        return ForwardProcess(
            runner,
            self.streams,
            self._threads,
            on_groups,
            self.config.batch_invariant,
            max_threads=cores,
        )

    def start(self) -> None:
        """Create the device's forward streams (worker threads) and one batcher per model (on
        the running loop)."""
        self._worker = ThreadPoolExecutor(self.streams, thread_name_prefix=f"forward-{self.device}")
        self._reload_lock = asyncio.Lock()
        for name, runner in self.registry.runners().items():
            fwd = self._forwarders.pop(name, None)
            b = self._batcher(name, runner, fwd)
            if self.overhead_tokens is not None:  # set, or CUDA's; else measured at warm-up
                b.overhead_tokens = self.overhead_tokens
            b.start()
            self.batchers[name] = b
            self.served[name] = Served(name, runner, b, self.registry.versions[name], forwarder=fwd)

    def _batcher(self, name: str, runner: Any, forwarder: Any = None) -> DynamicBatcher:
        """A (not yet started) batcher for one runner, with the configured settings; its forwards
        run on `forwarder` (a `ForwardProcess`) when given."""
        cfg = self.config
        # the batcher's settings that are config keys of the same name
        same = ("max_batch_items", "max_wait_ms", "skip_wait_when_idle", "max_queue_items")
        settings = {key: getattr(cfg, key) for key in same}
        on_groups = getattr(self.observer, "on_prefix_groups", None)
        if on_groups is not None and getattr(runner, "prefix_sharing", False):
            runner.on_sharing = _sharing_reporter(on_groups)
        assert self._worker is not None, "start() first"
        if forwarder is not None:  # batch-invariant: items one at a time in the worker
            forward = forwarder.forward
        else:
            forward = one_at_a_time(runner.forward) if cfg.batch_invariant else runner.forward
        return DynamicBatcher(
            name,
            forward,
            self._worker,
            max_batch_tokens=self.max_batch_tokens,
            max_inflight=self.streams,
            observer=self.observer,
            tenant_shares=cfg.shares(),
            tenant_max_queued_items=cfg.tenant_max_queued_items,
            tenant_quotas=cfg.quotas(),
            tenant_fast_lane=cfg.tenant_fast_lane,
            **settings,
        )

    async def warmup(self) -> None:
        """One largest-batch forward per model (docs/ARCHITECTURE.md, "Lifecycle"), then, unless
        the operator set it, the forward's fixed cost is measured for the batcher
        (`calibration.measure_overhead_tokens`)."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        for name in self.registry.runners():
            runner = self.served[name].forwarder or self.served[name].runner
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
        for b in self._all_batchers():
            b.close()

    def _all_batchers(self) -> list[DynamicBatcher]:
        return [s.batcher for s in self._all_served()]

    def _all_served(self) -> list[Served]:
        return [*self.served.values(), *(s for v in self.retired.values() for s in v)]

    async def stop(self) -> None:
        """Stop the batchers (retired versions' too), the worker threads and the forward
        processes."""
        for t in list(self._retiring):
            t.cancel()
        for b in self._all_batchers():
            await b.stop()
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        forwarders = [s.forwarder for s in self._all_served() if s.forwarder is not None]
        if forwarders:
            await asyncio.get_running_loop().run_in_executor(None, _close_all, forwarders)

    # ------------------------------------------------------------------ requests
    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument(f"empty batch: the request has no {what}")
        if n > self.config.max_items_per_request:
            raise InvalidArgument(
                f"too many {what}: {n} > max_items_per_request {self.config.max_items_per_request}; split the batch"
            )

    @staticmethod
    def _check_fingerprint(served: list[Served], items: list[ScoreInput], fingerprint: str) -> None:
        """Token-in scoring: ids need the request's fingerprint, and a fingerprint (sent with or
        without ids) must be the admitted version's tokenizer's (a pinned old version's while it
        is served), every member's for a combination."""
        if not fingerprint:
            if any(it.token_ids for it in items):
                raise InvalidArgument(
                    "token_ids need tokenizer_fingerprint: send the fingerprint of the tokenizer "
                    "that produced them (GetServerInfo lists each model's)"
                )
            return
        for member in served:
            have = member.runner.fingerprint
            if fingerprint != have:
                raise FailedPrecondition(
                    f"tokenizer fingerprint {fingerprint!r} does not match model {member.name!r} "
                    f"({have!r}): the token ids come from another vocabulary; send text instead"
                )

    async def score(
        self,
        model: str,
        items: list[ScoreInput],
        truncation: str,
        deadline: float | None,
        fingerprint: str = "",
        model_version: str = "",
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[str, list[ScoreResult], Timing, str]:
        """Score items with a reward model or a combination: (name, results, timing, version
        that answered). Items may carry token ids instead of text (all or none of them), with
        `fingerprint` the tokenizer's that produced them; `model_version`, when set, pins the
        version (FAILED_PRECONDITION when it is not served); `tenant` is the caller's (fair
        scheduling and quotas in the batcher)."""
        t0 = time.monotonic()
        self._check_count(len(items), "items")
        name = self.registry.resolve(model, "reward")
        truncation = truncation or self.config.truncation
        if name in self.registry.combinations:
            comb = self.registry.combinations[name]
            version, members = self._admit_combination(name, model_version)
            self._check_fingerprint(members, items, fingerprint)
            with _using(members):
                parts = await asyncio.gather(
                    *(self._score_one(m, items, truncation, deadline, tenant) for m in members)
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
            served = self._admit(name, model_version)
            self._check_fingerprint([served], items, fingerprint)
            version = served.version
            with _using([served]):
                results, timing = await self._score_one(served, items, truncation, deadline, tenant)
        timing.total = time.monotonic() - t0
        return name, results, timing, version

    async def _score_one(
        self,
        served: Served,
        items: list[ScoreInput],
        truncation: str,
        deadline: float | None,
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[list[ScoreResult], Timing]:
        runner = served.runner
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
        sub = await served.batcher.submit(encoded, lengths, deadline, tenant)
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
        model_version: str = "",
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[str, list[np.ndarray], Timing, str]:
        """Per-token log-probs of the response positions of each sequence: (name, arrays,
        timing, version that answered); `model_version` pins the version as in `score`;
        `tenant` is the caller's."""
        t0 = time.monotonic()
        self._check_count(len(seqs), "sequences")
        name = self.registry.resolve(model, "reference")
        served = self._admit(name, model_version)
        runner = served.runner
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
        with _using([served]):
            sub = await served.batcher.submit(seqs, lengths, deadline, tenant)
        return (
            name,
            sub.results,
            Timing(
                queue=sub.queue_seconds,
                inference=sub.inference_seconds,
                total=time.monotonic() - t0,
            ),
            served.version,
        )

    # ------------------------------------------------------------------ versions
    def _admit(self, name: str, pin: str) -> Served:
        """The version of model `name` a request uses: the current one, or with a `pin` that
        version (current, or retired and inside its transition window); FAILED_PRECONDITION
        naming both versions otherwise."""
        cur = self.served[name]
        if not pin or pin == cur.version:
            return cur
        now = time.monotonic()
        for old in self.retired.get(name, ()):
            if old.version == pin and now < old.expires:
                return old
        raise FailedPrecondition(_mismatch(name, pin, cur.version))

    def _admit_combination(self, name: str, pin: str) -> tuple[str, list[Served]]:
        """A combination's version and its members' `Served`, as `_admit` for one model."""
        comb = self.registry.combinations[name]
        current = self.registry.combination_version(name)
        if not pin or pin == current:
            return current, [self._admit(m, "") for m in comb.members]
        now = time.monotonic()
        for old in self.retired_combinations.get(name, ()):
            if old.version == pin and now < old.expires:
                try:
                    return pin, [self._admit(m, old.members[m]) for m in comb.members]
                except FailedPrecondition:
                    break  # a member's old version is gone already
        raise FailedPrecondition(_mismatch(name, pin, current))

    def model_version(self, name: str) -> str:
        """The current version of a served model or combination."""
        if name in self.registry.combinations:
            return self.registry.combination_version(name)
        return self.served[name].version

    async def reload(self, name: str, source: str = "") -> ReloadResult:
        """Load a new version of reward or reference model `name` from `source` ("" = its
        current source, re-read) next to the serving one, warm it up, then make it the current
        version in one step of the event loop. Requests admitted before keep the old version;
        the old version answers requests pinned to it for `reload_transition_s`, then stops.
        Hashing, loading and the warm-up forward run on a thread, never on the event loop.

        Returns status ``unchanged`` (nothing loaded) when the source hashes to the serving
        version. A combination is refused (FAILED_PRECONDITION: reload its members); a failed
        load is FAILED_PRECONDITION with the reason and leaves the old version serving. Reloads
        run one at a time."""
        role = self.registry.role_of(name)
        if role == "combination":
            members = ", ".join(self.registry.combinations[name].members)
            raise FailedPrecondition(
                f"{name!r} is a combination; reload its member models instead ({members})"
            )
        assert self._reload_lock is not None, "start() first"
        async with self._reload_lock:
            return await self._reload(name, role, source)

    async def _reload(self, name: str, role: str, source: str) -> ReloadResult:
        cfg = self.config
        sources = cfg.reward_models if role == "reward" else cfg.reference_models
        source = source or sources[name]
        cur = self.served[name]
        window = cfg.reload_transition_s
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            version = await loop.run_in_executor(None, self.registry.version_of, name, source)
            if version == cur.version:
                sources[name] = source
                log.info("reload of %r from %s: version %s unchanged", name, source, version)
                return ReloadResult(
                    name, cur.version, version, "unchanged", source, time.monotonic() - t0, 0.0
                )
            runner, forwarder = await loop.run_in_executor(
                None, self._load_warm, role, name, source
            )
        except Exception as exc:  # ModelLoadError, OSError, a bad config...: the old one stays
            log.error(
                "reload of %r from %s failed; version %s keeps serving: %s",
                name,
                source,
                cur.version,
                exc,
            )
            raise FailedPrecondition(
                f"reload of model {name!r} from {source!r} failed, version {cur.version} keeps "
                f"serving: {type(exc).__name__}: {exc}"
            ) from exc
        batcher = self._batcher(name, runner, forwarder)
        batcher.overhead_tokens = cur.batcher.overhead_tokens  # same device, same shape of cost
        if cur.batcher.overhead_learner is not None:  # and refitted from its own forwards
            batcher.overhead_learner = calibration.OverheadLearner(batcher.overhead_tokens)
        batcher.start()
        new = Served(name, runner, batcher, version, forwarder=forwarder)
        # The switch: no await from here to the return, so no request sees half of it.
        now = time.monotonic()
        for cname, comb in self.registry.combinations.items():
            if name in comb.members:
                old_members = {m: self.served[m].version for m in comb.members}
                self.retired_combinations.setdefault(cname, []).append(
                    RetiredCombination(
                        self.registry.combination_version(cname, old_members),
                        old_members,
                        now + window,
                    )
                )
        cur.expires = now + window
        self.retired.setdefault(name, []).append(cur)
        self.served[name] = new
        self.batchers[name] = batcher
        (self.registry.rewards if role == "reward" else self.registry.references)[name] = runner
        self.registry.versions[name] = version
        sources[name] = source
        task = loop.create_task(self._retire(cur), name=f"retire-{name}-{cur.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        took = time.monotonic() - t0
        log.info(
            "reloaded %r: version %s -> %s from %s in %.1fs; %s answers pinned requests for %gs",
            name,
            cur.version,
            version,
            source,
            took,
            cur.version,
            window,
        )
        return ReloadResult(name, cur.version, version, "reloaded", source, took, window)

    def _load_warm(self, role: str, name: str, source: str) -> tuple[Any, Any]:
        """Load a runner (and with ``forward_process`` start its worker processes) and, with
        `warmup`, run one largest-batch forward (on a loader thread): (runner, forwarder)."""
        t0 = time.monotonic()
        runner = self.registry.build_runner(role, name, source)
        log.info("loaded new version of %r from %s in %.1fs", name, source, time.monotonic() - t0)
        forwarder = self._forward_process(runner) if self.config.forward_process else None
        try:
            if self.config.warmup:
                run = forwarder or runner
                run.forward(run.warmup_items(self.max_batch_tokens, self.config.max_batch_items))
        except BaseException:
            if forwarder is not None:
                forwarder.close()
            raise
        return runner, forwarder

    async def _retire(self, old: Served) -> None:
        """After the transition window and the last request using it, stop an old version."""
        await asyncio.sleep(max(0.0, old.expires - time.monotonic()))
        while old.users > 0:
            await asyncio.sleep(0.05)
        old.batcher.close()
        await old.batcher.stop()
        if old.forwarder is not None:
            await asyncio.get_running_loop().run_in_executor(None, old.forwarder.close)
        versions = self.retired.get(old.name, [])
        if old in versions:
            versions.remove(old)
        now = time.monotonic()
        for cname, olds in self.retired_combinations.items():
            self.retired_combinations[cname] = [c for c in olds if c.expires > now]
        log.info("version %s of %r dropped (transition window over)", old.version, old.name)


def _check_forward_process(cfg: ServerConfig, device: str) -> None:
    """``forward_process`` runs torch models on a CPU: a clear error for anything else."""
    if device != "cpu":
        raise ConfigError(
            f"forward_process runs the forward on a CPU only (device {device!r}): on a GPU the "
            "forward's kernels already run outside the interpreter lock; use forward_streams"
        )
    if cfg.backend != "torch":
        raise ConfigError(
            f"forward_process needs the torch backend (backend {cfg.backend!r}): onnxruntime "
            "runs its whole forward outside the interpreter lock already"
        )


def _close_all(forwarders: list[Any]) -> None:
    for f in forwarders:
        f.close()


def _mismatch(name: str, pinned: str, serving: str) -> str:
    return (
        f"model version mismatch: the request pins model {name!r} to version {pinned!r}, the "
        f"server answers with version {serving!r} (the pinned version is not served, or its "
        "transition window after a reload is over)"
    )


@contextlib.contextmanager
def _using(served: list[Served]) -> Iterator[None]:
    """Count a request as a user of these versions while it runs."""
    for s in served:
        s.users += 1
    try:
        yield
    finally:
        for s in served:
            s.users -= 1
