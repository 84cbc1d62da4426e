"""The synthetic task: a small vocabulary, a prompt distribution and a hidden "gold" preference
function that stands in for human judgement.

Prompts are 2-4 distinct topic words followed by ``=>``. The gold reward of a response (a list of
words, plus whether it ended with EOS) is:

- the sum of the values of its distinct words (``great`` +4.0 ... ``awful`` -4.0; topic and filler
  words 0): saying a word twice adds nothing;
- +0.5 for each distinct prompt topic word the response echoes;
- -1.0 for each repeated occurrence of a word;
- -2.0 for each word past the 8th;
- -12.0 when the response never emits EOS.

Demonstrations (the SFT data) are short (3-7 words), never repeat a word, and pick words mostly at
random, so the SFT policy is well-formed but unremarkable. Preference data sampled from it rarely
shows a repeated word and never a response past 8 words, so a reward model trained on it learns
the word values well but not those penalties: that gap is what a policy optimised with beta near 0
exploits (Gao et al. 2022, reward-model over-optimisation).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PAD, EOS, UNK, SEP = "<pad>", "<eos>", "<unk>", "=>"
TOPICS = "cat dog bird fish tree river sun moon car boat city house apple bread book lamp".split()
VALUES = {
    "great": 4.0,
    "good": 2.4,
    "nice": 1.6,
    "fine": 0.0,
    "okay": 0.0,
    "plain": 0.0,
    "dull": -1.6,
    "bad": -2.4,
    "awful": -4.0,
}
FILLERS = "the a and with very so of".split()
RESPONSE_WORDS = TOPICS + list(VALUES) + FILLERS
ECHO_BONUS, REPEAT_PENALTY, LENGTH_LIMIT, LENGTH_PENALTY, NO_EOS_PENALTY = 0.5, 1.0, 8, 2.0, 12.0


@dataclass(frozen=True)
class Prompt:
    """A prompt: its topic words; `text` is what the models read."""

    topics: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.topics) + " " + SEP


def sample_prompts(n: int, rng: random.Random) -> list[Prompt]:
    """n prompts of 2-4 distinct topic words."""
    return [Prompt(tuple(rng.sample(TOPICS, rng.randint(2, 4)))) for _ in range(n)]


def parse_prompt(text: str) -> Prompt:
    """Inverse of `Prompt.text`."""
    return Prompt(tuple(w for w in text.split() if w != SEP))


def gold_reward(prompt: Prompt, words: Sequence[str], has_eos: bool) -> float:
    """The hidden gold reward of a response."""
    value = sum(VALUES.get(w, 0.0) for w in set(words))  # saying "great" twice is no greater
    echo = ECHO_BONUS * len(set(prompt.topics) & set(words))
    repeats = REPEAT_PENALTY * (len(words) - len(set(words)))
    length = LENGTH_PENALTY * max(0, len(words) - LENGTH_LIMIT)
    return value + echo - repeats - length - (0.0 if has_eos else NO_EOS_PENALTY)


def demonstration(prompt: Prompt, rng: random.Random) -> list[str]:
    """An unremarkable well-formed response: 3-7 distinct words, some echoing the prompt."""
    n = rng.randint(3, 7)
    words: list[str] = []
    while len(words) < n:
        u = rng.random()
        if u < 0.2:
            w = rng.choice(prompt.topics)
        elif u < 0.65:
            w = rng.choice(list(VALUES))  # good and bad words alike: unremarkable on average
        else:
            w = rng.choice(RESPONSE_WORDS)
        if w not in words:
            words.append(w)
    return words


def build_tokenizer(out_dir: str | Path | None = None):
    """A word-level tokenizer over the task's vocabulary (pad distinct from EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, SEP, *RESPONSE_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=UNK,
        model_max_length=32,
    )
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def response_words(text: str) -> list[str]:
    """Words of a decoded response (special tokens already skipped)."""
    return [w for w in text.split() if w not in (PAD, EOS)]


def gold_metrics(
    prompts: list[str], completions: list[str], has_eos: list[bool]
) -> dict[str, float]:
    """The trainer's `run.sample_metrics` hook: gold reward of the rollout batch."""
    golds = [
        gold_reward(parse_prompt(p), response_words(c), bool(e))
        for p, c, e in zip(prompts, completions, has_eos, strict=True)
    ]
    return {"gold_reward_mean": sum(golds) / max(1, len(golds))}
