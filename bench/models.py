"""Benchmark checkpoints: random-init GPT-2-shaped reward and reference models, built offline.

Speed does not depend on the weights, so random init is fine. The tokenizer is the tiny byte-level
BPE from `reward_server.tiny` (every benchmark word is one token); the models' vocabularies are
padded to realistic sizes (GPT-2's 50257 for reward models, 32000 for reference models) because the
embedding and LM-head sizes matter for speed and memory.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path("runs/bench-models")


@dataclass(frozen=True)
class Shape:
    """A GPT-2 shape."""

    n_layer: int
    """Transformer blocks."""
    n_embd: int
    """Hidden width."""
    n_head: int
    """Attention heads."""
    vocab_size: int
    """Rows of the embedding (and of the LM head of a reference model)."""
    n_positions: int = 1024
    """Longest input."""


SHAPES: dict[str, Shape] = {
    # GPT-2 small: 124M parameters with the 50257 vocabulary.
    "gpt2-small": Shape(12, 768, 12, 50257),
    # A smaller model for quick runs (about 15M parameters).
    "small": Shape(4, 256, 4, 50257),
    # The tiny model: 2 layers, 128 wide; per-request overheads dominate its cost.
    "tiny": Shape(2, 128, 2, 50257),
    # A ~1.1B-parameter decoder reward model (20 x 2048, head dim 128) for GPU runs: built on the
    # GPU when there is one and saved in bfloat16 (2.2 GB instead of 4.4).
    "gpt2-1b": Shape(20, 2048, 16, 50257),
}
LARGE = 500_000_000
"""Shapes above this many parameters are built on CUDA (when present) and saved in bfloat16."""
REFERENCE_VOCAB = 32000


def build(kind: str, role: str, out_dir: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Write (once) a `role` ("reward" or "reference") checkpoint of shape `kind`; return its dir."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from reward_server.tiny import gpt2_config, train_tokenizer

    shape = SHAPES[kind]
    vocab = shape.vocab_size if role == "reward" else REFERENCE_VOCAB
    path = Path(out_dir) / f"{kind}-{role}"
    meta = {"kind": kind, "role": role, "seed": seed, **asdict(shape), "vocab_size": vocab}
    marker = path / "bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return path
    tok = train_tokenizer(vocab_size=512, seed=seed, model_max_length=shape.n_positions)
    cfg = gpt2_config(
        vocab_size=vocab,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        n_positions=shape.n_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **({"num_labels": 1} if role == "reward" else {}),
    )
    torch.manual_seed(seed)
    large = 12 * shape.n_layer * shape.n_embd**2 > LARGE
    where = "cuda" if large and torch.cuda.is_available() else "cpu"
    with torch.device(where):
        model = GPT2ForSequenceClassification(cfg) if role == "reward" else GPT2LMHeadModel(cfg)
    if large:
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    marker.write_text(json.dumps(meta))
    return path


def num_parameters(path: Path) -> int:
    """Parameters of a saved checkpoint (from the safetensors header, no load)."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def main(argv: list[str] | None = None) -> None:
    """python -m bench.models [--kinds ...] [--out DIR]: build the checkpoints."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kinds", nargs="+", default=list(SHAPES))
    p.add_argument("--roles", nargs="+", default=["reward", "reference"])
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    a = p.parse_args(argv)
    for k in a.kinds:
        for r in a.roles:
            path = build(k, r, a.out)
            print(f"{path}: {num_parameters(path) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
