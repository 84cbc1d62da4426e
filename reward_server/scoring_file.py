"""`reward-server score`: score a JSONL file over RPC, writing one line per input, in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reward_server.client import RewardClient


def read_items(path: str) -> list[dict[str, Any]]:
    """Read {"prompt","completion"} or {"messages"} lines; ValueError names the line."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not (("completion" in obj) or ("messages" in obj)):
                raise ValueError(
                    f'{path}:{lineno}: expected an object with "prompt"/"completion" or "messages"'
                )
            items.append(obj)
    return items


def score_file(
    client: RewardClient,
    input_path: str,
    output_path: str,
    *,
    model: str = "",
    batch_size: int = 64,
) -> int:
    """Score every line of `input_path` into `output_path`; returns the count. ``batch_size``
    items go per `RewardClient.score` call (the progress bar's step); the client splits each call
    by the server's ``max_items_per_request``."""
    items = read_items(input_path)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with (
        open(output_path, "w", encoding="utf-8") as out,
        tqdm(total=len(items), desc="scoring", unit="item") as bar,
    ):
        for a in range(0, len(items), batch_size):
            part = items[a : a + batch_size]
            for src, res in zip(part, client.score(part, model=model), strict=True):
                row = {k: v for k, v in src.items()}
                row.update(
                    score=res.score,
                    head_scores=res.head_scores,
                    num_tokens=res.num_tokens,
                    truncated=res.truncated,
                )
                if res.normalized_score is not None:
                    row["normalized_score"] = res.normalized_score
                out.write(json.dumps(row) + "\n")
            bar.update(len(part))
    return len(items)
