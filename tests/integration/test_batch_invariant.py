"""`serve --batch-invariant`: every score and reference log-prob is bitwise the same (float32
bytes compared, no tolerance) alone, with short neighbours, with long neighbours, under
concurrent load, after other traffic, and with one or two forward streams."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import fixed_pairs

pytestmark = pytest.mark.integration

ITEMS = fixed_pairs(6, seed=31)
SHORT = [("a", " b"), ("the", " cat"), ("x", " y z")]
LONG = [(p * 3, c * 6) for p, c in fixed_pairs(4, seed=8, max_words=40)]


def bits(values) -> bytes:
    return b"".join(struct.pack("<f", v) for v in values)


def scores(c: RewardClient, pairs) -> list[float]:
    return [r.score for r in c.score(pairs)]


def observe(
    address: str, tok, invariant: bool = True
) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """Each item's score bits and each sequence's log-prob bits in every situation."""
    seqs = [tok(p + c)["input_ids"] for p, c in ITEMS]
    starts = [len(tok(p)["input_ids"]) for p, _ in ITEMS]
    long_seqs = [tok(p + c)["input_ids"][:250] for p, c in LONG]
    seen: dict[str, list[bytes]] = {}
    lps: dict[str, list[bytes]] = {}
    with RewardClient(address, timeout=60) as c:
        seen["alone"] = [bits(scores(c, [it])) for it in ITEMS]
        seen["short"] = [bits(scores(c, [*SHORT, it, *SHORT])[3:4]) for it in ITEMS]
        seen["long"] = [bits(scores(c, [*LONG, it])[-1:]) for it in ITEMS]
        seen["all"] = [bits([v]) for v in scores(c, ITEMS[::-1])][::-1]
        with ThreadPoolExecutor(12) as pool:  # concurrent load: batches of whatever arrives
            futs = [pool.submit(scores, c, [*LONG[: k % 4], ITEMS[k % 6]]) for k in range(36)]
            under = [f.result()[-1] for f in futs]
        seen["load"] = [bits([under[k]]) for k in range(6)]
        for name, got in (
            (
                "alone",
                [c.reference_logprobs([s], [st])[0] for s, st in zip(seqs, starts, strict=True)],
            ),
            ("batched", c.reference_logprobs([*long_seqs, *seqs], [5] * 4 + starts)[4:]),
        ):
            lps[name] = [np.asarray(a, dtype=np.float32).tobytes() for a in got]
        seen["after"] = [bits(scores(c, [it])) for it in ITEMS]
        info = c.server_info()
    assert info.batch_invariant == invariant
    return seen, lps


def test_bitwise_identical_however_batched(tiny_ckpts, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reference))
    args = [
        "--batch-invariant",
        "--max-wait-ms", "20",
        "--reward-model", str(tiny_ckpts.reward),
        "--reference-model", str(tiny_ckpts.reference),
    ]  # fmt: skip
    results = []
    for streams in ("1", "2"):
        sp = start_server([*args, "--forward-streams", streams], tmp_path)
        try:
            results.append(observe(sp.address, tok))
        finally:
            sp.stop()
    (seen1, lps1), (seen2, lps2) = results
    for situation, got in seen1.items():
        assert got == seen1["alone"], situation
    for situation, got in seen2.items():
        assert got == seen1["alone"], f"2 streams, {situation}"
    assert lps1["batched"] == lps1["alone"] == lps2["alone"] == lps2["batched"]


def test_without_the_mode_neighbours_change_the_bits(tiny_ckpts, tmp_path):
    """What the mode is for: the default server's answers move in the last bits with their
    batch (float32 sums over padded shapes), so the checks above would fail without it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpts.reference))
    sp = start_server(
        ["--max-wait-ms", "20", "--reward-model", str(tiny_ckpts.reward),
         "--reference-model", str(tiny_ckpts.reference)],
        tmp_path,
    )  # fmt: skip
    try:
        seen, lps = observe(sp.address, tok, invariant=False)
    finally:
        sp.stop()
    differ = [k for k, v in seen.items() if v != seen["alone"]]
    differ += ["logprobs"] if lps["batched"] != lps["alone"] else []
    assert differ, "no situation changed the bits: the invariance test above proves nothing here"
