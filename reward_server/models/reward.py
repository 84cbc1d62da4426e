"""Reward models: tokenise with the model's own tokenizer, batch, forward, combine heads."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from reward_server.engine.combine import Combiner, parse_combiner
from reward_server.errors import InvalidArgument
from reward_server.fingerprint import tokenizer_fingerprint
from reward_server.models.loading import LoadOptions, load_model, max_positions
from reward_server.models.prefix import (
    PACK_ROW_TOKENS,
    Group,
    PrefixPass,
    SharingObserver,
    cache_argument,
    chunk_members,
    chunk_rows,
    distinct_heads,
    forward_grouped,
    pack_rows,
    packed_head,
    plan_groups,
    probe_ids,
    run_continuations,
    run_packed,
    run_prefix,
    sharing_agrees,
)
from reward_server.models.runner import run_with_oom_split
from reward_server.models.text_format import render_messages, render_pair
from reward_server.tokenizer_loading import classifier_pad_id, load_tokenizer

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


@dataclass
class ScoreInput:
    """One item as text: prompt + completion, or chat messages (list of role/content dicts);
    or as token ids of the model's vocabulary (`token_ids`, scored exactly as given)."""

    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    """Token-in scoring: the model's input ids as the caller's tokenizer (of the same
    fingerprint) produced them: no rendering, no tokenisation, no special tokens added."""


@dataclass
class EncodedItem:
    """One tokenised item, ready for the batcher."""

    input_ids: list[int]
    truncated: bool
    token_type_ids: list[int] | None = None
    """Segment ids of a text pair (input format ``pair``), else None."""


INPUT_FORMATS = ("text", "pair", "chat")
ENCODER_TYPES = frozenset(
    {
        "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra",
        "ernie", "mpnet", "modernbert", "roberta", "xlm-roberta", "xlm-roberta-xl",
    }
)  # fmt: skip
"""`model_type`s of bidirectional encoders, trained as cross-encoders on text pairs."""


def detect_input_format(config: Any, tokenizer: Any) -> str:
    """``auto``: what the checkpoint says (``reward_input_format`` in its config), else ``pair``
    for an encoder whose tokenizer has a separator (OpenAssistant's DeBERTa reward models were
    trained on ``tokenizer(question, answer)``:
    https://huggingface.co/OpenAssistant/reward-model-deberta-v3-large-v2), else ``text``."""
    stated = getattr(config, "reward_input_format", None)
    if stated in INPUT_FORMATS:
        return str(stated)
    if getattr(config, "model_type", "") in ENCODER_TYPES and getattr(tokenizer, "sep_token", None):
        return "pair"
    return "text"


