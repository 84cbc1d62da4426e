"""Fuzzing every RPC: random field values, sizes, unicode, token ids around the vocabulary bounds,
`response_start` around the sequence bounds, temperatures from 0 through denormals to infinities
and NaN, truncation modes (and undefined enum values), chat messages with odd roles and
template-breaking content, and bytes that are no message at all.

    python -m bench fuzz --kind tiny --cases 100000

Every answer must carry a documented code (never UNKNOWN or INTERNAL), an OK answer only finite
numbers, and afterwards the server must still give a known item its known score. The counts by
RPC and code go to runs/bench/fuzz-*.json. `fuzz_case` is shared with the property-based test
(tests/integration/test_fuzz.py), which draws its `random.Random` from hypothesis.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
"""Codes a well-behaved server may answer fuzz input with (docs/API.md, "Status codes")."""

ODD_TEXT = [
    "",
    " ",
    "\x00",
    "\n\n\n",
    "\u200b\u200d\ufeff",  # zero-width characters
    "😀" * 50,
    "👩‍👩‍👧‍👦",
    "\u202e reversed",
    "{% for m in messages %}{{ m }}{% endfor %}",
    "{{ raise_exception('x') }}",
    "<|im_start|>system\n<|im_end|>",
    "</s><s>[INST]",
    "<pad><unk><eos>",
    "\\u0000\\x00",
    "a" * 5000,
    " cat" * 600,
]
ROLES = ["user", "assistant", "system", "", "tool", "USER", "\x00", "ro le", "x" * 300]
TEMPERATURES = [
    0.0, 1.0, 0.7, 1e-45, 1e-38, 1e-30, 1e-8, 1e-3, 1e3, 1e30, 3.4e38,
    math.inf, -math.inf, math.nan, -1.0, -0.0,
]  # fmt: skip
INT32 = (-(2**31), 2**31 - 1)


def _text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return rng.choice(ODD_TEXT)
    if r < 0.7:
        n = rng.choice([1, 3, 10, 60, 400])
        return " ".join(
            rng.choice(["the", "cat", "dog", "ran", "é", "日本", "?"]) for _ in range(n)
        )
    n = rng.choice([1, 5, 50, 500])
    return "".join(
        chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF)])) for _ in range(n)
    )


def _item(rng: random.Random) -> pb.ScoreItem:
    if rng.random() < 0.25:
        msgs = [
            pb.ChatMessage(role=rng.choice(ROLES), content=_text(rng))
            for _ in range(rng.choice([0, 1, 2, 3, 6]))
        ]
        extra = {"prompt": _text(rng)} if rng.random() < 0.2 else {}
        return pb.ScoreItem(messages=msgs, **extra)
    return pb.ScoreItem(prompt=_text(rng), completion=_text(rng))


def _ids(rng: random.Random, vocab: int) -> list[int]:
    n = rng.choice([0, 1, 2, 3, 8, 40, 300])
    pool = [0, 1, vocab - 2, vocab - 1, vocab, vocab + 1, -1, *INT32]
    return [rng.choice(pool) if rng.random() < 0.05 else rng.randrange(0, vocab) for _ in range(n)]


def fuzz_case(rng: random.Random, vocab: int, fingerprint: str) -> tuple[str, Any]:
    """One fuzz input: (RPC name, a request message, or raw `bytes`)."""
    r = rng.random()
    if r < 0.08:
        return rng.choice(["Score", "ReferenceLogProbs", "GetServerInfo"]), rng.randbytes(
            rng.choice([1, 5, 40, 300])
        )
    if r < 0.1:
        return "GetServerInfo", pb.GetServerInfoRequest()
    model = rng.choice(["", "", "", "reward", "reference", "nope", "\x00", "rm2"])
    if r < 0.55:
        n = rng.choice([0, 1, 1, 2, 4, 9, 600])
        items = [_item(rng) for _ in range(min(n, 8))] * (n // 8 if n > 8 else 1)
        return (
            "Score",
            pb.ScoreRequest(
                model=model,
                items=items,
                truncation=rng.choice([0, 1, 2, 3, 3, 7]),  # 7: not a defined Truncation value
                request_id=_text(rng)[:64],
            ),
        )
    # Half the requests are valid but for their odd values (extreme ids and temperatures, the
    # bounds of response_start), so that OK answers are checked for finite numbers too.
    valid = rng.random() < 0.5
    seqs = []
    for _ in range(rng.choice([1, 2, 3, 5] if valid else [0, 1, 2, 3, 5])):
        if valid:
            n = rng.choice([2, 3, 8, 40, 200])
            ids = [rng.choice([0, 1, vocab - 1, rng.randrange(0, vocab)]) for _ in range(n)]
            start = rng.choice([1, n - 1, rng.randrange(1, n)])
        else:
            ids = _ids(rng, vocab)
            start = rng.choice([0, 1, 2, len(ids) - 1, len(ids), len(ids) + 1, 2**32 - 1])
        seqs.append(pb.TokenSequence(token_ids=ids, response_start=max(0, start)))
    return "ReferenceLogProbs", pb.ReferenceLogProbsRequest(
        model="" if valid else model,
        sequences=seqs,
        temperature=rng.choice([0.0, 1.0, 0.7, 1e-45, 1e-38, 1e-8, 1e-4, 1e-3, 1e3, 1e30, 3.4e38])
        if valid
        else rng.choice(TEMPERATURES),
        tokenizer_fingerprint=rng.choice(["", fingerprint] if valid else ["", fingerprint, "x"]),
        request_id=_text(rng)[:64],
    )


RESPONSES = {
    "Score": pb.ScoreResponse,
    "ReferenceLogProbs": pb.ReferenceLogProbsResponse,
    "GetServerInfo": pb.GetServerInfoResponse,
}


def call(channel: grpc.Channel, rpc: str, request: Any, timeout: float = 30.0) -> tuple[str, Any]:
    """Send one fuzz input; (code name, response message or the error's details)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    stub = channel.unary_unary(f"/rlhf.v1.RewardService/{rpc}")
    try:
        return "OK", RESPONSES[rpc].FromString(stub(data, timeout=timeout))
    except grpc.RpcError as err:
        return err.code().name, err.details()


def non_finite(rpc: str, resp: Any) -> list[str]:
    """The non-finite numbers of an OK response (none allowed)."""
    bad: list[str] = []
    if rpc == "Score":
        for i, s in enumerate(resp.scores):
            vals = [s.score, s.normalized_score, *s.head_scores.values()]
            bad += [f"item {i}: {v}" for v in vals if not math.isfinite(v)]
    elif rpc == "ReferenceLogProbs":
        for i, r in enumerate(resp.results):
            bad += [f"sequence {i}: {v}" for v in r.logprobs if not math.isfinite(v)]
    return bad


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="tiny", help="model shape of the server (bench models)")
    p.add_argument("--cases", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def run(a: argparse.Namespace) -> dict:
    from bench.models import DEFAULT_DIR, build
    from bench.servers import start_reward_server
    from reward_server.client import RewardClient

    reward = build(a.kind, "reward", DEFAULT_DIR)
    reference = build(a.kind, "reference", DEFAULT_DIR)
    sp = start_reward_server(
        "fuzz",
        ["--reward-model", f"reward={reward}", "--reference-model", f"reference={reference}"],
        a.out / "logs",
    )
    counts: Counter[str] = Counter()
    problems: list[str] = []
    rng = random.Random(a.seed)
    t0 = time.monotonic()
    try:
        with RewardClient(sp.address) as c:
            info = {m.name: m for m in c.server_info().models}
            known = c.score([("the cat", " sat on the mat")])[0].score
        vocab, fp = info["reference"].vocab_size, info["reference"].tokenizer_fingerprint
        with grpc.insecure_channel(
            sp.address, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as ch:
            for i in tqdm(range(a.cases), desc="fuzz", unit="case", mininterval=2):
                rpc, req = fuzz_case(rng, vocab, fp)
                code, resp = call(ch, rpc, req)
                counts[f"{rpc} {code}"] += 1
                if code not in DOCUMENTED:
                    problems.append(f"case {i} {rpc}: {code}: {resp}")
                elif code == "OK" and (bad := non_finite(rpc, resp)):
                    problems.append(f"case {i} {rpc}: non-finite {bad[:3]}")
        with RewardClient(sp.address) as c:
            after = c.score([("the cat", " sat on the mat")])[0].score
    finally:
        sp.stop()
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "seconds": round(time.monotonic() - t0, 1),
        "counts": dict(sorted(counts.items())),
        "problems": problems[:100],
        "problem_count": len(problems),
        "known_score_before": known,
        "known_score_after": after,
    }
    print(json.dumps({k: out[k] for k in ("counts", "problem_count", "seconds")}, indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"fuzz-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    return out
