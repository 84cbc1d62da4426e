"""The frozen reference model: per-token log-probs of given token sequences.

Computed exactly as the trainer computes them (docs/API.md; the temperature and the position ids
as in Huang et al., "The N Implementation Details of RLHF with PPO",
https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/):
logits at position t-1 score token t, divided by the temperature, float32 log-softmax, no
top-k/top-p, position ids from the attention mask. The [batch, seq, vocab] logits tensor is never built: the decoder runs
once, then the LM head and log-softmax run over slices of the response positions sized to a memory
budget (vllm #5907 ran out of memory building it whole).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

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
    plan_groups,
    probe_ids,
    run_continuations,
    run_packed,
    run_prefix,
    sharing_agrees,
)
from reward_server.models.runner import run_with_oom_split
from reward_server.tokenizer_loading import load_tokenizer

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass
class RefSequence:
    """One sequence: token ids, index of the first response token, temperature."""

    token_ids: list[int]
    response_start: int
    temperature: float = 1.0


MIN_TEMPERATURE = 1e-4
"""Below this the scaled logits can overflow float32 (logits of 10 over 1e-38 are inf) and every
token but the argmax gets -inf: such a temperature is greedy decoding, whose log-probs are
degenerate. Found by fuzzing (docs/BENCHMARKS.md, "Fuzzing")."""


def validate_temperature(temperature: float) -> float:
    """0 means 1.0; NaN, infinite, negative and tiny (< MIN_TEMPERATURE) values are rejected."""
    if temperature == 0:
        return 1.0
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise InvalidArgument(
            f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (0 means 1.0), "
            f"got {temperature:g}"
        )
    return float(temperature)


class ReferenceRunner:
    """A loaded `AutoModelForCausalLM` serving log-probs."""

    def __init__(
        self,
        name: str,
        source: str,
        *,
        max_input_tokens: int = 0,
        slice_bytes: int = 64 << 20,
        model: Any = None,
        tokenizer: Any = None,
        prefix_sharing: bool = True,
        prefix_cache_mb: float = 256.0,
        pack_continuations: bool = True,
        **load: Unpack[LoadOptions],
    ) -> None:
        """Load `source` with the `load` options (`LoadOptions`), unless `model` and
        `tokenizer` are given already loaded; `slice_bytes` bounds one slice of float32 logits.
        With `prefix_sharing`, sequences of a batch that share leading tokens run them once
        (`reward_server.models.prefix`), the gathered prefix cache of one pass held under
        `prefix_cache_mb`."""
        from transformers import AutoModelForCausalLM

        self.name, self.source, self.device = name, source, load["device"]
        self.tokenizer = tokenizer or load_tokenizer(
            source, trust_remote_code=load.get("trust_remote_code", False)
        )
        self.model = model or load_model(AutoModelForCausalLM, source, **load)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.trunk = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.vocab_size = min(
            int(self.model.get_input_embeddings().num_embeddings), int(self.lm_head.weight.shape[0])
        )
        self.logits_vocab = int(self.lm_head.weight.shape[0])
        limit = max_positions(self.model, self.tokenizer)
        self.max_len = min(limit, max_input_tokens) if max_input_tokens else limit
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Rows of one [rows, vocab] float32 slice; x3 for the logits, log-softmax and temporaries.
        self.slice_rows = max(1, slice_bytes // (self.logits_vocab * 4 * 3))
        cfg = self.model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.cache_bytes = int(prefix_cache_mb * (1 << 20))
        self.on_sharing: SharingObserver | None = None  # set by the engine (metrics)
        self.cache_arg = cache_argument(self.trunk) if prefix_sharing else None
        self.pack_continuations = pack_continuations
        self.pack_row_tokens = PACK_ROW_TOKENS  # continuation tokens per packed row
        if self.cache_arg:
            probe = probe_ids(self.vocab_size, self.pad_id)
            seqs = [RefSequence(probe[:k], 10) for k in (21, 22, 24)]
            ok = sharing_agrees(self._forward_plain, self._forward, seqs, self.dtype)
            if not ok and self.pack_continuations:  # e.g. an attention that takes no 4D mask
                self.pack_continuations = False
                ok = sharing_agrees(self._forward_plain, self._forward, seqs, self.dtype)
            if not ok:
                self.cache_arg = None
        self.prefix_sharing = self.cache_arg is not None

    def validate(self, seqs: Sequence[RefSequence]) -> None:
        """InvalidArgument naming the sequence index and the limit."""
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            if n < 2:
                raise InvalidArgument(
                    f"sequence {i}: needs at least 2 tokens (a prompt token and a response token), got {n}"
                )
            if n > self.max_len:
                raise InvalidArgument(
                    f"sequence {i}: {n} tokens, over the limit of {self.max_len} for model {self.name!r}"
                )
            if not 1 <= s.response_start < n:
                raise InvalidArgument(
                    f"sequence {i}: response_start {s.response_start} out of range; it must be in [1, {n - 1}] for {n} tokens"
                )
            lo, hi = min(s.token_ids), max(s.token_ids)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise InvalidArgument(
                    f"sequence {i}: token id {bad} out of vocabulary [0, {self.vocab_size - 1}] of model {self.name!r}"
                )

    def forward(self, batch: Sequence[RefSequence]) -> list[np.ndarray]:
        """Log-probs of positions response_start..len-1 per sequence (float32 arrays)."""
        return run_with_oom_split(self._forward, batch)

    def _forward(self, batch: Sequence[RefSequence]) -> list[np.ndarray]:
        """Log-probs per sequence; sequences sharing a prefix run it once when sharing is on."""
        if self.cache_arg is None or len(batch) < 2:
            return self._forward_plain(batch)
        seqs = [s.token_ids for s in batch]
        report = None if self.on_sharing is None else partial(self.on_sharing, self.name)
        return forward_grouped(
            batch,
            plan_groups(seqs),
            self._forward_plain,
            lambda multi, out: self._forward_shared(multi, batch, out),
            report,
        )

    def _forward_shared(
        self, groups: list[Group], batch: Sequence[RefSequence], out: list[Any]
    ) -> bool:
        """Fill `out` for the groups' members through the shared path; False when the model's
        cache cannot be shared (nothing filled). The hidden state scoring token t is at t-1: in
        the prefix pass for t-1 < prefix_len (the first completion token is scored by the
        prefix's last position), else in the continuation pass."""
        import torch

        dev = self.device
        seqs = [s.token_ids for s in batch]
        with torch.inference_mode():
            pre = run_prefix(self.trunk, groups, seqs, self.pad_id, dev)
            if pre is None:
                return False
            pre_hidden = pre.output[0]  # [G, P, H]
            n_pre, p_width = pre_hidden.shape[0] * pre_hidden.shape[1], pre_hidden.shape[1]
            for hidden, placed in self._continuations(groups, seqs, pre):
                index, targets, temps, counts = [], [], [], []
                for i, r, base in placed:
                    s, p = batch[i], groups[r].prefix_len
                    for j in range(s.response_start - 1, len(s.token_ids) - 1):
                        index.append(r * p_width + j if j < p else n_pre + base + (j - p))
                    targets += s.token_ids[s.response_start :]
                    counts.append(len(s.token_ids) - s.response_start)
                    temps += [s.temperature] * counts[-1]
                flat = torch.cat(
                    [pre_hidden.reshape(n_pre, -1), hidden.reshape(-1, hidden.shape[-1])]
                )  # [G*P + B*W, H]
                logps = (
                    self._logps(
                        flat[torch.tensor(index, device=dev)],
                        torch.tensor(targets, device=dev),
                        torch.tensor(temps, dtype=torch.float32, device=dev),
                    )
                    .cpu()
                    .numpy()
                )
                offset = 0
                for (i, _, _), k in zip(placed, counts, strict=True):
                    out[i] = logps[offset : offset + k].copy()
                    offset += k
        return True

    def _continuations(
        self, groups: list[Group], seqs: list[list[int]], pre: PrefixPass
    ) -> Iterator[tuple[Any, list[tuple[int, int, int]]]]:
        """The continuation pass in chunks: (hidden states [B, W, H], and per member (batch
        index, group row, flat index in the hidden states of its first continuation token)).
        Packed (`prefix.run_packed`: members side by side in rows), or padded
        (`prefix.run_continuations`: a row per member) for a model that takes no 4D mask."""
        dev = self.device
        if self.pack_continuations:
            rows = pack_rows(groups, seqs, self.pack_row_tokens)
            for chunk in chunk_rows(rows, pre, self.cache_bytes):
                hidden = run_packed(
                    self.trunk, chunk, groups, pre, seqs, self.pad_id, dev, self.cache_arg
                )[0]  # [R, L, H]
                w = hidden.shape[1]
                yield (
                    hidden,
                    [
                        (i, row.group, b * w + start)
                        for b, row in enumerate(chunk)
                        for i, start in zip(row.members, row.starts, strict=True)
                    ],
                )
            return
        for chunk in chunk_members(groups, pre, self.cache_bytes):
            hidden = run_continuations(
                self.trunk, chunk, groups, pre, seqs, self.pad_id, dev, self.cache_arg
            )[0][0]  # [B, C, H]
            w = hidden.shape[1]
            yield hidden, [(i, r, b * w) for b, (r, i) in enumerate(chunk)]

    def _logps(self, h: Any, targets: Any, temps: Any) -> Any:
        """float32 log-probs [N] of `targets` [N] from hidden states `h` [N, H] at `temps` [N],
        the LM head and log-softmax run over slices of `slice_rows` rows."""
        import torch

        n = h.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=h.device)  # [N]
        for a in range(0, n, self.slice_rows):
            e = min(a + self.slice_rows, n)
            logits = self.lm_head(h[a:e]).float()  # [S, V]
            if self.logit_scale:
                logits = logits * float(self.logit_scale)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            logits = logits / temps[a:e, None]
            logps[a:e] = (
                torch.log_softmax(logits, dim=-1).gather(-1, targets[a:e, None]).squeeze(-1)
            )
        return logps

    def _forward_plain(self, batch: Sequence[RefSequence]) -> list[np.ndarray]:
        """Every sequence whole, right-padded, in one forward."""
        import torch

        dev = self.device
        width = max(len(s.token_ids) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        rows, cols, temps = [], [], []
        for b, s in enumerate(batch):
            n = len(s.token_ids)
            ids[b, :n] = torch.tensor(s.token_ids)
            mask[b, :n] = 1
            k = n - s.response_start
            rows += [b] * k
            cols += range(s.response_start, n)
            temps += [s.temperature] * k
        # position_ids = cumsum(mask) - 1 (as the trainer's, see the module docstring): padding
        # never moves a position.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        rows_t = torch.tensor(rows, device=dev)  # [N]
        cols_t = torch.tensor(cols, device=dev)  # [N]
        temps_t = torch.tensor(temps, dtype=torch.float32, device=dev)  # [N]
        with torch.inference_mode():
            out = self.trunk(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                use_cache=False,  # a KV cache would hold 2 x layers x [B, T, H] for nothing
            )
            hidden = out[0]  # [B, T, H]
            h = hidden[rows_t, cols_t - 1]  # [N, H]: logits at t-1 score token t
            targets = ids.to(dev)[rows_t, cols_t]  # [N]
            logps = self._logps(h, targets, temps_t)
        flat = logps.cpu().numpy()
        result, offset = [], 0
        for s in batch:
            k = len(s.token_ids) - s.response_start
            result.append(flat[offset : offset + k].copy())
            offset += k
        return result

    def warmup_items(self, budget_tokens: int, max_items: int) -> list[RefSequence]:
        """The largest batch the batcher can form, for warm-up."""
        n = max(1, min(max_items, budget_tokens // max(2, min(self.max_len, 64))))
        length = max(2, min(self.max_len, budget_tokens // n))
        # different starts: no shared prefix, so the plain forward is warmed up and measured
        heads = distinct_heads(n, self.vocab_size, -1)
        return [RefSequence((h + [0] * length)[:length], 1, 1.0) for h in heads]
