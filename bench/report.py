"""Print the markdown table and ratios of saved `compare` results.

python -m bench report runs/bench/compare-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.compare import markdown, summarize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path)


def run(a: argparse.Namespace) -> None:
    for f in a.files:
        result = json.loads(f.read_text())
        result["summary"] = summarize(result["rows"])
        cfg = result["config"]
        print(
            f"### {f.name}: {cfg['kind']}, {cfg['clients']} clients, items {cfg['items']}, "
            f"lengths {cfg['lengths']}, backend {cfg.get('backend', 'torch')}\n"
        )
        print(markdown(result) + "\n")
