"""The model registry: the served models by name and role, loaded for the torch or the ONNX
backend, the resolution of a requested name for an RPC, and their description for GetServerInfo.

Roles: ``reward`` (a reward runner), ``combination`` (a rule over reward models, answered like a
reward model) and ``reference`` (a reference runner). Imports no grpc.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from reward_server.config import ServerConfig
from reward_server.engine import calibration  # noqa: F401 - the OpenMP policy, before torch loads
from reward_server.engine.combine import Combiner, parse_combiner
from reward_server.errors import FailedPrecondition, InvalidArgument
from reward_server.model_version import combination_version, source_version
from reward_server.models.reference import ReferenceRunner
from reward_server.models.reward import RewardRunner

log = logging.getLogger(__name__)

Role = Literal["reward", "reference"]
RPC_OF_ROLE = {"reward": "Score", "reference": "ReferenceLogProbs"}


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
    quantization: str = ""
    input_format: str = ""
    model_version: str = ""


class ModelRegistry:
    """The configured models, loaded once (`load`) and looked up per request (`resolve`)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.device = "cpu"
        self.rewards: dict[str, Any] = {}  # RewardRunner or OnnxRewardRunner
        self.references: dict[str, ReferenceRunner] = {}
        self.combinations: dict[str, Combiner] = {}
        self.versions: dict[str, str] = {}
        """Version (`reward_server.model_version`) of each reward and reference model."""
        self._dtype: Any = None
        self._intra_op_threads = 0

    # ------------------------------------------------------------------ loading
    def load(self, device: str, intra_op_threads: int) -> None:
        """Load every configured model on `device` (blocking) and parse the combination rules;
        `intra_op_threads` goes to the ONNX backend (torch's is set process-wide)."""
        from reward_server.devices import resolve_dtype

        cfg = self.config
        self.device = device
        self._dtype = resolve_dtype(cfg.dtype, device)
        self._intra_op_threads = intra_op_threads
        for name, source in cfg.reward_models.items():
            self.versions[name] = self.version_of(name, source)
            with _timed("reward", name, source):
                self.rewards[name] = self.build_runner("reward", name, source)
        for name, source in cfg.reference_models.items():
            self.versions[name] = self.version_of(name, source)
            with _timed("reference", name, source):
                self.references[name] = self.build_runner("reference", name, source)
        for name, spec in cfg.combinations.items():
            self.combinations[name] = parse_combiner(spec, list(self.rewards))

    def version_of(self, name: str, source: str) -> str:
        """The version of model `name` loaded from `source` (with its configured adapter)."""
        t0 = time.monotonic()
        version = source_version(source, self.config.adapters.get(name, ""))
        log.info("model %r: version %s (hashed in %.3fs)", name, version, time.monotonic() - t0)
        return version

    def role_of(self, name: str) -> str:
        """``reward``, ``reference`` or ``combination`` of a served name; InvalidArgument if none."""
        for role, own in (
            ("reward", self.rewards),
            ("reference", self.references),
            ("combination", self.combinations),
        ):
            if name in own:
                return role
        known = sorted([*self.rewards, *self.combinations, *self.references])
        raise InvalidArgument(f"unknown model {name!r}; served models: {known}")

    def build_runner(self, role: str, name: str, source: str) -> Any:
        """Load one reward or reference runner of model `name` from `source` (blocking), with the
        settings of the initial load (device, dtype, quantization, adapter...)."""
        cfg = self.config
        if role == "reward":
            return self._reward_runner(name, source, self._dtype, self._intra_op_threads)
        return ReferenceRunner(
            name,
            source,
            slice_bytes=int(cfg.logprob_slice_mb * (1 << 20)),
            quantization=cfg.reference_quantization,
            prefix_sharing=cfg.prefix_sharing and not cfg.batch_invariant,
            prefix_cache_mb=cfg.prefix_cache_mb,
            **self._torch_options(name, self._dtype),
        )

    def combination_version(self, name: str, member_versions: dict[str, str] | None = None) -> str:
        """Combination `name`'s version from its members' (current ones unless given)."""
        comb = self.combinations[name]
        versions = member_versions or self.versions
        return combination_version(comb.spec, [(m, versions[m]) for m in comb.members])

    def _reward_runner(self, name: str, source: str, dtype: Any, intra_op_threads: int) -> Any:
        cfg = self.config
        head_combine = cfg.head_combine.get(name, "")
        if cfg.backend == "onnx":
            from reward_server.models.onnx_reward import OnnxRewardRunner

            return OnnxRewardRunner(
                name,
                source,
                device=self.device,
                max_input_tokens=cfg.max_input_tokens,
                head_combine=head_combine,
                intra_op_threads=intra_op_threads,
                input_format=cfg.input_formats.get(name, "auto"),
            )
        return RewardRunner(
            name,
            source,
            quantization=cfg.quantization,
            prefix_sharing=cfg.prefix_sharing and not cfg.batch_invariant,
            prefix_cache_mb=cfg.prefix_cache_mb,
            head_combine=head_combine,
            input_format=cfg.input_formats.get(name, "auto"),
            **self._torch_options(name, dtype),
        )

    def _torch_options(self, name: str, dtype: Any) -> dict[str, Any]:
        """What loading a torch checkpoint takes, the same for reward and reference models."""
        cfg = self.config
        return {
            "device": self.device,
            "dtype": dtype,
            "adapter": cfg.adapters.get(name, ""),
            "trust_remote_code": cfg.trust_remote_code,
            "max_input_tokens": cfg.max_input_tokens,
        }

    def runners(self) -> dict[str, Any]:
        """Every model that runs forwards (reward and reference runners), by name."""
        return {**self.rewards, **self.references}

    # ------------------------------------------------------------------ requests
    def resolve(self, name: str, role: Role) -> str:
        """The served model answering an RPC of `role` for a requested name ("" = the default).

        A name served under another role is FAILED_PRECONDITION (so is a role this server does
        not serve at all); an unknown name is INVALID_ARGUMENT listing the served models.
        """
        cfg = self.config
        name = name or (
            cfg.default_reward_model if role == "reward" else cfg.default_reference_model
        )
        own = self.rewards if role == "reward" else self.references
        if name in own or (role == "reward" and name in self.combinations):
            return name
        other = self.references if role == "reward" else {**self.rewards, **self.combinations}
        if name in other:
            raise FailedPrecondition(
                f"model {name!r} is not a {role} model, so it cannot answer {RPC_OF_ROLE[role]}"
            )
        if not name:
            raise FailedPrecondition(f"this server serves no {role} model")
        known = sorted([*self.rewards, *self.combinations, *self.references])
        raise InvalidArgument(f"unknown model {name!r}; served models: {known}")

    # ------------------------------------------------------------------ info
    def describe(self) -> list[ModelDescription]:
        """Every served model, for GetServerInfo: reward models, combinations, references."""
        cfg = self.config
        out = [
            ModelDescription(
                role="reward",
                heads=list(r.heads),
                backend=r.backend,
                is_default=name == cfg.default_reward_model,
                vocab_size=len(r.tokenizer),
                has_normalization=r.normalization is not None,
                combine=r.combiner.spec,
                quantization=cfg.quantization if r.backend == "torch" else "",
                input_format=r.input_format,
                model_version=self.versions.get(name, ""),
                **self._runner_fields(name, r),
            )
            for name, r in self.rewards.items()
        ]
        out += [
            ModelDescription(
                name=name,
                role="combination",
                heads=c.members,
                backend="",
                device=self.device,
                max_input_tokens=min(self.rewards[m].max_len for m in c.members),
                is_default=name == cfg.default_reward_model,
                has_normalization=all(self.rewards[m].normalization is not None for m in c.members),
                combine=c.spec,
                model_version=self.combination_version(name),
            )
            for name, c in self.combinations.items()
        ]
        out += [
            ModelDescription(
                role="reference",
                backend="torch",
                is_default=name == cfg.default_reference_model,
                vocab_size=r.vocab_size,
                quantization=cfg.reference_quantization,
                model_version=self.versions.get(name, ""),
                **self._runner_fields(name, r),
            )
            for name, r in self.references.items()
        ]
        return out

    def _runner_fields(self, name: str, runner: Any) -> dict[str, Any]:
        """The description fields every loaded runner has, whatever its role."""
        return {
            "name": name,
            "fingerprint": runner.fingerprint,
            "dtype": runner.dtype,
            "device": self.device,
            "max_input_tokens": runner.max_len,
            "source": runner.source,
            "has_chat_template": runner.has_chat_template,
        }


@contextlib.contextmanager
def _timed(role: str, name: str, source: str) -> Iterator[None]:
    """Log how long loading one model took."""
    t0 = time.monotonic()
    yield
    log.info("loaded %s model %r from %s in %.1fs", role, name, source, time.monotonic() - t0)
