"""Conversion between protobuf messages and the internal types: the one place that does it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.engine.engine import ScoreItemInput, Timing
from reward_server.engine.registry import ModelDescription
from reward_server.models.reference import RefSequence
from reward_server.models.reward import ScoreInput
from reward_server.score_result import ScoreResult
from reward_server.serve.telemetry import WindowStats

TRUNCATION_FROM_PB = {
    pb.TRUNCATION_UNSPECIFIED: "",
    pb.TRUNCATION_ERROR: "error",
    pb.TRUNCATION_LEFT: "left",
    pb.TRUNCATION_RIGHT: "right",
}
TRUNCATION_TO_PB = {v: k for k, v in TRUNCATION_FROM_PB.items() if v}
ROLE_TO_PB = {
    "reward": pb.MODEL_ROLE_REWARD,
    "reference": pb.MODEL_ROLE_REFERENCE,
    "combination": pb.MODEL_ROLE_REWARD_COMBINATION,
}


def score_inputs(request: pb.ScoreRequest) -> list[ScoreInput]:
    """ScoreRequest items -> ScoreInput (with the item's safety_prompt flag, which only
    combination rules read); an item's token_ids, when set, with whatever text it also has."""
    out: list[ScoreInput] = []
    for it in request.items:
        if len(it.token_ids):  # text fields too: refused by the runner, naming the item
            out.append(
                ScoreItemInput(
                    prompt=it.prompt,
                    completion=it.completion,
                    messages=[{"role": m.role, "content": m.content} for m in it.messages],
                    token_ids=list(it.token_ids),
                    safety_prompt=it.safety_prompt,
                )
            )
        elif len(it.messages):
            out.append(
                ScoreItemInput(
                    messages=[{"role": m.role, "content": m.content} for m in it.messages],
                    safety_prompt=it.safety_prompt,
                )
            )
        else:
            out.append(
                ScoreItemInput(
                    prompt=it.prompt, completion=it.completion, safety_prompt=it.safety_prompt
                )
            )
    return out


def truncation(request: pb.ScoreRequest) -> str:
    """The request's truncation policy name ("" = server default)."""
    return TRUNCATION_FROM_PB.get(request.truncation, "")


def timing_pb(t: Timing) -> pb.Timing:
    """Seconds -> milliseconds message."""
    return pb.Timing(
        queue_ms=t.queue * 1e3,
        tokenize_ms=t.tokenize * 1e3,
        inference_ms=t.inference * 1e3,
        total_ms=t.total * 1e3,
    )


def score_response(
    model: str,
    results: Sequence[ScoreResult],
    t: Timing,
    request_id: str,
    model_version: str = "",
) -> pb.ScoreResponse:
    """Internal results -> ScoreResponse (`model_version`: the version that answered)."""
    resp = pb.ScoreResponse(
        model=model, timing=timing_pb(t), request_id=request_id, model_version=model_version
    )
    for r in results:
        s = resp.scores.add(score=r.score, num_tokens=r.num_tokens, truncated=r.truncated)
        s.head_scores.update(r.head_scores)
        if r.normalized_score is not None:
            s.normalized_score = r.normalized_score
            s.has_normalized_score = True
    return resp


def ref_sequences(request: pb.ReferenceLogProbsRequest) -> list[RefSequence]:
    """ReferenceLogProbsRequest sequences -> RefSequence (temperature set by the engine)."""
    return [RefSequence(list(s.token_ids), int(s.response_start)) for s in request.sequences]


def logprobs_response(
    model: str,
    arrays: Sequence[np.ndarray],
    t: Timing,
    request_id: str,
    model_version: str = "",
) -> pb.ReferenceLogProbsResponse:
    """Arrays of log-probs -> ReferenceLogProbsResponse (`model_version`: the version that
    answered)."""
    return pb.ReferenceLogProbsResponse(
        model=model,
        model_version=model_version,
        # tolist() first: protobuf copies a list 3-4x faster than it iterates an ndarray
        # (64 x 512 floats: 2 ms instead of 7 ms; docs/BENCHMARKS.md)
        results=[pb.SequenceLogProbs(logprobs=a.tolist()) for a in arrays],
        timing=timing_pb(t),
        request_id=request_id,
    )


# ModelDescription fields that ModelInfo names the same way
_MODEL_INFO_SAME = (
    "name", "heads", "dtype", "backend", "device", "max_input_tokens", "is_default",
    "vocab_size", "source", "has_chat_template", "has_normalization", "combine", "quantization",
    "input_format", "model_version",
)  # fmt: skip


def model_info(d: ModelDescription) -> pb.ModelInfo:
    """ModelDescription -> ModelInfo."""
    same = {key: getattr(d, key) for key in _MODEL_INFO_SAME}
    return pb.ModelInfo(role=ROLE_TO_PB[d.role], tokenizer_fingerprint=d.fingerprint, **same)


def stats_response(
    windows: Sequence[WindowStats],
    *,
    enabled: bool,
    max_items: int,
    max_seconds: float,
    max_tenants: int,
) -> pb.GetStatsResponse:
    """Telemetry windows -> GetStatsResponse."""
    resp = pb.GetStatsResponse(
        window_max_items=max_items,
        window_max_seconds=max_seconds,
        max_tenants=max_tenants,
        enabled=enabled,
    )
    for w in windows:
        st = w.stats
        resp.windows.add(
            model=w.model,
            tenant=w.tenant,
            window_items=st.items,
            total_items=w.total_items,
            span_seconds=w.span_seconds,
            score_mean=st.mean,
            score_std=st.std,
            score_min=st.minimum,
            score_max=st.maximum,
            length_mean=st.length_mean,
            length_correlation=st.length_correlation,
            baseline_mean=w.baseline_mean,
            baseline_std=w.baseline_std,
            drift_sigma=w.drift_sigma,
            histogram_edges=st.histogram_edges,
            histogram_counts=st.histogram_counts,
            member_rank_correlations=[
                pb.MemberRankStats(member_a=a, member_b=b, spearman=rho)
                for (a, b), rho in st.member_rank_correlations.items()
            ],
        )
    return resp
