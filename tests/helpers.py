"""Helpers shared by tests (in-process reference computations, metrics scraping)."""

from __future__ import annotations

import numpy as np

from reward_server.local_server import scrape_metrics


def scrape(port: int) -> dict[str, float]:
    """Prometheus metrics of a loopback server as {'name{label="v",...}': value}."""
    return scrape_metrics(port, timeout=5)


def inprocess_scores(model_dir: str, texts: list[str]) -> np.ndarray:
    """Reward logits [n, heads] of each text, one unpadded forward per text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            rows.append(model(**tok(t, return_tensors="pt")).logits[0].float().numpy())
    return np.stack(rows)


def inprocess_logprobs(
    model_dir: str, seqs: list[list[int]], starts: list[int], temperature: float
) -> list[np.ndarray]:
    """Reference log-probs with the full-logits formula, one unpadded forward per sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for s, st in zip(seqs, starts, strict=True):
            logits = model(torch.tensor([s])).logits[0].float() / temperature  # [T, V]
            lp = torch.log_softmax(logits, -1)[
                torch.arange(st - 1, len(s) - 1), torch.tensor(s[st:])
            ]
            out.append(lp.numpy())
    return out


def deploy_checks(module: str):
    """deploy/checks (a directory, not an installed package) loaded by path as `deploy_checks`."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if "deploy_checks" not in sys.modules:
        init = Path(__file__).resolve().parents[1] / "deploy" / "checks" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "deploy_checks", init, submodule_search_locations=[str(init.parent)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["deploy_checks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"deploy_checks.{module}")


SCORE_WORDS = "the cat dog bird fish tree river good bad big small helpful answer safe sun".split()


def fixed_pairs(n: int, seed: int, max_words: int = 40) -> list[tuple[str, str]]:
    """n seeded (prompt, completion) pairs of 1-8 and 2-max_words words: a fixed scoring set."""
    import random

    rng = random.Random(seed)
    return [
        (
            " ".join(rng.choice(SCORE_WORDS) for _ in range(rng.randint(1, 8))),
            " " + " ".join(rng.choice(SCORE_WORDS) for _ in range(rng.randint(2, max_words))),
        )
        for _ in range(n)
    ]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (continuous scores, no ties)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
