"""The one place a conversation becomes tokens: chat, generation, training and serving all call this."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from danlu.tokenization.templates import PIECE_BREAK, ChatTemplate, get_template, with_options

ROLES = ("system", "user", "assistant")
TemplateChoice = Union[str, ChatTemplate, None]


def resolve_template(tokenizer, name: TemplateChoice = None, **options) -> ChatTemplate:
    """The given or named template, else the model's own, else LLaMA-Factory's `default`.

    `options` are LLaMA-Factory's default_system, enable_thinking and preserve_thinking (see with_options); a
    model's own Jinja template receives enable_thinking as Qwen3's does.
    """
    if isinstance(name, ChatTemplate):
        chosen = name
    elif name:
        chosen = get_template(name)
    elif isinstance(getattr(tokenizer, "chat_template", None), str) and tokenizer.chat_template:
        chosen = ChatTemplate("model", tokenizer.chat_template)
    else:
        chosen = get_template("default")
    return with_options(chosen, **options)


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
        if PIECE_BREAK in message["content"]:
            raise ValueError(f"messages[{i}].content holds U+FDD0, a noncharacter reserved for internal use")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


def render_pieces(tokenizer, messages: Sequence[dict], template: TemplateChoice = None,
                  system: Optional[str] = None, add_generation_prompt: bool = True,
                  for_training: bool = False) -> list[str]:
    """The conversation as text in the model's chat format, cut where LLaMA-Factory encodes separately.

    The system prompt is `system`, else a leading system message, else the template's default (an empty one
    counts as none, as in LLaMA-Factory). `for_training` renders every assistant message as an answer being
    learned (LLaMA-Factory's encode_multiturn); otherwise earlier answers are the context of the next one
    (encode_oneturn). The two differ only for reasoning templates, in the thoughts of earlier answers.
    A model's own template is one piece.
    """
    chat_template = resolve_template(tokenizer, template)
    messages = validate_messages(messages)
    leading = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if leading is not None else messages
    for i, message in enumerate(turns):
        if message["role"] == "system":
            raise ValueError(f"messages[{i + len(messages) - len(turns)}]: a system message may only come first")
    turns = chat_template.shape_thoughts(turns, for_training, add_generation_prompt)
    system = (system if system is not None else leading) or chat_template.default_system
    if PIECE_BREAK in system:
        raise ValueError("the system prompt holds U+FDD0, a noncharacter reserved for internal use")
    if system:
        turns = [{"role": "system", "content": system}] + turns
    text = tokenizer.apply_chat_template(turns, chat_template=chat_template.jinja, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=chat_template.enable_thinking, piece_break=PIECE_BREAK)
    return [piece for piece in text.split(PIECE_BREAK) if piece]


def render_chat(tokenizer, messages: Sequence[dict], template: TemplateChoice = None,
                system: Optional[str] = None, add_generation_prompt: bool = True, for_training: bool = False) -> str:
    """The conversation as text in the model's chat format (see render_pieces)."""
    return "".join(render_pieces(tokenizer, messages, template, system, add_generation_prompt, for_training))


def encode_pieces(tokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """The ids of each piece, encoded on its own as LLaMA-Factory does (a tokenizer may merge across a boundary)."""
    return tokenizer(list(pieces), add_special_tokens=False)["input_ids"] if pieces else []


def encode_chat(tokenizer, messages: Sequence[dict], template: TemplateChoice = None,
                system: Optional[str] = None, add_generation_prompt: bool = True) -> list[int]:
    pieces = render_pieces(tokenizer, messages, template, system, add_generation_prompt)
    return [token for ids in encode_pieces(tokenizer, pieces) for token in ids]


def stop_words(tokenizer, template: TemplateChoice = None) -> list[str]:
    return list(resolve_template(tokenizer, template).stop_words)
