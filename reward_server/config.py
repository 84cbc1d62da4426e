"""Typed configuration of `reward-server serve`, validated once at load.

Each field below is a YAML key and a flag (``max_batch_tokens`` -> ``--max-batch-tokens``); the
flags are generated from the fields by `reward_server.config_base`, which also loads the file.
Flags override the file. `ServerConfig.validate` runs once; everything after trusts the values.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reward_server.config_base import ConfigError, require

__all__ = ["ConfigError", "ServerConfig", "parse_named"]
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
"""A tenant's name (serve/tenants.py applies the same rule to names sent in metadata)."""


@dataclass
class ServerConfig:
    """Everything `reward-server serve` needs. Each field is also a flag and a YAML key."""

    host: str = "127.0.0.1"
    """Address to bind. Loopback unless told otherwise (0.0.0.0 in containers)."""
    port: int = 50051
    """gRPC port (0 picks a free one; the chosen port is logged)."""
    reward_models: dict[str, str] = field(default_factory=dict)
    """Reward models to serve: name -> local directory or hub id."""
    reference_models: dict[str, str] = field(default_factory=dict)
    """Reference (frozen policy) models: name -> local directory or hub id."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Optional PEFT adapter per model name (merged into the weights for inference)."""
    combinations: dict[str, str] = field(default_factory=dict)
    """Named combinations of reward models served as one `model`, e.g.
    ``{"overall": "weighted:helpful=1.0,safe=0.5"}`` or ``{"gated": "min:helpful,safe"}``."""
    head_combine: dict[str, str] = field(default_factory=dict)
    """Per multi-head reward model: how `score` comes from its heads (``head:NAME``, ``mean``,
    ``min``, ``weighted:a=1,b=0.5``); default is the first head."""
    input_formats: dict[str, str] = field(default_factory=dict)
    """Per reward model: how a prompt/completion pair becomes its input: ``text`` (prompt +
    completion, one string), ``pair`` (the tokenizer's text pair, ``tokenizer(prompt,
    completion)``: separator and segment ids, as encoder RMs such as OpenAssistant's DeBERTa
    were trained), ``chat`` (user and assistant messages through the model's chat template) or
    ``auto``: the checkpoint's ``reward_input_format`` if its config has one, else ``pair`` for
    an encoder (BERT, RoBERTa, DeBERTa, ...) whose tokenizer has a separator, else ``text``."""
    default_reward_model: str = ""
    """Model answering a Score request with an empty `model` (default: the first reward model)."""
    default_reference_model: str = ""
    """Model answering ReferenceLogProbs with an empty `model` (default: the first one)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto (bfloat16 on CUDA when supported, float32 on CPU), float32, bfloat16,
    float16. Log-probs are always computed in float32."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes weight quantization for reward models: none, 8bit or 4bit."""
    reference_quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes weight quantization for reference models: none, 8bit or 4bit. Separate from
    `quantization` because the reference log-probs feed the trainer's KL penalty, which then
    carries the quantization's error (measured in docs/BENCHMARKS.md)."""
    backend: Literal["torch", "onnx"] = "torch"
    """Reward-model backend: torch, or onnx (a directory written by `reward-server export-onnx`)."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless the operator turns it on."""
    max_batch_tokens: int = 0
    """Padded-token budget of one batch (items x longest item). 0 = per device: 2048 on CPU
    (measured best for GPT-2-small shapes there, see docs/BENCHMARKS.md), 16384 on CUDA."""
    max_batch_items: int = 64
    """Most items in one forward."""
    max_wait_ms: float = 5.0
    """Longest an item waits for a fuller batch once the device is free."""
    skip_wait_when_idle: bool = True
    """Dispatch at once, without max_wait_ms, while nearly every recent request found the model
    idle and its queue empty (one client waiting for each answer: waiting brings no company)."""
    forward_streams: int = 0
    """Forwards run at once per device, each on its own worker thread (like Triton's model
    instances). 0 = per device: 2 on CUDA, 1 on a CPU (with forward_process or batch_invariant,
    one per usable core, each single-threaded). On a GPU the server's forward is bound by
    kernel launches under the interpreter lock it shares with the RPC threads, so a second stream
    keeps the GPU busy while the first launches (gpt2-1b on an H200: 77k -> 109k tokens/s,
    docs/BENCHMARKS.md, "GPU"). On a CPU, small models gain from 2 streams of 1 intra-op thread
    over one of 2 threads; a lone request then gets fewer threads. Each stream holds its own
    activations."""
    intra_op_threads: int = 0
    """torch (and onnxruntime) intra-op threads per forward; 0 = the default, and with several
    forward streams on a CPU, the usable cores divided among the streams (with forward_process:
    elastic, a forward that starts while the other workers are idle uses every usable core)."""
    forward_process: bool = False
    """CPU, torch backend: run each model's forward in worker processes of its own (one per
    forward stream; by default one single-threaded worker per usable core), not on a thread of the server's process, so the model's Python and the
    request path (gRPC, asyncio, tokenisation) never wait for one interpreter lock. The weights
    are loaded once and shared with the workers; a worker that dies fails its batch with
    UNAVAILABLE and is started again (docs/API.md, "Batching")."""
    batch_overhead_tokens: float = -1.0
    """A forward's fixed cost in tokens' worth, which decides how much padding a batch may take on
    to add an item (docs/API.md, batching). -1 = per device: measured at warm-up on a CPU
    (infinite without warm-up); on CUDA the token budget is filled (the cost measured in an idle
    warm-up understates a loaded GPU server's fixed cost 4-fold, docs/BENCHMARKS.md, "GPU");
    0 = never pad for company (tightest batches); a very large value (e.g. 1e9) = fill the budget."""
    max_queue_items: int = 4096
    """Queued items per model before new requests get RESOURCE_EXHAUSTED."""
    max_items_per_request: int = 512
    """Most items (or sequences) in one request; clients split larger batches."""
    max_input_tokens: int = 0
    """Longest input accepted (tokens); 0 = the model's own maximum."""
    truncation: Literal["error", "left", "right"] = "error"
    """Default for inputs over the limit: error (INVALID_ARGUMENT), left or right."""
    logprob_slice_mb: float = 64.0
    """Memory budget (MiB) for one [rows, vocab] float32 logits slice in ReferenceLogProbs; the
    full [batch, seq, vocab] tensor is never built."""
    batch_invariant: bool = False
    """Every score and reference log-prob bitwise identical whatever the item is batched with,
    however much padding its batch has and however many forward streams run: each item's
    forward runs alone (a batch of one, no padding, no shared prefix) with a fixed number of
    intra-op threads (`intra_op_threads`, default 1 in this mode), inside the batches the batcher
    still forms; forward streams default to the usable cores. Costs throughput where batching
    paid (docs/BENCHMARKS.md, "Batch-invariant serving"). For runs that repeat bit for bit."""
    prefix_sharing: bool = True
    """Items of one batch that share leading tokens (the k samples of one prompt) run those
    tokens once through a decoder reward or reference model, against a key/value cache
    (docs/API.md, "Batching"); encoder models always take the normal path. Same numbers within
    float rounding."""
    prefix_cache_mb: float = 256.0
    """Memory budget (MiB) of the prefix key/value cache gathered for one pass of continuations;
    a larger group runs in several passes (never fails)."""
    tokenizer_threads: int = 2
    """Threads for tokenisation (the fast tokenizers release the GIL)."""
    inline_tokenize_chars: int = 4096
    """Score requests with at most this many characters of text are tokenised on the event loop
    (cheaper than the hop to the tokenizer threads and back); longer ones on the tokenizer
    threads. 0 = always on the tokenizer threads."""
    warmup: bool = True
    """Run one largest-batch forward per model before reporting SERVING."""
    metrics_port: int = 0
    """Prometheus metrics HTTP port (0 = off)."""
    http_port: int = 0
    """HTTP/JSON door on this port (0 = off): OpenRLHF's POST /get_reward, POST /v1/score,
    POST /v1/reference_logprobs, GET /health; same process, models, batching, tokens and TLS as
    the gRPC port (docs/API.md, "HTTP/JSON front door")."""
    grace_seconds: float = 30.0
    """On SIGTERM, how long in-flight work may take to finish before the server stops."""
    max_message_mb: int = 64
    """Largest gRPC message accepted and sent (MiB)."""
    max_connection_age_s: float = 0.0
    """Close client connections after this age so clients re-resolve DNS (0 = never)."""
    tls_cert: str = ""
    """Server certificate (PEM). With tls_key, the server speaks TLS only."""
    tls_key: str = ""
    """Server private key (PEM)."""
    tls_client_ca: str = ""
    """CA bundle for client certificates: when set, clients must present one (mutual TLS)."""
    auth_token_file: str = ""
    """File of accepted bearer tokens, one per line (env RLHF_AUTH_TOKENS adds comma-separated)."""
    open_health: bool = False
    """Let the health service answer without credentials (for probes) when auth is on."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: Literal["text", "json"] = "text"
    """text or json (one JSON object per line)."""
    tenant_shares: dict[str, str] = field(default_factory=dict)
    """Share of each tenant in the fair scheduling of a model's batcher (deficit round robin
    over tokens; docs/API.md, "Tenants"): tenant name -> weight > 0, e.g. ``{"ppo-a": 3}``;
    unlisted tenants weigh 1."""
    tenant_max_queued_items: int = 0
    """Queued items per tenant and model before that tenant's new requests get
    RESOURCE_EXHAUSTED (other tenants keep being served); 0 = no per-tenant quota, only
    max_queue_items."""
    tenant_quotas: dict[str, str] = field(default_factory=dict)
    """Per-tenant override of tenant_max_queued_items: tenant name -> items (0 = no quota)."""
    tenant_fast_lane: bool = True
    """While other tenants' forwards hold the device, run a light tenant's queued items (one
    that asks no more than its share and at most a quarter of max_batch_tokens) at once in one
    extra forward on a thread of its own, instead of after the running forward and in a full
    batch (docs/API.md, "Tenants"). Off: every batch waits for a forward stream."""
    max_metadata_tenants: int = 64
    """With auth off: distinct tenant names taken from the ``tenant`` metadata key (HTTP:
    X-Tenant header) before further names all count as the tenant ``other`` (bounds the metrics'
    labels and the batcher's state)."""
    # ---------------------------------------------------------------- model versions, reload
    admin_token_file: str = ""
    """File of admin bearer tokens, one per line (env RLHF_ADMIN_TOKENS adds comma-separated):
    turns on AdminService (ReloadModel). Off when empty. The scoring tokens are never admin
    tokens (the server refuses to start when a token is in both)."""
    reload_transition_s: float = 300.0
    """After a reload, how long the old version keeps answering requests pinned to it (then
    they get FAILED_PRECONDITION); 0 = drop it once its in-flight requests finish."""
    telemetry: bool = True
    """Reward-hacking telemetry: per reward model and tenant, a sliding window of the scores
    (distribution, score-length correlation, member rank correlation, drift from the first
    window) for GetStats, ``reward-server info --stats`` and /metrics (docs/DEPLOY.md)."""
    telemetry_window_items: int = 1000
    """Telemetry window: the last this many scored items per model and tenant."""
    telemetry_window_seconds: float = 0.0
    """Telemetry window: only the items of the last this many seconds (0 = no time limit)."""
    telemetry_max_tenants: int = 16
    """Distinct tenants with their own telemetry windows and metric labels; later ones share
    the tenant ``_other`` (bounded label cardinality)."""
    stats_viewers: list[str] = field(default_factory=list)
    """With auth on: the tenants (token names) whose GetStats sees every tenant's telemetry
    windows; any other caller sees only its own tenant's (and PERMISSION_DENIED asking for
    another's). With auth off everyone sees everything. Comma-separated on the command line."""

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Ranges and cross-field rules (types and choices were checked at load); raise
        ConfigError naming the key."""

        require(
            bool(self.reward_models or self.reference_models),
            "serve at least one model: --reward-model or --reference-model",
        )
        names = list(self.reward_models) + list(self.reference_models) + list(self.combinations)
        dup = {n for n in names if names.count(n) > 1}
        require(not dup, f"model names must be unique across roles; repeated: {sorted(dup)}")
        for name in self.adapters:
            require(
                name in self.reward_models or name in self.reference_models,
                f"adapter for unknown model {name!r}",
            )
        for name in self.head_combine:
            require(name in self.reward_models, f"head_combine for unknown reward model {name!r}")
        for name, fmt in self.input_formats.items():
            require(name in self.reward_models, f"input_formats for unknown reward model {name!r}")
            require(
                fmt in ("auto", "text", "pair", "chat"),
                f"input_formats[{name!r}] must be one of auto, text, pair, chat, got {fmt!r}",
            )
        if self.reward_models and not self.default_reward_model:
            self.default_reward_model = next(iter(self.reward_models))
        if self.reference_models and not self.default_reference_model:
            self.default_reference_model = next(iter(self.reference_models))
        require(
            not self.default_reward_model
            or self.default_reward_model in self.reward_models
            or self.default_reward_model in self.combinations,
            f"default_reward_model {self.default_reward_model!r} is not a served reward model",
        )
        require(
            not self.default_reference_model
            or self.default_reference_model in self.reference_models,
            f"default_reference_model {self.default_reference_model!r} is not a served reference model",
        )
        require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        require(0 <= int(self.port) <= 65535, f"port out of range: {self.port}")
        require(0 <= self.http_port <= 65535, f"http_port out of range: {self.http_port}")
        require(
            not self.http_port or self.http_port not in (self.port, self.metrics_port),
            f"http_port {self.http_port} is also the gRPC or metrics port",
        )
        require(
            self.max_batch_tokens >= 0, "max_batch_tokens must be >= 0 (0 = per-device default)"
        )
        require(self.max_batch_items >= 1, "max_batch_items must be >= 1")
        require(
            self.max_queue_items >= self.max_batch_items,
            "max_queue_items must be >= max_batch_items",
        )
        require(self.max_items_per_request >= 1, "max_items_per_request must be >= 1")
        require(self.max_input_tokens >= 0, "max_input_tokens must be >= 0")
        require(
            math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0, "max_wait_ms must be >= 0"
        )
        require(self.logprob_slice_mb > 0, "logprob_slice_mb must be > 0")
        require(self.prefix_cache_mb > 0, "prefix_cache_mb must be > 0")
        require(
            self.batch_overhead_tokens == -1 or self.batch_overhead_tokens >= 0,
            "batch_overhead_tokens must be >= 0, or -1 (measured at warm-up)",
        )
        require(self.inline_tokenize_chars >= 0, "inline_tokenize_chars must be >= 0")
        require(self.forward_streams >= 0, "forward_streams must be >= 1, or 0 (per device)")
        require(self.intra_op_threads >= 0, "intra_op_threads must be >= 0 (0 = default)")
        require(self.tokenizer_threads >= 1, "tokenizer_threads must be >= 1")
        require(self.grace_seconds >= 0, "grace_seconds must be >= 0")
        require(self.max_message_mb >= 1, "max_message_mb must be >= 1")
        require(bool(self.tls_cert) == bool(self.tls_key), "tls_cert and tls_key go together")
        require(
            not self.tls_client_ca or bool(self.tls_cert),
            "tls_client_ca (mutual TLS) needs tls_cert and tls_key",
        )
        require(
            math.isfinite(self.reload_transition_s) and self.reload_transition_s >= 0,
            "reload_transition_s must be >= 0",
        )
        require(self.telemetry_window_items >= 2, "telemetry_window_items must be >= 2")
        require(
            math.isfinite(self.telemetry_window_seconds) and self.telemetry_window_seconds >= 0,
            "telemetry_window_seconds must be >= 0 (0 = no time limit)",
        )
        require(self.telemetry_max_tenants >= 1, "telemetry_max_tenants must be >= 1")
        for key in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file"):
            val = getattr(self, key)
            require(not val or os.path.isfile(val), f"{key}: file {val!r} does not exist")
        require(
            not (self.forward_process and self.device.startswith("cuda")),
            "forward_process runs the forward on a CPU only (a GPU's kernels already run outside "
            "the interpreter lock; use forward_streams there)",
        )
        require(
            not (self.forward_process and self.backend != "torch"),
            "forward_process needs the torch backend (onnxruntime runs its forward outside the "
            "interpreter lock already)",
        )
        if self.backend == "onnx":
            require(self.quantization == "none", "quantization applies to the torch backend only")
            require(
                not self.adapters,
                "adapters apply to the torch backend only (--adapter with --backend onnx): merge "
                "the adapter into the checkpoint before `reward-server export-onnx`",
            )
        self._validate_tenants()

    def _validate_tenants(self) -> None:
        """The tenant keys: names, weights and quotas (read back by `shares` and `quotas`)."""
        for key in ("tenant_shares", "tenant_quotas", "stats_viewers"):
            for name in getattr(self, key):
                require(
                    TENANT_NAME.match(name) is not None,
                    f"{key}: tenant name {name!r} must be 1-64 letters, digits, '_', '.', '-'",
                    key,
                )
        for name, raw in self.tenant_shares.items():
            try:
                weight = float(raw)
            except ValueError:
                weight = math.nan
            require(
                math.isfinite(weight) and 0.01 <= weight <= 100,
                f"tenant_shares[{name!r}] must be a number in [0.01, 100], got {raw!r}",
                "tenant_shares",
            )
        for name, raw in self.tenant_quotas.items():
            require(
                raw.strip().isdigit(),
                f"tenant_quotas[{name!r}] must be an integer >= 0, got {raw!r}",
                "tenant_quotas",
            )
        require(self.tenant_max_queued_items >= 0, "tenant_max_queued_items must be >= 0")
        require(self.max_metadata_tenants >= 1, "max_metadata_tenants must be >= 1")

    def resolved_max_batch_tokens(self, device: str) -> int:
        """The padded-token budget for a device (the configured one, else the device default)."""
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return 16384 if device.startswith("cuda") else 2048

    def resolved_forward_streams(self, device: str) -> int:
        """Forwards at once on a device (the configured number, else 2 on CUDA, 1 on a CPU;
        batch-invariant on a CPU: one per usable core, each forward being a single item;
        forward_process: one worker process per usable core, each single-threaded, as Triton
        and TorchServe run CPU model instances: separate interpreters run their forwards' Python
        side by side, and one worker runs while the server turns the other's batch around; a
        2 x 128 model, 32 clients x 1 item: 0.60x -> 0.85x the in-process limit with one worker
        of 2 threads -> two of 1 thread, docs/BENCHMARKS.md)."""
        if self.forward_streams:
            return self.forward_streams
        if device.startswith("cuda"):
            return 2
        per_core = self.batch_invariant or self.forward_process
        return max(1, len(os.sched_getaffinity(0))) if per_core else 1

    def resolved_intra_op_threads(self) -> int:
        """The configured intra-op threads; batch-invariant: 1 unless set (a forward's float
        sums are split across its threads, so their number must not change with the streams)."""
        return self.intra_op_threads or (1 if self.batch_invariant else 0)

    def resolved_batch_overhead_tokens(self, device: str) -> float | None:
        """The batcher's fixed forward cost: the configured one, 1e9 (fill the budget) on CUDA,
        or None on a CPU (measured at warm-up)."""
        if self.batch_overhead_tokens >= 0:
            return self.batch_overhead_tokens
        # batch-invariant: items run one at a time, so padding costs nothing: fill the budget
        return 1e9 if device.startswith("cuda") or self.batch_invariant else None

    def auth_tokens(self) -> list[str]:
        """Accepted bearer tokens from the token file and RLHF_AUTH_TOKENS (never logged)."""
        return [token for _, token in self.named_auth_tokens()]

    def named_auth_tokens(self) -> list[tuple[str, str]]:
        """(tenant name, token) of every accepted bearer token: the token file's lines, then
        RLHF_AUTH_TOKENS' comma-separated entries. An entry is ``TOKEN`` or ``NAME:TOKEN``; a
        token without a name is named ``token-N`` (N: its position, from 1), never after the
        token itself; blank lines and lines starting with ``#`` are skipped. Several tokens may
        share a name (one tenant, e.g. while a token is rotated)."""
        entries: list[str] = []
        if self.auth_token_file:
            lines = Path(self.auth_token_file).read_text().splitlines()
            entries += [t.strip() for t in lines if not t.strip().startswith("#")]
        entries += [t.strip() for t in os.environ.get("RLHF_AUTH_TOKENS", "").split(",")]
        out: list[tuple[str, str]] = []
        for entry in entries:
            if not entry:
                continue
            name, sep, token = entry.partition(":")
            if not sep:
                name, token = f"token-{len(out) + 1}", entry
            name, token = name.strip(), token.strip()
            if not token or TENANT_NAME.match(name) is None:
                raise ConfigError(  # the message never shows the token
                    f"auth token #{len(out) + 1}: expected TOKEN or NAME:TOKEN with NAME of 1-64 "
                    "letters, digits, '_', '.', '-'",
                    key="auth_token_file",
                )
            out.append((name, token))
        return out

    def shares(self) -> dict[str, float]:
        """tenant_shares as numbers (validated)."""
        return {name: float(w) for name, w in self.tenant_shares.items()}

    def quotas(self) -> dict[str, int]:
        """tenant_quotas as numbers (validated)."""
        return {name: int(q) for name, q in self.tenant_quotas.items()}

    def admin_tokens(self) -> list[str]:
        """Admin bearer tokens from admin_token_file and RLHF_ADMIN_TOKENS (never logged);
        ConfigError when one of them is also a scoring token."""
        tokens: list[str] = []
        if self.admin_token_file:
            tokens += [t.strip() for t in Path(self.admin_token_file).read_text().splitlines()]
        tokens += os.environ.get("RLHF_ADMIN_TOKENS", "").split(",")
        tokens = [t for t in tokens if t]
        if set(tokens) & set(self.auth_tokens()):
            raise ConfigError(
                "admin_token_file: a token is both an admin and a scoring token; admin tokens "
                "must differ from the scoring tokens",
                key="admin_token_file",
            )
        return tokens


def parse_named(
    values: list[str] | None, flag: str, bare_name: str | None = None
) -> dict[str, str] | None:
    """Parse repeated ``NAME=VALUE`` flags. With ``bare_name``, ``[NAME=]VALUE``: a bare value
    (or one whose "name" looks like a path) is named ``bare_name``, then ``bare_name2``, ..."""
    if not values:
        return None
    out: dict[str, str] = {}
    for i, raw in enumerate(values):
        name, sep, val = raw.partition("=")
        if bare_name and (not sep or "/" in name or name.startswith(".")):
            name, val = (bare_name if i == 0 else f"{bare_name}{i + 1}"), raw
        if not sep and not bare_name or not name or not val:
            form = "[NAME=]VALUE" if bare_name else "NAME=VALUE"
            raise ConfigError(f"{flag}: expected {form}, got {raw!r}")
        if name in out:
            raise ConfigError(f"{flag}: name {name!r} given twice")
        out[name] = val
    return out
