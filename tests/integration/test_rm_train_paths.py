"""Other `reward-server train` paths: LoRA (merged on export, also via a fresh base as for k-bit
training), continuing from a reward model, and malformed data through the command line."""

from __future__ import annotations

import json

import pytest
import torch

from reward_server.tokenizer_loading import load_tokenizer
from reward_server.training.config import TrainConfig
from reward_server.training.modeling import (
    add_lora,
    load_backbone,
    merge_into_fresh_base,
    score_texts,
)
from tests.integration.test_rm_train_learning import run_cli, synthetic_preferences, write_jsonl

pytestmark = pytest.mark.integration

TEXTS = ["question: a answer: good good", "question: b answer: the cat", "x", "hello good world"]


def _common(data: str, base: str, out: str) -> list[str]:
    return ["--data", data, "--base-model", base, "--output", out, "--batch-size", "8",
            "--lr", "1e-3", "--eval-fraction", "0.25", "--max-length", "64", "--seed", "0"]  # fmt: skip


def test_lora_run_exports_merged_plain_checkpoint(tiny_ckpts, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_preferences(48, 8, seed=1))
    out = tmp_path / "lora"
    argv = _common(data, str(tiny_ckpts.reference), str(out))
    argv += ["--lora-r", "4", "--grad-accum", "2", "--center-coef", "0.01", "--margin-from-data",
             "--eval-every", "2", "--epochs", "2"]  # fmt: skip
    rc, stdout, err = run_cli(argv)
    assert rc == 0, err
    assert "trainable parameters" in stdout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "score.weight" in keys and not [k for k in keys if "lora" in k or "base_model" in k]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # 42 train elements / batch 8 = 6 micro-batches = 3 steps per epoch; every 2nd step plus
    # each epoch's end (step 6 once).
    assert [ln["step"] for ln in lines] == [2, 3, 4, 6]
    assert [ln["epoch"] for ln in lines] == pytest.approx([4 / 6, 1, 1 + 2 / 6, 2], abs=1e-4)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "GPT2ForSequenceClassification"


def test_merge_into_fresh_base_equals_in_memory_adapter(tiny_ckpts) -> None:
    """The k-bit export path (re-load the base in float32, merge the adapter) gives the scores
    of the trained adapter model; checked on CPU with a float base."""
    base = str(tiny_ckpts.reference)
    cfg = TrainConfig(data=["unused"], base_model=base, output="unused", lora_r=4)
    cfg.validate()
    tok = load_tokenizer(base, add_pad_token=True)
    model, new = load_backbone(base, tok, seed=0)
    assert new == ["score.weight"]
    peft_model = add_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable weight (LoRA B starts at 0)
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    expected = score_texts(peft_model, tok, TEXTS, max_length=64)
    merged = merge_into_fresh_base(peft_model, cfg, tok)
    assert type(merged).__name__ == "GPT2ForSequenceClassification"
    assert score_texts(merged, tok, TEXTS, max_length=64) == pytest.approx(expected, abs=1e-5)
    plain = peft_model.merge_and_unload()
    assert score_texts(plain, tok, TEXTS, max_length=64) == pytest.approx(expected, abs=1e-5)


def test_continue_from_reward_models(tiny_ckpts, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_preferences(24, 0, seed=2))
    # A one-output reward model keeps its head.
    rc, stdout, err = run_cli(_common(data, str(tiny_ckpts.reward), str(tmp_path / "a")))
    assert rc == 0, err
    assert "; head kept" in stdout
    # A two-head reward model gets a fresh single head.
    rc, stdout, err = run_cli(_common(data, str(tiny_ckpts.multihead_reward), str(tmp_path / "b")))
    assert rc == 0, err
    assert "new head initialised: score.weight" in stdout
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b")
    assert m.config.num_labels == 1 and m.score.weight.shape == (1, 64)


def test_malformed_lines_stop_or_skip_through_the_cli(tiny_ckpts, tmp_path) -> None:
    recs = synthetic_preferences(24, 4, seed=4)
    lines = [json.dumps(r) for r in recs]
    lines[2] = json.dumps({"prompt": "p", "chosen": " a"})  # line 3: missing field
    lines[5] = json.dumps({"prompt": "p", "responses": [" a", " b"], "ranking": [1, 1]})  # line 6
    lines[9] = '{"prompt": "p", "chosen": '  # line 10: not JSON
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    rc, stdout, err = run_cli(_common(str(data), str(tiny_ckpts.reference), str(out)))
    assert rc == 2
    assert f"malformed record at {data}:3: missing field 'rejected'" in err
    assert "Traceback" not in err and not (out / "model.safetensors").exists()

    rc, stdout, err = run_cli(
        _common(str(data), str(tiny_ckpts.reference), str(out)) + ["--on-error", "skip"]
    )
    assert rc == 0, err
    assert "training data: skipped 3 malformed record(s)" in stdout
    assert "data: 25 records" in stdout
    assert f"skipped malformed record: {data}:6: ranking repeats index 1" in err
    listed = (out / "data_errors.txt").read_text().splitlines()
    assert [ln.split(": ", 1)[0] for ln in listed] == [f"{data}:3", f"{data}:6", f"{data}:10"]
    assert (out / "model.safetensors").exists()


def _tiny_llama(path) -> str:
    """A 2-layer Llama (nn.Linear projections, which bitsandbytes quantizes; GPT-2's Conv1D it
    does not) with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reward_server.tiny import train_tokenizer

    tok = train_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _kbit_run(tmp_path, extra: list[str]) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    pytest.importorskip("bitsandbytes")
    base = _tiny_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_preferences(32, 0, seed=5))
    out = tmp_path / "q"
    argv = _common(data, base, str(out)) + ["--lora-r", "4", "--load-in-4bit", *extra]
    rc, stdout, err = run_cli(argv)
    assert rc == 0, err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    # Merged into a full-precision base: no adapter, no quantization state in the export.
    assert dtypes == {torch.float32}
    assert not [k for k in keys if "lora" in k or "absmax" in k or "quant" in k]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["reward_normalization"]["count"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_4bit_lora_run_on_cpu(tmp_path) -> None:
    """bitsandbytes >= 0.50 runs 4-bit layers on CPU, so the k-bit path runs here too; with an
    evaluation between training steps (bitsandbytes repacks 4-bit weights for inference on the
    first eval-mode CPU forward, and the packed layout has no backward)."""
    _kbit_run(tmp_path, ["--device", "cpu", "--eval-every", "1"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_4bit_lora_bf16_run_on_cuda(tmp_path) -> None:
    _kbit_run(tmp_path, ["--device", "cuda", "--precision", "bf16"])
