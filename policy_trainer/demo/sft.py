"""SFT for the demo: a tiny GPT-2 trained on demonstrations, and sampling from any checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from policy_trainer.demo.task import (
    Prompt,
    build_tokenizer,
    demonstration,
    response_words,
    sample_prompts,
)


@dataclass
class Sample:
    """One sampled response."""

    prompt: Prompt
    text: str  # decoded response, special tokens skipped (what the trainer sends the server)
    words: list[str]
    has_eos: bool


def tiny_gpt2(tokenizer: Any, n_layer: int = 2, n_embd: int = 64, seed: int = 0) -> Any:
    """A tiny random-init GPT-2 (dropout off) sized for the task's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def train_sft(
    out_dir: Path,
    *,
    n_demos: int = 4000,
    steps: int = 500,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Train the SFT policy on demonstrations (loss on response + EOS tokens only); save it."""
    rng = random.Random(seed)
    tok = build_tokenizer()
    model = tiny_gpt2(tok, seed=seed)
    prompts = sample_prompts(n_demos, rng)
    rows = []
    for p in prompts:
        p_ids = tok(p.text)["input_ids"]
        r_ids = tok(" ".join(demonstration(p, rng)))["input_ids"] + [tok.eos_token_id]
        rows.append((p_ids, r_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    bar = tqdm(range(steps), desc="SFT", unit="step")
    for _ in bar:
        chunk = rng.sample(rows, batch)
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((batch, width), tok.pad_token_id)  # [B, T] right padding
        labels = torch.full((batch, width), -100)  # [B, T]
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (p, r) in enumerate(chunk):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(r)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def sample(
    model_dir: str | Path,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    batch: int = 256,
) -> list[Sample]:
    """Sample one response per prompt (left-padded prompts, truncated after the first EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    out: list[Sample] = []
    for a in range(0, len(prompts), batch):
        part = prompts[a : a + batch]
        enc = tok([p.text for p in part], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,  # as the trainer: no empty responses, no special tokens
            suppress_tokens=[i for i in tok.all_special_ids if i != tok.eos_token_id],
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for p, row in zip(part, gen[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            has_eos = tok.eos_token_id in row
            row = row[: row.index(tok.eos_token_id)] if has_eos else row
            text = tok.decode(row, skip_special_tokens=True)
            out.append(Sample(p, text, response_words(text), has_eos))
    return out
