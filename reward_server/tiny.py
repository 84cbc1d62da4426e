"""Tiny random-init checkpoints for tests, benchmarks and offline smoke runs.

Nothing is downloaded: a byte-level BPE tokenizer is trained with `tokenizers` on synthetic text,
GPT-2-shaped models are built from a config with random weights, and everything is written with
``save_pretrained`` (safetensors) so the real loading code is exercised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "the a an of to in and is was for on with as by at from it this that be are not or "
    "good bad great poor helpful harmful safe answer question model reward policy value "
    "cat dog bird fish tree river mountain city house road car train plane ship sun moon "
    "red green blue yellow black white big small fast slow happy sad one two three four five"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def synthetic_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Random sentences over a small English-like vocabulary (tokenizer training text)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n_lines)]


def train_tokenizer(vocab_size: int = 512, seed: int = 0, model_max_length: int = 512):
    """Train a byte-level BPE tokenizer; pad (``<pad>``) is distinct from EOS (``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class TinyCheckpoints:
    """Paths of the checkpoints written by `build_tiny_checkpoints`."""

    reward: Path
    reference: Path
    multihead_reward: Path


def gpt2_config(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int, **kw):
    """A GPT-2 config with dropout off (RLHF wants deterministic forwards)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        **kw,
    )


def build_tiny_checkpoints(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
) -> TinyCheckpoints:
    """Write a tiny reward model, a 2-head reward model and a tiny causal LM under ``out_dir``."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    out = Path(out_dir)
    tok = train_tokenizer(vocab_size=vocab_size, seed=seed, model_max_length=n_positions)
    common = dict(
        vocab_size=len(tok),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    paths = TinyCheckpoints(out / "reward", out / "reference", out / "reward_2head")
    rm = GPT2ForSequenceClassification(gpt2_config(num_labels=1, **common))
    rm.save_pretrained(paths.reward)
    tok.save_pretrained(paths.reward)
    rm2 = GPT2ForSequenceClassification(
        gpt2_config(
            num_labels=2,
            id2label={0: "helpfulness", 1: "safety"},
            label2id={"helpfulness": 0, "safety": 1},
            **common,
        )
    )
    rm2.save_pretrained(paths.multihead_reward)
    tok.save_pretrained(paths.multihead_reward)
    lm = GPT2LMHeadModel(gpt2_config(**common))
    lm.save_pretrained(paths.reference)
    tok.save_pretrained(paths.reference)
    return paths


def build_tiny_llama(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 4,
    n_kv_head: int = 2,
    n_positions: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
) -> TinyCheckpoints:
    """Llama-shaped checkpoints (rotary positions, grouped-query attention, RMSNorm) whose
    tokenizer prepends a BOS token, as Llama's does: a reward model, a 2-head reward model and a
    causal LM, written like `build_tiny_checkpoints`."""
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    tok = train_tokenizer(vocab_size=vocab_size, seed=seed, model_max_length=n_positions)
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=n_positions,
        bos_token_id=bos,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    paths = TinyCheckpoints(out / "reward", out / "reference", out / "reward_2head")
    for path, model in (
        (paths.reward, LlamaForSequenceClassification(LlamaConfig(num_labels=1, **common))),
        (
            paths.multihead_reward,
            LlamaForSequenceClassification(
                LlamaConfig(num_labels=2, id2label={0: "helpfulness", 1: "safety"}, **common)
            ),
        ),
        (paths.reference, LlamaForCausalLM(LlamaConfig(**common))),
    ):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def build_tiny_bert_rm(
    out_dir: str | Path,
    *,
    hidden: int = 32,
    n_layer: int = 2,
    seed: int = 0,
    n_head: int = 2,
    max_positions: int = 256,
) -> Path:
    """A BERT-shaped reward model (bidirectional encoder, one output) whose tokenizer encodes text
    pairs as ``[CLS] prompt [SEP] completion [SEP]`` with segment ids 0/1: the input format of
    cross-encoder reward models such as OpenAssistant's DeBERTa ones."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    out = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_positions,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(fast),
            hidden_size=hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            intermediate_size=hidden * 2,
            max_position_embeddings=max_positions,
            type_vocab_size=2,
            num_labels=1,
            pad_token_id=fast.pad_token_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            initializer_range=0.5,  # scores spread widely enough to tell inputs apart
        )
    )
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":  # python -m reward_server.tiny OUT_DIR
    import sys

    print(build_tiny_checkpoints(sys.argv[1] if len(sys.argv) > 1 else "tiny-models"))