class RewardRunnerBase:
    """What every reward-model backend shares: metadata from the config, the tokenizer, text
    rendering and truncation, head naming and combination. A backend sets the model, calls
    `_init_common`, and implements `_forward` (padded batch -> [num_heads] float32 per item)."""

    backend = "torch"

    def _init_common(
        self,
        name: str,
        source: str,
        device: str,
        tokenizer: Any,
        config: Any,
        limit: int,
        max_input_tokens: int,
        head_combine: str,
        input_format: str = "auto",
    ) -> None:
        self.name, self.source, self.device = name, source, device
        self.tokenizer = tokenizer
        self.max_len = min(limit, max_input_tokens) if max_input_tokens else limit
        self.heads = head_names(config, name)
        try:
            self.combiner: Combiner = parse_combiner(
                head_combine or f"head:{self.heads[0]}", self.heads
            )
        except ValueError as exc:
            raise ValueError(f"reward model {name!r}: {exc}") from None
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.normalization = normalization_of(config, name)
        self._fast_encode = fast_encoder(self.tokenizer)
        fmt = detect_input_format(config, tokenizer) if input_format == "auto" else input_format
        if fmt == "chat" and not self.has_chat_template:
            raise ValueError(f"reward model {name!r}: input format 'chat' needs a chat template")
        if fmt == "pair" and not getattr(tokenizer, "sep_token", None):
            raise ValueError(
                f"reward model {name!r}: input format 'pair' needs a tokenizer with a separator "
                "token (a text-pair tokenizer)"
            )
        self.input_format = fmt

    # ------------------------------------------------------------------ encoding
    def render(self, items: Sequence[ScoreInput]) -> list[str]:
        """Items to text (`text_format`, shared with training); InvalidArgument names the item."""
        texts = []
        for i, it in enumerate(items):
            if it.messages:
                if not self.has_chat_template:
                    raise InvalidArgument(
                        f"item {i}: model {self.name!r} has no chat template; send prompt and completion instead of messages"
                    )
                for j, m in enumerate(it.messages):
                    if not m.get("content"):
                        raise InvalidArgument(f"item {i}: message {j} has empty content")
                    if not m.get("role"):
                        raise InvalidArgument(f"item {i}: message {j} has an empty role")
                try:
                    texts.append(render_messages(self.tokenizer, it.messages))
                except ValueError as exc:  # the chat template refused the conversation
                    raise InvalidArgument(f"item {i}: {exc}") from None
            else:
                if not it.completion:
                    raise InvalidArgument(
                        f"item {i}: completion is empty (send a non-empty completion, or messages)"
                    )
                if self.input_format == "chat":
                    msgs = [{"role": "user", "content": it.prompt}] if it.prompt else []
                    msgs.append({"role": "assistant", "content": it.completion})
                    texts.append(render_messages(self.tokenizer, msgs))
                else:
                    texts.append(render_pair(self.tokenizer, it.prompt, it.completion))
        return texts

    def id_limit(self) -> int:
        """Token ids a request may send are in [0, id_limit): the tokenizer's vocabulary, within
        the model's embedding rows."""
        return min(len(self.tokenizer), self.vocab_rows())

    def _check_ids(self, items: Sequence[ScoreInput]) -> list[list[int]]:
        """Token-in items' ids; InvalidArgument naming the item for text and ids in one item, a
        request mixing text and id items, ids out of the vocabulary, or a text-pair model."""
        limit = self.id_limit()
        out = []
        for i, it in enumerate(items):
            ids = it.token_ids
            if not ids:
                raise InvalidArgument(
                    f"item {i} is text but other items have token_ids: a request sends either "
                    "text or token_ids for all its items"
                )
            if it.prompt or it.completion or it.messages:
                raise InvalidArgument(
                    f"item {i}: set either token_ids or prompt/completion/messages, not both"
                )
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= limit:
                raise InvalidArgument(
                    f"item {i}: token id {lo if lo < 0 else hi} out of vocabulary "
                    f"[0, {limit - 1}] of model {self.name!r}"
                )
            out.append(ids)
        if self.input_format == "pair":
            raise InvalidArgument(
                f"model {self.name!r} reads text pairs (input_format 'pair': separator and "
                "segment ids): send prompt and completion text, not token_ids"
            )
        return out

    def encode(self, items: Sequence[ScoreInput], truncation: str) -> list[EncodedItem]:
        """Tokenise with the model's tokenizer (or take the items' token ids as given) and apply
        the truncation policy."""
        types_list: list[Any] = [None] * len(items)
        if any(it.token_ids for it in items):
            ids_list: list[Any] = self._check_ids(items)
        elif self.input_format == "pair" and any(not it.messages for it in items):
            ids_list, types_list = self._encode_pairs(items)
        else:
            texts = self.render(items)
            if self._fast_encode is not None:
                ids_list = self._fast_encode(texts)
            else:
                ids_list = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        out = []
        for i, (ids, types) in enumerate(zip(ids_list, types_list, strict=True)):
            if not ids:
                raise InvalidArgument(f"item {i}: text tokenises to zero tokens")
            truncated = False
            if len(ids) > self.max_len:
                if truncation == "error":
                    raise InvalidArgument(
                        f"item {i}: input is {len(ids)} tokens, over the limit of {self.max_len} "
                        "for model {!r}; shorten it or request truncation LEFT or RIGHT".format(
                            self.name
                        )
                    )
                keep = slice(-self.max_len, None) if truncation == "left" else slice(self.max_len)
                ids, types = ids[keep], (types[keep] if types is not None else None)
                truncated = True
            out.append(EncodedItem(list(ids), truncated, list(types) if types else None))
        return out

    def _encode_pairs(self, items: Sequence[ScoreInput]) -> tuple[list[Any], list[Any]]:
        """Input format ``pair``: ``tokenizer(prompt, completion)`` per item (separator, segment
        ids); chat items through the template as usual."""
        self.render(items)  # the same checks (empty completion, messages) as the other formats
        ids_list: list[Any] = []
        types_list: list[Any] = []
        for it in items:
            if it.messages:
                enc = self.tokenizer(render_messages(self.tokenizer, it.messages))
            else:
                enc = self.tokenizer(it.prompt, it.completion)
            ids_list.append(enc["input_ids"])
            types_list.append(enc.get("token_type_ids"))
        return ids_list, types_list

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Sequence[EncodedItem]) -> list[np.ndarray]:
        """Head values [num_heads] per item, float32; OOM splits the batch (runs in the worker)."""
        return run_with_oom_split(self._forward, batch)

    def head_values(self, values: np.ndarray) -> dict[str, float]:
        """Named head values of one item."""
        return {h: float(v) for h, v in zip(self.heads, values, strict=True)}

    def combine(self, values: np.ndarray) -> float:
        """`score` of one item from its head values."""
        return float(self.combiner.apply(self.head_values(values)))

    def normalize(self, score: float) -> float | None:
        """(score - mean) / std with the checkpoint's statistics, when it has them."""
        if self.normalization is None:
            return None
        mean, std = self.normalization
        return (score - mean) / std

    def warmup_items(self, budget_tokens: int, max_items: int) -> list[EncodedItem]:
        """The largest batch the batcher can form, for warm-up."""
        n = max(1, min(max_items, budget_tokens // max(1, min(self.max_len, 64))))
        length = max(1, min(self.max_len, budget_tokens // n))
        tok = 0 if self.pad_id != 0 else 1  # any non-pad token
        if length < 2:
            return [EncodedItem([tok] * length, False) for _ in range(n)]
        # different starts: no shared prefix, so the plain forward is warmed up and measured
        heads = distinct_heads(n, min(len(self.tokenizer), self.vocab_rows()), self.pad_id)
        return [EncodedItem(h + [tok] * (length - 2), False) for h in heads]

    def vocab_rows(self) -> int:
        """Rows of the model's input embedding (the tokenizer's size where it has no other)."""
        return len(self.tokenizer)


class RewardRunner(RewardRunnerBase):
    """A loaded reward model (`AutoModelForSequenceClassification`) and its tokenizer."""

    def vocab_rows(self) -> int:
        """Rows of the model's input embedding."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def __init__(
        self,
        name: str,
        source: str,
        *,
        max_input_tokens: int = 0,
        head_combine: str = "",
        model: Any = None,
        tokenizer: Any = None,
        prefix_sharing: bool = True,
        prefix_cache_mb: float = 256.0,
        pack_continuations: bool = True,
        input_format: str = "auto",
        **load: Unpack[LoadOptions],
    ) -> None:
        """Load `source` with the `load` options (`LoadOptions`), unless `model` and
        `tokenizer` are given already loaded. With `prefix_sharing`, items of a batch that share
        leading tokens run them once (`reward_server.models.prefix`; causal models only), the
        gathered prefix cache of one pass held under `prefix_cache_mb`; `pack_continuations`
        runs a group's continuations packed into rows (`prefix.run_packed`) rather than each
        padded to the longest against its own copy of the cache."""
        from transformers import AutoModelForSequenceClassification

        tokenizer = tokenizer or load_tokenizer(
            source, trust_remote_code=load.get("trust_remote_code", False)
        )
        self.model = model or load_model(AutoModelForSequenceClassification, source, **load)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = classifier_pad_id(tokenizer)
        self.pad_id = int(self.model.config.pad_token_id)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.quantization = load.get("quantization", "none")
        self._init_common(
            name,
            source,
            load["device"],
            tokenizer,
            self.model.config,
            max_positions(self.model, tokenizer),
            max_input_tokens,
            head_combine,
            input_format,
        )
        self.cache_bytes = int(prefix_cache_mb * (1 << 20))
        self.on_sharing: SharingObserver | None = None  # set by the engine (metrics)
        self.cache_arg = cache_argument(self.model) if prefix_sharing else None
        self.trunk = getattr(self.model, self.model.base_model_prefix, None)
        self.packed_head = packed_head(self.model) if pack_continuations else None
        self.pack_row_tokens = PACK_ROW_TOKENS  # continuation tokens per packed row
        if self.cache_arg and self.trunk is not None:
            probe = probe_ids(self.vocab_rows(), self.pad_id)
            probe_items = [EncodedItem(probe[:k], False) for k in (21, 22, 24)]
            ok = sharing_agrees(self._forward_plain, self._forward, probe_items, self.dtype)
            if not ok and self.packed_head is not None:
                log.info("%s: packed continuations disagree with the model; padded ones", name)
                self.packed_head = None
                ok = sharing_agrees(self._forward_plain, self._forward, probe_items, self.dtype)
            if not ok:
                log.info("%s: shared-prefix path disagrees with the model; not used", name)
                self.cache_arg = None
        else:
            self.cache_arg = None
        self.prefix_sharing = self.cache_arg is not None

    def _forward(self, batch: Sequence[EncodedItem]) -> list[np.ndarray]:
        """Head values per item; items sharing a prefix run it once when sharing is on."""
        if self.cache_arg is None or len(batch) < 2 or batch[0].token_type_ids is not None:
            return self._forward_plain(batch)
        seqs = [it.input_ids for it in batch]
        groups = plan_groups(seqs, [self.share_limit(s) for s in seqs])
        report = None if self.on_sharing is None else partial(self.on_sharing, self.name)
        return forward_grouped(
            batch,
            groups,
            self._forward_plain,
            lambda multi, out: self._forward_shared(multi, seqs, out),
            report,
        )

    def share_limit(self, ids: Sequence[int]) -> int:
        """Most leading tokens an item may share: the head reads the last non-pad token (as the
        model's own pooling does), which must run in the continuation pass."""
        for j in range(len(ids) - 1, -1, -1):
            if ids[j] != self.pad_id:
                return j
        return 0

    def _forward_shared(self, groups: list[Group], seqs: list[list[int]], out: list[Any]) -> bool:
        """Fill `out` for the groups' members through the shared path; False when the model's
        cache cannot be shared (nothing filled)."""
        import torch

        with torch.inference_mode():
            pre = run_prefix(self.trunk, groups, seqs, self.pad_id, self.device)
            if pre is None:
                return False
            if self.packed_head is not None:
                self._continue_packed(groups, seqs, pre, out)
                return True
            for chunk in chunk_members(groups, pre, self.cache_bytes):
                res, _ = run_continuations(
                    self.model, chunk, groups, pre, seqs, self.pad_id, self.device, self.cache_arg
                )
                values = res.logits.float().cpu().numpy()  # [B, H]
                for b, (_, i) in enumerate(chunk):
                    out[i] = values[b]
        return True

    def _continue_packed(
        self, groups: list[Group], seqs: list[list[int]], pre: PrefixPass, out: list[Any]
    ) -> None:
        """The continuation pass packed (`prefix.run_packed`): the trunk's hidden state at each
        member's last non-pad token through the classification head (what the model's own
        pooling reads)."""
        import torch

        for chunk in chunk_rows(
            pack_rows(groups, seqs, self.pack_row_tokens), pre, self.cache_bytes
        ):
            hidden = run_packed(
                self.trunk, chunk, groups, pre, seqs, self.pad_id, self.device, self.cache_arg
            )[0]  # [R, L, H]
            width = hidden.shape[1]
            index, who = [], []
            for b, row in enumerate(chunk):
                p = groups[row.group].prefix_len
                for i, s in zip(row.members, row.starts, strict=True):
                    index.append(b * width + s + self.share_limit(seqs[i]) - p)
                    who.append(i)
            flat = hidden.reshape(-1, hidden.shape[-1])  # [R*L, H]
            picked = flat[torch.tensor(index, device=flat.device)]  # [N, H]
            values = self.packed_head(picked).float().cpu().numpy()  # [N, labels]
            for n, i in enumerate(who):
                out[i] = values[n]

    def _forward_plain(self, batch: Sequence[EncodedItem]) -> list[np.ndarray]:
        """Every item whole, right-padded, in one forward."""
        import torch

        ids, mask = pad_right(batch, self.pad_id)
        extra: dict[str, Any] = {}
        if any(it.token_type_ids is not None for it in batch):
            types = np.zeros_like(ids)  # [B, T]
            for row, it in enumerate(batch):
                if it.token_type_ids is not None:
                    types[row, : len(it.token_type_ids)] = it.token_type_ids
            extra["token_type_ids"] = torch.from_numpy(types).to(self.device)
        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
                use_cache=False,  # no KV cache for a single scoring pass
                **extra,
            ).logits  # [B, H]
        values = logits.float().cpu().numpy()
        return [values[r] for r in range(len(batch))]


PROBE_TEXTS = (
    "Hello world",
    "  two  spaces\tand a tab\n",
    "caf\u00e9 \u4f60\u597d \U0001f600",
    "<|endoftext|> special <pad> tokens <s></s>[CLS]",
    "x",
)


def fast_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]] | None:
    """The Rust tokenizer's ``encode_batch_fast`` behind a fast tokenizer, when it gives the same
    ids as the transformers call on probe texts (else None, and the transformers call is used).

    The transformers wrapper costs as much as the tokenisation itself for short texts (measured
    0.38 ms vs 0.21 ms per 136-token item; docs/BENCHMARKS.md): it was the server's largest
    per-request cost after the forward.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    try:
        from tokenizers import Tokenizer

        rust = Tokenizer.from_str(backend.to_str())
        rust.no_truncation()
        rust.no_padding()

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in rust.encode_batch_fast(texts, add_special_tokens=True)]

        probes = [*PROBE_TEXTS, *_chat_probe(tokenizer)]
        if encode(probes) != tokenizer(probes, add_special_tokens=True)["input_ids"]:
            log.info("fast tokenisation path disagrees with the tokenizer; not used")
            return None
        return encode
    except Exception as exc:  # noqa: BLE001 - any surprise means: use the reference path
        log.info("fast tokenisation path unavailable: %s", exc)
        return None


def _chat_probe(tokenizer: Any) -> list[str]:
    """A rendered conversation (special tokens of the template), when the template renders one."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    try:
        return [tokenizer.apply_chat_template(conv, tokenize=False)]
    except Exception:  # noqa: BLE001 - a strict template; the plain probes still check
        return []


def head_names(config: Any, model_name: str) -> list[str]:
    """Head names from ``num_labels`` and ``id2label``; one unnamed head takes the model's name."""
    n = int(config.num_labels)
    labels = getattr(config, "id2label", None) or {}
    names = [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(n)]
    if n == 1 and names[0] == "LABEL_0":
        return [model_name]
    if len(set(names)) != n:
        return [f"head{i}" for i in range(n)]
    return names


def normalization_of(config: Any, model_name: str) -> tuple[float, float] | None:
    """(mean, std) from the config's ``reward_normalization`` (written by reward-model training)."""
    stats = getattr(config, "reward_normalization", None)
    if not isinstance(stats, dict):
        return None
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (KeyError, TypeError, ValueError):
        log.warning("%s: ignoring malformed reward_normalization %r", model_name, stats)
        return None
    return (mean, std) if std > 0 else None


def pad_right(batch: Sequence[EncodedItem], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and attention mask [B, T], right-padded: real tokens keep positions 0..n-1."""
    width = max(len(it.input_ids) for it in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)  # [B, T]
    mask = np.zeros((len(batch), width), dtype=np.int64)  # [B, T]
    for row, it in enumerate(batch):
        n = len(it.input_ids)
        ids[row, :n] = it.input_ids
        mask[row, :n] = 1
    return ids, mask
