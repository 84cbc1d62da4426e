"""OnnxRewardRunner refuses what it cannot serve, with messages that say what to do."""

from __future__ import annotations

import json

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from reward_server.models.loading import ModelLoadError  # noqa: E402
from reward_server.models.onnx_reward import OnnxRewardRunner, providers_for  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from reward_server.tiny import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(vocab_size=300).save_pretrained(d)
    (d / "config.json").write_text(json.dumps({"num_labels": 1, "n_positions": 64}))
    return d


def identity_model(path, input_name: str) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(input_name, TensorProto.INT64, ["b", "t"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "t"])
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["logits"])], "g", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(path))


def test_a_torch_checkpoint_directory_is_refused_with_the_export_command(tokenizer_dir):
    with pytest.raises(ModelLoadError, match="no model.onnx.*reward-server export-onnx"):
        OnnxRewardRunner("rm", str(tokenizer_dir), device="cpu")


def test_a_graph_with_other_inputs_is_refused(tokenizer_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in tokenizer_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    identity_model(d / "model.onnx", "pixels")
    with pytest.raises(ModelLoadError, match="expected input_ids and attention_mask"):
        OnnxRewardRunner("rm", str(d), device="cpu")


def test_a_garbage_model_file_is_a_load_error(tokenizer_dir, tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    for f in tokenizer_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "model.onnx").write_bytes(b"\x00 not an onnx graph")
    with pytest.raises(ModelLoadError, match="cannot load model.onnx"):
        OnnxRewardRunner("rm", str(d), device="cpu")


def test_cuda_without_the_cuda_provider_says_what_to_install():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        providers_for("cuda:0")
    assert providers_for("cpu") == ["CPUExecutionProvider"]
