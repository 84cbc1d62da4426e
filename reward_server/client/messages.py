"""Conversion between the client's Python types and the protobuf messages (the only place)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.score_result import ScoreResult

PairLike = tuple[str, str] | dict[str, Any]
"""A (prompt, completion) tuple, or a dict with "prompt"/"completion" or "messages" (and
optionally "safety_prompt": True)."""
Conversation = Sequence[dict[str, str]]
"""Chat messages: dicts with "role" and "content"."""

TRUNCATION = {
    "": pb.TRUNCATION_UNSPECIFIED,
    "error": pb.TRUNCATION_ERROR,
    "left": pb.TRUNCATION_LEFT,
    "right": pb.TRUNCATION_RIGHT,
}


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering n items in pieces of at most `size`."""
    return [(a, min(n, a + size)) for a in range(0, n, max(1, size))]


def _chat(messages: Iterable[dict[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def score_items(pairs: Iterable[PairLike]) -> list[pb.ScoreItem]:
    """(prompt, completion) tuples or dicts with prompt/completion or messages -> ScoreItem; a
    dict's optional ``safety_prompt`` (bool) marks a safety prompt for a ``safety_gate``
    combination."""
    items = []
    for p in pairs:
        if not isinstance(p, dict):
            prompt, completion = p
            items.append(pb.ScoreItem(prompt=prompt, completion=completion))
        elif p.get("messages"):
            items.append(
                pb.ScoreItem(
                    messages=_chat(p["messages"]), safety_prompt=bool(p.get("safety_prompt"))
                )
            )
        else:
            items.append(
                pb.ScoreItem(
                    prompt=p.get("prompt", ""),
                    completion=p.get("completion", ""),
                    safety_prompt=bool(p.get("safety_prompt")),
                )
            )
    return items


def id_items(token_ids: Iterable[Sequence[int]]) -> list[pb.ScoreItem]:
    """Token id sequences (lists or 1-D integer arrays) -> ScoreItem with token_ids."""
    return [pb.ScoreItem(token_ids=[int(t) for t in ids]) for ids in token_ids]


def message_items(conversations: Iterable[Conversation]) -> list[pb.ScoreItem]:
    """Chat conversations (lists of role/content dicts) -> ScoreItem."""
    return [pb.ScoreItem(messages=_chat(conv)) for conv in conversations]


def score_requests(
    items: list[pb.ScoreItem],
    model: str,
    truncation: str,
    size: int,
    fingerprint: str = "",
    model_version: str = "",
) -> list[pb.ScoreRequest]:
    """ScoreRequests of at most `size` items each (`fingerprint`: of the items' token ids;
    `model_version`: the pinned version, "" = any)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}: expected one of {sorted(TRUNCATION)}")
    return [
        pb.ScoreRequest(
            model=model,
            items=items[a:b],
            truncation=TRUNCATION[truncation],
            tokenizer_fingerprint=fingerprint,
            model_version=model_version,
        )
        for a, b in chunks(len(items), size)
    ]


def ref_requests(
    token_ids: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    temperature: float,
    model: str,
    fingerprint: str | None,
    size: int,
    model_version: str = "",
) -> list[pb.ReferenceLogProbsRequest]:
    """ReferenceLogProbsRequests of at most `size` sequences each (`model_version`: the pin)."""
    if len(token_ids) != len(response_starts):
        raise ValueError(f"{len(token_ids)} sequences but {len(response_starts)} response_starts")
    seqs = [
        pb.TokenSequence(token_ids=list(map(int, t)), response_start=int(s))
        for t, s in zip(token_ids, response_starts, strict=True)
    ]
    return [
        pb.ReferenceLogProbsRequest(
            model=model,
            temperature=temperature,
            tokenizer_fingerprint=fingerprint or "",
            sequences=seqs[a:b],
            model_version=model_version,
        )
        for a, b in chunks(len(seqs), size)
    ]


def parse_scores(responses: Iterable[pb.ScoreResponse]) -> list[ScoreResult]:
    """Each item's ScoreResult, in order, from the responses of `score_requests`."""
    return [
        ScoreResult(
            s.score,
            dict(s.head_scores),
            s.num_tokens,
            s.truncated,
            s.normalized_score if s.has_normalized_score else None,
            resp.model_version,
        )
        for resp in responses
        for s in resp.scores
    ]


def parse_logprobs(responses: Iterable[pb.ReferenceLogProbsResponse]) -> list[np.ndarray]:
    """Each sequence's log-probs (float32), in order, from the responses of `ref_requests`."""
    return [np.asarray(r.logprobs, dtype=np.float32) for resp in responses for r in resp.results]
