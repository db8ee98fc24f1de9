"""Chat messages -> one prompt text, through a Jinja chat template as transformers renders it.

A tokenizer's own template (a `chat_template` attribute) is used where it has one; dsmoe's tokenizers
are base-model tokenizers without one, so they get DEFAULT_CHAT_TEMPLATE: a plain transcript a base
model trained on text can continue ("User: ...\\n\\nAssistant: ..."). Export writes the same template
into tokenizer_config.json, so `AutoTokenizer.from_pretrained(DIR).apply_chat_template(messages,
add_generation_prompt=True)` gives the ids the server prompts with. The rendering is transformers' own
recipe (jinja2's immutable sandbox, trim_blocks, lstrip_blocks), kept here so serving needs no
transformers import.
"""
from __future__ import annotations

import functools
from typing import Optional

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant")


def chat_template(tokenizer) -> str:
    """The template chat requests go through: the tokenizer's own, else DEFAULT_CHAT_TEMPLATE."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render_chat(messages: list[dict], template: Optional[str] = None, add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` ([{"role", "content"}], content a string) under `template` (default
    DEFAULT_CHAT_TEMPLATE), ending with the assistant's turn opened when `add_generation_prompt`."""
    return _compiled(template or DEFAULT_CHAT_TEMPLATE).render(messages=messages,
                                                             add_generation_prompt=add_generation_prompt)
