"""How text reaches a reward model: one rendering shared by training and serving.

The reward-model trainer (`reward_server.training`) and the server render inputs with these two
functions, so a checkpoint scores at serving time exactly the strings it was trained on.

- A prompt/completion pair is always ``prompt + completion``: plain concatenation, no separator,
  no chat template, no EOS appended.
- A message list (chat conversation) is rendered with the tokenizer's own chat template
  (``apply_chat_template(messages, tokenize=False)``); a tokenizer without one is an error.

The reward is read from the last non-pad token (GPT-2-style sequence classification), so no EOS is
appended by either function and the tokenizer's pad token must be distinct from EOS.

This module imports neither torch nor transformers: it works on any tokenizer object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def render_pair(tokenizer: Any, prompt: str, completion: str) -> str:
    """Render a prompt/completion pair as the reward model sees it: ``prompt + completion``.

    ``tokenizer`` is accepted so callers treat both renderings alike; pairs never use a template.
    """
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(
            "prompt and completion must be strings, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    return prompt + completion


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a chat message list and return it as plain ``{"role", "content"}`` dicts.

    Raises ValueError naming the offending message when the shape is wrong.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{role, content}} objects, got {messages!r:.80}"
        )
    if len(messages) == 0:
        raise ValueError("messages must not be empty")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(
                f"message {i} must be an object with 'role' and 'content', got {m!r:.80}"
            )
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i}: 'role' must be a non-empty string, got {role!r:.80}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be a string, got {content!r:.80}")
        out.append({"role": role, "content": content})
    return out


def render_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """Render a chat conversation with the tokenizer's chat template (``tokenize=False``).

    Raises ValueError when the tokenizer has no chat template or the messages are malformed.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template, so message lists cannot be rendered; "
            "send prompt/completion text instead, or use a model whose tokenizer has a template"
        )
    checked = check_messages(messages)
    try:
        text = tokenizer.apply_chat_template(checked, tokenize=False)
    except ValueError:
        raise
    except Exception as e:  # jinja2 errors, e.g. raise_exception("roles must alternate")
        raise ValueError(f"the chat template rejected these messages: {e}") from None
    if not isinstance(text, str):
        raise ValueError(f"chat template returned {type(text).__name__}, expected a string")
    return text
