"""The served models and their batchers: the layer between the servicer and the model runners.

Validation of requests against models (names, roles, limits, fingerprints) lives here, so every
transport (gRPC today) shares it. Imports no grpc.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reward_server import __version__
from reward_server.batcher import BatchObserver, DynamicBatcher
from reward_server.combine import Combiner, parse_combiner
from reward_server.config import ServerConfig
from reward_server.errors import FailedPrecondition, InvalidArgument
from reward_server.models.reference import ReferenceRunner, RefSequence, validate_temperature
from reward_server.models.reward import RewardRunner, ScoreInput
from reward_server.models.runner import lengths_of

log = logging.getLogger(__name__)

# Set before torch loads (the model layer imports it lazily, after this module): OpenMP worker
# threads sleep between parallel regions instead of spinning. A server's CPU is shared with its
# event loop, tokenizer threads and often other processes; spinning workers then take the cores
# the forward itself waits for. Measured on the shared 2-core CPU: a 2-layer model's forward went
# from 200 ms to 4 ms, serving throughput 3-7x (docs/BENCHMARKS.md). An operator's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_intra_op_threads(configured: int, streams: int, device: str) -> int:
    """Intra-op threads per forward: the configured number, else (several streams on a CPU) the
    usable cores shared among the streams, else 0 (torch's own default is left alone)."""
    if configured or streams <= 1 or device != "cpu":
        return configured
    return max(1, len(os.sched_getaffinity(0)) // streams)


@dataclass
class ItemResult:
    """One scored item (internal form of `ItemScore`)."""

    score: float
    head_scores: dict[str, float]
    num_tokens: int
    truncated: bool
    normalized_score: float | None = None


@dataclass
class Timing:
    """Server-side timing of one request, seconds."""

    queue: float = 0.0
    tokenize: float = 0.0
    inference: float = 0.0
    total: float = 0.0


@dataclass
class ModelDescription:
    """What GetServerInfo says of one model."""

    name: str
    role: str  # reward | reference | combination
    heads: list[str] = field(default_factory=list)
    fingerprint: str = ""
    dtype: str = ""
    backend: str = "torch"
    device: str = ""
    max_input_tokens: int = 0
    is_default: bool = False
    vocab_size: int = 0
    source: str = ""
    has_chat_template: bool = False
    has_normalization: bool = False
    combine: str = ""


def _text_chars(items: list[ScoreInput]) -> int:
    total = 0
    for it in items:
        total += len(it.prompt) + len(it.completion)
        for m in it.messages or ():
            total += len(m.get("content", "")) + len(m.get("role", ""))
    return total


class Engine:
    """Loads the configured models and answers scoring and log-prob requests."""

    def __init__(self, config: ServerConfig, observer: BatchObserver | None = None) -> None:
        self.config = config
        self.observer = observer
        self.rewards: dict[str, Any] = {}
        self.references: dict[str, ReferenceRunner] = {}
        self.combinations: dict[str, Combiner] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.device = "cpu"
        self.max_batch_tokens = 0
        self.intra_op_threads = 0
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._tokenizer_pool = ThreadPoolExecutor(
            config.tokenizer_threads, thread_name_prefix="tokenize"
        )
        self.version = __version__

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load every model (blocking; call before serving)."""
        from reward_server.models.loading import resolve_device, resolve_dtype

        cfg = self.config
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.intra_op_threads = self._set_threads()
        self.max_batch_tokens = cfg.resolved_max_batch_tokens(self.device)
        for name, source in cfg.reward_models.items():
            t0 = time.monotonic()
            if cfg.backend == "onnx":
                from reward_server.models.onnx_reward import OnnxRewardRunner

                self.rewards[name] = OnnxRewardRunner(
                    name,
                    source,
                    device=self.device,
                    max_input_tokens=cfg.max_input_tokens,
                    head_combine=cfg.head_combine.get(name, ""),
                    intra_op_threads=self.intra_op_threads,
                )
            else:
                self.rewards[name] = RewardRunner(
                    name,
                    source,
                    device=self.device,
                    dtype=dtype,
                    adapter=cfg.adapters.get(name, ""),
                    quantization=cfg.quantization,
                    trust_remote_code=cfg.trust_remote_code,
                    max_input_tokens=cfg.max_input_tokens,
                    head_combine=cfg.head_combine.get(name, ""),
                )
            log.info("loaded reward model %r from %s in %.1fs", name, source, time.monotonic() - t0)
        for name, source in cfg.reference_models.items():
            t0 = time.monotonic()
            self.references[name] = ReferenceRunner(
                name,
                source,
                device=self.device,
                dtype=dtype,
                adapter=cfg.adapters.get(name, ""),
                trust_remote_code=cfg.trust_remote_code,
                max_input_tokens=cfg.max_input_tokens,
                slice_bytes=int(cfg.logprob_slice_mb * (1 << 20)),
            )
            log.info(
                "loaded reference model %r from %s in %.1fs", name, source, time.monotonic() - t0
            )
        for name, spec in cfg.combinations.items():
            self.combinations[name] = parse_combiner(spec, list(self.rewards))

    def _set_threads(self) -> int:
        """Apply `default_intra_op_threads` to torch; returns it (0 = torch's default)."""
        import torch

        cfg = self.config
        n = default_intra_op_threads(cfg.intra_op_threads, cfg.forward_streams, self.device)
        if n:
            torch.set_num_threads(n)
        log.info(
            "%d forward stream(s) on %s, %d intra-op thread(s) each",
            cfg.forward_streams,
            self.device,
            torch.get_num_threads(),
        )
        return n

    def start(self) -> None:
        """Create one batcher per model and `forward_streams` worker threads per device (on the
        running loop)."""
        worker = self._workers.setdefault(
            self.device,
            ThreadPoolExecutor(
                self.config.forward_streams, thread_name_prefix=f"forward-{self.device}"
            ),
        )
        cfg = self.config
        for name, runner in [*self.rewards.items(), *self.references.items()]:
            b = DynamicBatcher(
                name,
                runner.forward,
                worker,
                max_batch_tokens=self.max_batch_tokens,
                max_batch_items=cfg.max_batch_items,
                max_wait_ms=cfg.max_wait_ms,
                skip_wait_when_idle=cfg.skip_wait_when_idle,
                max_inflight=cfg.forward_streams,
                max_queue_items=cfg.max_queue_items,
                observer=self.observer,
            )
            if cfg.batch_overhead_tokens >= 0:  # set by the operator; else measured at warm-up
                b.overhead_tokens = cfg.batch_overhead_tokens
            b.start()
            self.batchers[name] = b

    async def warmup(self) -> None:
        """One largest-batch forward per model (DESIGN.md: warm-up at start, largest batch), then
        the forward's fixed cost is measured for the batcher (`measure_overhead_tokens`)."""
        loop = asyncio.get_running_loop()
        for name, runner in [*self.rewards.items(), *self.references.items()]:
            t0 = time.monotonic()
            items = runner.warmup_items(self.max_batch_tokens, self.config.max_batch_items)
            await loop.run_in_executor(self._workers[self.device], runner.forward, items)
            log.info("warmed up %r with %d items in %.2fs", name, len(items), time.monotonic() - t0)
            if self.config.batch_overhead_tokens >= 0:
                continue
            overhead = await self.measure_overhead_tokens(runner, items)
            self.batchers[name].overhead_tokens = overhead
            log.info("model %r: a forward's fixed cost is %.0f tokens' worth", name, overhead)

    async def measure_overhead_tokens(self, runner: Any, big: list[Any]) -> float:
        """The fixed cost of one forward in tokens: time a full batch and a one-item batch, fit
        ``seconds = c0 + c1 * padded_tokens``, return ``c0 / c1`` (infinite when the fit fails,
        which makes the batcher fill its budget). On a GPU c0 dominates, so batches fill; on a
        CPU it is small, so the batcher keeps batches short and tight (docs/BENCHMARKS.md)."""
        loop = asyncio.get_running_loop()
        worker = self._workers[self.device]
        small = runner.warmup_items(64, 1)

        streams = self.config.forward_streams

        async def best_of(items: list[Any], n: int) -> float:
            # with several streams, time them running at once: each forward then pays for the
            # cores and the interpreter lock it shares, as it will under load
            best = math.inf
            for _ in range(n):
                t = time.perf_counter()
                await asyncio.gather(
                    *(loop.run_in_executor(worker, runner.forward, items) for _ in range(streams))
                )
                best = min(best, time.perf_counter() - t)
            return best

        def padded(items: list[Any]) -> int:
            lengths = lengths_of(items)
            return len(lengths) * max(lengths)

        t_big, t_small = await best_of(big, 1), await best_of(small, 3)
        p_big, p_small = padded(big), padded(small)
        if p_big <= p_small or t_big <= t_small:
            return math.inf
        c1 = (t_big - t_small) / (p_big - p_small)
        return max(0.0, (t_small - c1 * p_small) / c1)

    def close(self) -> None:
        """Refuse new work; queued work still completes."""
        for b in self.batchers.values():
            b.close()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for every queue to empty; False on timeout."""
        end = time.monotonic() + timeout
        for b in self.batchers.values():
            if not await b.wait_idle(max(0.0, end - time.monotonic())):
                return False
        return True

    async def stop(self) -> None:
        """Stop the batchers and the worker threads."""
        for b in self.batchers.values():
            await b.stop()
        for w in self._workers.values():
            w.shutdown(wait=False, cancel_futures=True)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests
    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument(f"empty batch: the request has no {what}")
        if n > self.config.max_items_per_request:
            raise InvalidArgument(
                f"too many {what}: {n} > max_items_per_request {self.config.max_items_per_request}; split the batch"
            )

    def _resolve(self, name: str, role: str) -> str:
        default = (
            self.config.default_reward_model
            if role == "reward"
            else self.config.default_reference_model
        )
        name = name or default
        own = self.rewards if role == "reward" else self.references
        if name in own or (role == "reward" and name in self.combinations):
            return name
        other = self.references if role == "reward" else {**self.rewards, **self.combinations}
        if name in other:
            rpc = "Score" if role == "reward" else "ReferenceLogProbs"
            raise FailedPrecondition(
                f"model {name!r} is not a {role} model, so it cannot answer {rpc}"
            )
        if not name:
            raise FailedPrecondition(f"this server serves no {role} model")
        known = sorted([*self.rewards, *self.combinations, *self.references])
        raise InvalidArgument(f"unknown model {name!r}; served models: {known}")

    async def score(
        self, model: str, items: list[ScoreInput], truncation: str, deadline: float | None
    ) -> tuple[str, list[ItemResult], Timing]:
        """Score items with a reward model or a combination."""
        t0 = time.monotonic()
        self._check_count(len(items), "items")
        name = self._resolve(model, "reward")
        truncation = truncation or self.config.truncation
        if name in self.combinations:
            comb = self.combinations[name]
            parts = await asyncio.gather(
                *(self._score_one(m, items, truncation, deadline) for m in comb.members)
            )
            results = []
            for i in range(len(items)):
                per = {m: parts[k][0][i].score for k, m in enumerate(comb.members)}
                results.append(
                    ItemResult(
                        comb.apply(per),
                        per,
                        max(p[0][i].num_tokens for p in parts),
                        any(p[0][i].truncated for p in parts),
                    )
                )
            timing = Timing(
                *(max(getattr(p[1], f) for p in parts) for f in ("queue", "tokenize", "inference"))
            )
        else:
            results, timing = await self._score_one(name, items, truncation, deadline)
        timing.total = time.monotonic() - t0
        return name, results, timing

    async def _score_one(
        self, name: str, items: list[ScoreInput], truncation: str, deadline: float | None
    ) -> tuple[list[ItemResult], Timing]:
        runner = self.rewards[name]
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
        sub = await self.batchers[name].submit(
            encoded, [len(e.input_ids) for e in encoded], deadline
        )
        results = []
        for enc, values in zip(encoded, sub.results, strict=True):
            score = runner.combine(values)
            results.append(
                ItemResult(
                    score,
                    runner.head_values(values),
                    len(enc.input_ids),
                    enc.truncated,
                    runner.normalize(score),
                )
            )
        return results, Timing(sub.queue_seconds, tok_s, sub.inference_seconds)

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
        name = self._resolve(model, "reference")
        runner = self.references[name]
        temp = validate_temperature(temperature)
        if fingerprint and fingerprint != runner.fingerprint:
            raise FailedPrecondition(
                f"tokenizer fingerprint {fingerprint!r} does not match model {name!r} ({runner.fingerprint!r}): "
                "the token ids come from another vocabulary"
            )
        runner.validate(seqs)
        for s in seqs:
            s.temperature = temp
        sub = await self.batchers[name].submit(seqs, [len(s.token_ids) for s in seqs], deadline)
        return (
            name,
            sub.results,
            Timing(sub.queue_seconds, 0.0, sub.inference_seconds, time.monotonic() - t0),
        )

    # ------------------------------------------------------------------ info
    def describe(self) -> list[ModelDescription]:
        """Every served model, for GetServerInfo."""
        cfg = self.config
        out = []
        for name, r in self.rewards.items():
            out.append(
                ModelDescription(
                    name,
                    "reward",
                    list(r.heads),
                    r.fingerprint,
                    r.dtype,
                    getattr(r, "backend", "torch"),
                    self.device,
                    r.max_len,
                    name == cfg.default_reward_model,
                    len(r.tokenizer),
                    r.source,
                    r.has_chat_template,
                    r.normalization is not None,
                    r.combiner.spec,
                )
            )
        for name, c in self.combinations.items():
            out.append(
                ModelDescription(
                    name,
                    "combination",
                    c.members,
                    "",
                    "",
                    "",
                    self.device,
                    min(self.rewards[m].max_len for m in c.members),
                    name == cfg.default_reward_model,
                    combine=c.spec,
                )
            )
        for name, r in self.references.items():
            out.append(
                ModelDescription(
                    name,
                    "reference",
                    [],
                    r.fingerprint,
                    r.dtype,
                    "torch",
                    self.device,
                    r.max_len,
                    name == cfg.default_reference_model,
                    r.vocab_size,
                    r.source,
                    r.has_chat_template,
                )
            )
        return out
