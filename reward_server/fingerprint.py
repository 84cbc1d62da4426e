"""Tokenizer fingerprints: a short hash that identifies a vocabulary.

The reference model's log-probs are only meaningful on token ids from the same vocabulary, so
`ReferenceLogProbs` accepts the caller's fingerprint and refuses a mismatch. This module imports
neither torch nor transformers: it works on any object with ``get_vocab()`` (every Hugging Face
tokenizer has it), so the trainer and the client compute the same value as the server.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol


class _HasVocab(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


_SPECIAL_ATTRS = ("bos_token_id", "eos_token_id", "unk_token_id")


def tokenizer_fingerprint(tokenizer: _HasVocab) -> str:
    """Return ``"v1:<16 hex digits>"`` hashing the token->id map and the special-token ids.

    The pad token id is deliberately left out: choosing an existing token as the pad (the
    policy of `reward_server.tokenizer_loading`) changes no id that reaches the reference model.
    Adding a new pad token does change the vocabulary, and so the fingerprint, which is why the
    trainer's policy never adds one.
    """
    vocab = tokenizer.get_vocab()
    specials: dict[str, Any] = {a: getattr(tokenizer, a, None) for a in _SPECIAL_ATTRS}
    h = hashlib.sha256()
    h.update(json.dumps(specials, sort_keys=True).encode())
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    return "v1:" + h.hexdigest()[:16]
