"""The one place a conversation becomes tokens: chat, generation, training and serving all call this."""
from __future__ import annotations

from typing import Optional, Sequence

from danlu.tokenization.templates import ChatTemplate, get_template

ROLES = ("system", "user", "assistant")


def resolve_template(tokenizer, name: Optional[str] = None) -> ChatTemplate:
    """The named template, else the model's own, else LLaMA-Factory's `default`."""
    if name:
        return get_template(name)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return ChatTemplate("model", own)
    return get_template("default")


def validate_messages(messages: Sequence[dict]) -> list[dict]:
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(message['content']).__name__}")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


def render_chat(tokenizer, messages: Sequence[dict], template: Optional[str] = None,
                system: Optional[str] = None, add_generation_prompt: bool = True) -> str:
    """The conversation as text in the model's chat format (system prompt defaulted by the template)."""
    chat_template = resolve_template(tokenizer, template)
    messages = validate_messages(messages)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    elif chat_template.default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": chat_template.default_system}] + messages
    return tokenizer.apply_chat_template(messages, chat_template=chat_template.jinja, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: Sequence[dict], template: Optional[str] = None,
                system: Optional[str] = None, add_generation_prompt: bool = True) -> list[int]:
    text = render_chat(tokenizer, messages, template, system, add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_words(tokenizer, template: Optional[str] = None) -> list[str]:
    return list(resolve_template(tokenizer, template).stop_words)
