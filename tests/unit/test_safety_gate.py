"""Llama 2's safety-gated combination rule (Touvron et al. 2023, section 3.2.3), by hand."""

from __future__ import annotations

import math

import pytest

from reward_server.engine.combine import parse_combiner

MEMBERS = ["help", "safe"]


def test_gate_by_hand() -> None:
    gate = parse_combiner("safety_gate:safety=safe,helpful=help", MEMBERS)
    assert gate.members == ["safe", "help"] and gate.threshold == 0.15
    cut = math.log(0.15 / 0.85)  # sigmoid(cut) = 0.15: logit(0.15) = -1.7346
    # safe enough: the helpful score
    assert gate.apply({"help": 2.0, "safe": cut + 0.01}) == 2.0
    # sigmoid(R_s) < 0.15: the safety score
    assert gate.apply({"help": 2.0, "safe": cut - 0.01}) == cut - 0.01
    # a safety prompt: the safety score whatever it is
    assert gate.apply({"help": 2.0, "safe": 3.0}, safety_prompt=True) == 3.0
    assert gate.selected({"help": 2.0, "safe": 3.0}, True) == "safe"
    assert gate.selected({"help": 2.0, "safe": 3.0}, False) == "help"
    # the threshold is configurable
    strict = parse_combiner("safety_gate:helpful=help,safety=safe,threshold=0.9", MEMBERS)
    assert strict.threshold == 0.9 and strict.apply({"help": 2.0, "safe": 2.0}) == 2.0
    assert strict.apply({"help": 5.0, "safe": 2.0}) == 2.0  # sigmoid(2) = 0.88 < 0.9
    # other rules ignore the flag
    assert parse_combiner("mean", MEMBERS).apply({"help": 2.0, "safe": 0.0}, True) == 1.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("safety_gate:safety=safe", "needs safety=NAME and helpful=NAME"),
        ("safety_gate:safety=safe,helpful=help,threshold=1.5", r"must lie in \(0, 1\)"),
        ("safety_gate:safety=safe,helpful=help,threshold=x", "not a number"),
        ("safety_gate:safety=safe,helpful=nope", "unknown member"),
        ("safety_gate:safety=safe,helpful=safe", "different models"),
        ("safety_gate:safety=safe,helpful=help,gamma=1", "safety_gate takes"),
        ("safety_gate:safe,help", "safety_gate takes"),
    ],
)
def test_gate_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_combiner(spec, MEMBERS)
