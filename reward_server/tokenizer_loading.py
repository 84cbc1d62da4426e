"""Loading a checkpoint's tokenizer with one pad-token policy, for the server's reward and
reference models, reward-model training and the PPO trainer's policy (a shared piece,
docs/ARCHITECTURE.md; transformers is imported only when a tokenizer is loaded).

The pad-token policy: **the pad token is never EOS.**

1. The checkpoint's own pad token is kept when it has one that is not EOS.
2. Otherwise, when the caller owns the model's embeddings and resizes them (reward-model
   training, which writes a new checkpoint: ``add_pad_token=True``), a new ``<pad>`` token is
   added.
3. Otherwise an existing token that is not EOS becomes the pad token (the unknown token, else
   id 0, else id 1). The vocabulary does not change, so the model's embeddings fit and the
   tokenizer fingerprint (`reward_server.fingerprint`) stays the one the server computes.

4. A sequence classifier whose config names no pad id (`classifier_pad_id`) pads with the
   checkpoint's own pad token, else with EOS, as Hugging Face's GPT-2-style classifiers are
   fine-tuned (TRL's RewardTrainer sets pad = EOS): the classifier reads its score at the last
   token that is not the pad id, and a fallback pad from rule 3 (GPT-2's id 0 is "!") could end a
   real completion.

Why never EOS otherwise: a reward model reads its score at the last token that is not the pad id
(Hugging Face sequence classification), and a completion or chat template may end in EOS; the
policy's sampled EOS must never be confused with padding. Where the pad token sits under a zero
attention mask (reference log-probs, the policy's left-padded prompts) any id is correct, and
position ids come from the mask, not from the pad id (docs/API.md).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"


class TokenizerLoadError(ValueError):
    """The tokenizer cannot be loaded; the message names the source and why."""


def load_tokenizer(
    source: str,
    *,
    trust_remote_code: bool = False,
    padding_side: Literal["left", "right"] | None = None,
    add_pad_token: bool = False,
) -> Any:
    """The tokenizer of `source` (a directory or hub id) with a pad token set by the module's
    policy; `padding_side` "left" for generation (None keeps the checkpoint's: the server and
    reward-model training pad by hand, on the right)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        raise TokenizerLoadError(f"cannot load a tokenizer from {source!r}: {exc}") from exc
    tok.own_pad_token_id = tok.pad_token_id  # rule 4 reads it (None: the checkpoint had none)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if add_pad_token:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        else:
            candidates = (tok.unk_token_id, 0, 1)
            pad_id = next(c for c in candidates if c is not None and c != tok.eos_token_id)
            tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        log.warning(
            "%s: the tokenizer has no pad token distinct from EOS; padding with %r",
            source,
            tok.pad_token,
        )
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


def classifier_pad_id(tokenizer: Any) -> int:
    """The pad id of a sequence classifier whose config names none (rule 4 of the policy): the
    checkpoint's own pad token, else EOS, else the tokenizer's (fallback) pad."""
    own = getattr(tokenizer, "own_pad_token_id", tokenizer.pad_token_id)
    for candidate in (own, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    raise TokenizerLoadError("the tokenizer has neither a pad nor an EOS token")
