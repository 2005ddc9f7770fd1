"""The chat format: one definition for training (moa/data/chat.py), for the exported
tokenizer's `chat_template` (moa/hf/export.py) and for `python -m moa.chat`.

`<|bos|>`, then each message as its role token and its content, an assistant message
closed by `<|eos|>`; the roles are system, user, assistant, think and reasoning. The
generation prompt is `<|assistant|>`:

    <|bos|><|system|>Be brief.<|user|>Hi<|assistant|>Hello<|eos|><|user|>Why?<|assistant|>

`CHAT_TEMPLATE` (Jinja, for `tokenizer.apply_chat_template`) and `render_segments` (Python)
write the same text; tests/test_chat_data.py checks it against the exported tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ROLES = ("system", "user", "assistant", "think", "reasoning")
MODEL_ROLES = ("assistant", "think", "reasoning")  # text the model writes: it carries loss
BOS, EOS = "<|bos|>", "<|eos|>"
GENERATION_PROMPT = "<|assistant|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in " + repr(list(ROLES)) + " %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; roles: " + ", ".join(ROLES)
    + "') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + GENERATION_PROMPT + "' }}{% endif %}"
)


def role_token(role: str) -> str:
    return f"<|{role}|>"


def render_segments(messages: Iterable[Mapping[str, str]],
                    add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, written by the model) pieces, in order.

    The model writes an assistant message's content and its `<|eos|>`, and a think or
    reasoning message whole (its role token included, since the model opens it itself).
    The `<|assistant|>` token that opens a reply is the prompt's, except right after a
    think/reasoning message, where the model writes it to end its reasoning.
    Joined, the pieces are exactly `CHAT_TEMPLATE`'s text."""
    pieces = [(BOS, False)]
    previous = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if role == "assistant":
            pieces += [(role_token(role), previous in ("think", "reasoning")),
                       (content + EOS, True)]
        else:
            pieces.append((role_token(role) + content, role in MODEL_ROLES))
        previous = role
    if add_generation_prompt:
        pieces.append((GENERATION_PROMPT, False))
    return pieces


def render(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation's text, as `apply_chat_template(..., tokenize=False)` writes it."""
    return "".join(text for text, _ in render_segments(messages, add_generation_prompt))
