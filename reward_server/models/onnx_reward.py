"""Reward models on ONNX Runtime: a directory written by `reward-server export-onnx`.

Tokenisation, rendering, truncation and head logic are the torch runner's (`RewardRunnerBase`);
only the forward differs. Only ``model.onnx`` (and its external-data file, if any) is loaded as
weights: no pickle, no model code. The CUDA execution provider is used on a CUDA device when
onnxruntime-gpu provides it, the CPU provider otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from reward_server.models.loading import ModelLoadError, max_positions
from reward_server.models.reward import EncodedItem, RewardRunnerBase, pad_right
from reward_server.tokenizer_loading import load_tokenizer

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"


def providers_for(device: str) -> list[Any]:
    """ONNX Runtime execution providers for a device ("cpu", "cuda", "cuda:N")."""
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelLoadError(
                f"--backend onnx on {device}: this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu, or use --device cpu)"
            )
        idx = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(intra_op_threads: int = 0) -> Any:
    """Full graph optimisation; intra-op threads do not spin while waiting (as OMP_WAIT_POLICY
    PASSIVE for torch, see reward_server/engine/calibration.py): the server's event loop and tokenizer
    threads share the cores. ``intra_op_threads`` 0 = onnxruntime's default (one per core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(0, intra_op_threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "0" if os.environ.get("OMP_WAIT_POLICY", "PASSIVE").upper() == "PASSIVE" else "1"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return so


class OnnxRewardRunner(RewardRunnerBase):
    """A reward model exported by `reward-server export-onnx`, run with ONNX Runtime."""

    backend = "onnx"

    def __init__(
        self,
        name: str,
        source: str,
        *,
        device: str,
        max_input_tokens: int = 0,
        head_combine: str = "",
        intra_op_threads: int = 0,
        input_format: str = "auto",
    ) -> None:
        import onnxruntime as ort

        path = Path(source)
        model_file = path / MODEL_FILE
        if not model_file.is_file():
            raise ModelLoadError(
                f"{source}: no {MODEL_FILE}; --backend onnx serves a directory written by "
                "`reward-server export-onnx --model CHECKPOINT --output DIR`"
            )
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{source}: no config.json next to {MODEL_FILE}")
        raw = json.loads(cfg_file.read_text())
        config = SimpleNamespace(**raw)
        if not hasattr(config, "num_labels"):
            config.num_labels = len(raw.get("id2label") or {}) or 1
        if isinstance(getattr(config, "id2label", None), dict):
            config.id2label = {int(k): v for k, v in config.id2label.items()}
        tokenizer = load_tokenizer(source, trust_remote_code=False)
        pad = raw.get("pad_token_id")
        self.pad_id = int(pad if pad is not None else tokenizer.pad_token_id)
        try:
            self.session = ort.InferenceSession(
                str(model_file),
                sess_options=session_options(intra_op_threads),
                providers=providers_for(device),
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise ModelLoadError(f"{source}: cannot load {MODEL_FILE}: {exc}") from exc
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input_ids", "attention_mask"}:
            raise ModelLoadError(
                f"{source}: {MODEL_FILE} takes inputs {sorted(names)}; expected input_ids and "
                "attention_mask (re-export with `reward-server export-onnx`)"
            )
        self.output_name = self.session.get_outputs()[0].name
        self.dtype = "float32"
        self.quantization = "none"
        self.providers = self.session.get_providers()
        self._init_common(
            name,
            source,
            device,
            tokenizer,
            config,
            max_positions(SimpleNamespace(config=config), tokenizer),
            max_input_tokens,
            head_combine,
            input_format,
        )
        if self.input_format == "pair":
            raise ModelLoadError(
                f"{source}: input format 'pair' needs segment ids, which the exported graph does "
                "not take: serve this model with the torch backend (or --input-format "
                f"{name}=text if it was trained on one string)"
            )
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.heads):
            raise ModelLoadError(
                f"{source}: the graph has {n_out} outputs per item but config.json names "
                f"{len(self.heads)} heads"
            )
        log.info("%s: ONNX Runtime providers %s", name, self.providers)

    def _forward(self, batch: Sequence[EncodedItem]) -> list[np.ndarray]:
        ids, mask = pad_right(batch, self.pad_id)  # [B, T] each
        logits = self.session.run([self.output_name], {"input_ids": ids, "attention_mask": mask})[
            0
        ]  # [B, H]
        values = np.asarray(logits, dtype=np.float32)
        return [values[r] for r in range(len(batch))]
