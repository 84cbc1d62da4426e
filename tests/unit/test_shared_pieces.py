"""The pieces the server, reward-model training and the PPO trainer share: device resolution, the
tokenizer's pad-token policy, dropout off, seeding, and the fixed-cost fit of calibration."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from reward_server.devices import DeviceError, resolve_device, resolve_dtype
from reward_server.dropout import disable_dropout
from reward_server.engine.calibration import default_intra_op_threads, overhead_from_fit
from reward_server.fingerprint import tokenizer_fingerprint
from reward_server.seeding import seed_everything
from reward_server.tokenizer_loading import PAD_TOKEN, classifier_pad_id, load_tokenizer


def test_cpu_and_auto_without_cuda_resolve_to_cpu():
    assert resolve_device("cpu") == "cpu" and resolve_device("cpu", 3) == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu" and resolve_device("auto", 1) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_names_the_setting():
    with pytest.raises(DeviceError, match=r"model\.device cuda: CUDA is not available"):
        resolve_device("cuda", 0, setting="model.device")
    with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
        resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_the_local_rank_only_when_given():
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda", 1) == "cuda:1"
    assert resolve_device("cuda:0", 1) == "cuda:0"


def test_dtype_names_and_auto_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def _save_tokenizer(tmp_path, unk: str | None, pad: str | None) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "<unk>": 3, "<bos>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token=unk, pad_token=pad
    )
    path = tmp_path / f"tok-{unk}-{pad}"
    fast.save_pretrained(path)
    return str(path)


def test_missing_pad_reuses_a_token_and_keeps_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    src = _save_tokenizer(tmp_path, unk="<unk>", pad=None)
    plain = AutoTokenizer.from_pretrained(src)
    tok = load_tokenizer(src, padding_side="left")
    assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(plain)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(plain)
    assert tok.padding_side == "left"


def test_pad_equal_to_eos_is_replaced_without_unk(tmp_path):
    tok = load_tokenizer(_save_tokenizer(tmp_path, unk=None, pad="<eos>"))
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1  # id 0 is EOS: the next id


def test_training_adds_a_pad_token_of_its_own(tmp_path):
    src = _save_tokenizer(tmp_path, unk="<unk>", pad=None)
    tok = load_tokenizer(src, add_pad_token=True)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 5 and len(tok) == 6


def test_an_existing_distinct_pad_is_kept(tmp_path):
    tok = load_tokenizer(_save_tokenizer(tmp_path, unk="<unk>", pad="b"), add_pad_token=True)
    assert tok.pad_token == "b" and len(tok) == 5


def test_a_classifier_without_a_pad_id_pads_with_its_own_pad_else_eos(tmp_path):
    # GPT-2-style: no pad of its own -> EOS (as TRL's RewardTrainer trains them), never the
    # fallback pad of rule 3, which could be a real last token ("!" is GPT-2's id 0)
    no_pad = load_tokenizer(_save_tokenizer(tmp_path, unk=None, pad=None))
    assert no_pad.pad_token_id == 1 and classifier_pad_id(no_pad) == no_pad.eos_token_id == 0
    own = load_tokenizer(_save_tokenizer(tmp_path, unk="<unk>", pad="b"))
    assert classifier_pad_id(own) == own.convert_tokens_to_ids("b")


def test_a_missing_tokenizer_is_one_clear_error(tmp_path):
    from reward_server.tokenizer_loading import TokenizerLoadError

    with pytest.raises(TokenizerLoadError, match="cannot load a tokenizer from"):
        load_tokenizer(str(tmp_path / "nothing here"))


class _KeepsRate(torch.nn.Module):
    """Attention code that keeps its dropout rate as a number, as many Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_dropout = 0.1
        self.scale = 0.5  # not a dropout rate: left alone


def test_disable_dropout_zeroes_modules_rates_and_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, attn_pdrop=0.2, resid_pdrop=0.3)
    model = GPT2LMHeadModel(cfg)
    model.extra = _KeepsRate()
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.extra.attention_dropout == 0.0 and model.extra.scale == 0.5
    assert model.config.attn_pdrop == 0.0 and model.config.resid_pdrop == 0.0


def test_seed_everything_repeats_python_numpy_and_torch_draws():
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first


def test_overhead_fit_and_thread_default():
    # 1 ms fixed + 0.01 ms per token: c0 / c1 = 100 tokens
    assert overhead_from_fit([(10, 0.001 + 1e-5 * 10), (1000, 0.001 + 1e-5 * 1000)]) == (
        pytest.approx(100.0)
    )
    assert overhead_from_fit([(10, 0.02), (1000, 0.01)]) == math.inf  # the big batch was faster
    assert default_intra_op_threads(3, 2, "cpu") == 3
    assert default_intra_op_threads(0, 1, "cpu") == 0
    assert default_intra_op_threads(0, 2, "cuda") == 0
