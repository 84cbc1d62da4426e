"""`reward-server export-onnx`: write a reward model as an ONNX graph that
`reward-server serve --backend onnx` serves with ONNX Runtime.

The output directory holds everything the ONNX backend needs and nothing it would have to trust:
``model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64 [batch, seq], both axes dynamic;
output ``logits`` float32 [batch, num_heads], read at the last non-pad token exactly as the torch
model does), ``config.json`` (heads, limits, normalisation statistics), the tokenizer, and
``onnx_export.json`` (what was exported, how, and the measured parity against torch).

After export the graph is run with ONNX Runtime on padded batches of random tokens and compared
with the torch model; the command fails when the largest difference exceeds ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
FORMAT = "reward-server-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
META_FILE = "onnx_export.json"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"


@dataclass
class ExportInfo:
    """What `onnx_export.json` records."""

    format: str
    format_version: int
    source: str
    adapter: str
    exporter: str
    opset: int
    num_labels: int
    pad_token_id: int
    max_positions: int
    torch_version: str
    transformers_version: str
    parity_max_abs_diff: float
    parity_atol: float
    seconds: float


def add_export_parser(subparsers: Any) -> None:
    """Add the `export-onnx` subcommand (reward_server/cli.py calls this)."""
    p = subparsers.add_parser(
        "export-onnx",
        help="export a reward model to ONNX for `serve --backend onnx`",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="reward model directory (safetensors) or hub id")
    p.add_argument("--output", required=True, help="directory to write (created; must be empty)")
    p.add_argument("--adapter", default="", help="PEFT adapter merged into the weights first")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument(
        "--exporter",
        choices=("dynamo", "legacy"),
        default="dynamo",
        help="torch.onnx exporter: dynamo (torch.export, default) or legacy (TorchScript)",
    )
    p.add_argument(
        "--atol", type=float, default=1e-4, help="largest accepted |onnx - torch| (default 1e-4)"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model code shipped with the checkpoint (off by default)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """CLI entry: export, check parity, report."""
    from reward_server.models.loading import ModelLoadError
    from reward_server.tokenizer_loading import TokenizerLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log.setLevel(logging.INFO)  # our progress; not the exporter's own INFO chatter
    try:
        options = ("adapter", "opset", "exporter", "atol", "trust_remote_code")  # its kwargs
        info = export_reward_model(
            args.model, args.output, **{key: getattr(args, key) for key in options}
        )
    except (ModelLoadError, TokenizerLoadError, ExportError, OSError) as exc:
        print(f"reward-server export-onnx: {exc}", file=sys.stderr)
        return 2
    print(
        f"exported {args.model} -> {args.output}/{MODEL_FILE} in {info.seconds:.1f}s; "
        f"parity with torch: max |diff| {info.parity_max_abs_diff:.2e} (atol {info.parity_atol:g})"
    )
    return 0


class ExportError(RuntimeError):
    """The export failed or the exported graph disagrees with torch."""


class _LogitsOnly:
    """Factory for a module returning only the pooled logits [B, num_labels]."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        return LogitsOnly(model).eval()


def _example(pad_id: int, vocab: int, batch: int, seq: int, seed: int) -> tuple[Any, Any]:
    """Right-padded random tokens [batch, seq] and their mask (row r keeps seq - 3r tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # [B, T]
    ids[ids == pad_id] = (pad_id + 1) % vocab
    mask = torch.ones_like(ids)  # [B, T]
    for r in range(batch):
        n = max(1, seq - 3 * r)
        ids[r, n:] = pad_id
        mask[r, n:] = 0
    return ids, mask


def _output_dir(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise ExportError(f"output directory {path} is not empty; choose a new one")
    path.mkdir(parents=True, exist_ok=True)


def export_reward_model(
    source: str,
    output: str | Path,
    *,
    adapter: str = "",
    opset: int = 18,
    exporter: str = "dynamo",
    atol: float = 1e-4,
    trust_remote_code: bool = False,
) -> ExportInfo:
    """Export `source` (an `AutoModelForSequenceClassification`) to `output`; check parity."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    from reward_server.models.loading import load_model, max_positions
    from reward_server.tokenizer_loading import classifier_pad_id, load_tokenizer

    t0 = time.monotonic()
    out = Path(output)
    _output_dir(out)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model = load_model(
        AutoModelForSequenceClassification,
        source,
        device="cpu",
        dtype=torch.float32,
        adapter=adapter,
        trust_remote_code=trust_remote_code,
    )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = classifier_pad_id(tokenizer)
    pad_id = int(model.config.pad_token_id)
    vocab = int(model.get_input_embeddings().num_embeddings)
    limit = max_positions(model, tokenizer)
    wrapped = _LogitsOnly.wrap(model)
    ids, mask = _example(pad_id, vocab, 3, min(17, limit), seed=0)
    path = out / MODEL_FILE
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info(
        "exporting %s (%.0f MB of weights) with the %s exporter", source, n_bytes / 1e6, exporter
    )
    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            seq = torch.export.Dim("seq", min=1, max=limit)
            dims: dict[str, Any] = {
                "dynamic_shapes": {name: {0: batch, 1: seq} for name in INPUTS},
                "external_data": n_bytes > (1 << 30),  # protobuf's 2 GB limit
                "verbose": False,
            }
        else:  # the TorchScript exporter names the dynamic axes, the output's too
            axes = {**{name: {0: "batch", 1: "seq"} for name in INPUTS}, OUTPUT: {0: "batch"}}
            dims = {"dynamic_axes": axes}
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapped,
                (ids, mask),
                str(path),
                dynamo=exporter == "dynamo",
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                opset_version=opset,
                **dims,
            )
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types; name the model
        shutil.rmtree(out, ignore_errors=True)
        raise ExportError(f"{source}: ONNX export failed ({type(exc).__name__}: {exc})") from exc
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    diff = parity(wrapped, path, pad_id, vocab, limit)
    info = ExportInfo(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        source=str(source),
        adapter=adapter,
        exporter=exporter,
        opset=opset,
        num_labels=int(model.config.num_labels),
        pad_token_id=pad_id,
        max_positions=limit,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        parity_max_abs_diff=diff,
        parity_atol=atol,
        seconds=round(time.monotonic() - t0, 2),
    )
    (out / META_FILE).write_text(json.dumps(asdict(info), indent=1) + "\n")
    if not diff <= atol:
        raise ExportError(
            f"exported graph differs from torch by {diff:.3e} > atol {atol:g}; "
            f"files left in {out} for inspection"
        )
    return info


def parity(wrapped: Any, path: Path, pad_id: int, vocab: int, limit: int) -> float:
    """Largest |ONNX Runtime - torch| over padded batches of several shapes (CPU)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed, (b, t) in enumerate([(1, 1), (1, 9), (4, 33), (7, min(limit, 130))]):
        ids, mask = _example(pad_id, vocab, b, min(t, limit), seed=seed + 1)
        with torch.no_grad():
            ref = wrapped(ids, mask).float().numpy()
        got = sess.run([OUTPUT], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        worst = max(worst, float(np.max(np.abs(ref - got))))
    return worst
