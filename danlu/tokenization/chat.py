"""The one place a conversation becomes tokens: chat, generation, training and serving all call this.

Messages are text. A message can hold the text of one of the tokenizer's control (special) tokens, e.g. a user
typing `<|im_end|>\\n<|im_start|>system\\n...`; encoded as those tokens it would end its turn and forge another.
render_pieces wraps each such string in a message between TEXT_OPEN and TEXT_CLOSE (noncharacters, refused in
messages like PIECE_BREAK), and encode_pieces encodes it as plain text, as transformers' `apply_chat_template(...,
sanitize_control_tokens=True)` does. Only the template's own control tokens are tokens. A message without such a
string renders and encodes exactly as it would without this (nothing is marked).
"""
from __future__ import annotations

import functools
import re
from typing import Optional, Sequence, Union

from danlu.tokenization.templates import PIECE_BREAK, ChatTemplate, get_template, with_options

ROLES = ("system", "user", "assistant")
TemplateChoice = Union[str, ChatTemplate, None]
TEXT_OPEN, TEXT_CLOSE = "\ufdd1", "\ufdd2"  # noncharacters: around a control token's text that stays text
RESERVED = (PIECE_BREAK, TEXT_OPEN, TEXT_CLOSE)
# A marked control token (group 1), or a marker the template separated from its partner (group 1 is None)
_MARKED = re.compile(f"{TEXT_OPEN}([^{TEXT_OPEN}{TEXT_CLOSE}]*){TEXT_CLOSE}|[{TEXT_OPEN}{TEXT_CLOSE}]")


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


def _reserved_in(text: str) -> Optional[str]:
    for char in RESERVED:
        if char in text:
            return f"U+{ord(char):04X}"
    return None


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
        reserved = _reserved_in(message["content"])
        if reserved:
            raise ValueError(f"messages[{i}].content holds {reserved}, a noncharacter reserved for internal use")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


def _special_tokens(tokenizer) -> dict[str, Optional[int]]:
    """The tokenizer's special tokens (text to id, when known)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {token.content: i for i, token in decoder.items() if getattr(token, "special", False)}
    for text in getattr(tokenizer, "all_special_tokens", None) or ():
        special.setdefault(text, None)
    return {text: i for text, i in special.items() if text}


@functools.lru_cache(maxsize=64)
def _pattern(tokens: frozenset) -> Optional[re.Pattern]:
    longest_first = sorted(tokens, key=lambda t: (-len(t), t))  # a token before the tokens it contains
    return re.compile("|".join(map(re.escape, longest_first))) if longest_first else None


def control_pattern(tokenizer, template: ChatTemplate) -> Optional[re.Pattern]:
    """What is text, not a token, in a message: the tokenizer's special tokens, except a reasoning template's
    thought words (an answer's own markers, encoded as tokens as LLaMA-Factory does)."""
    thought_words = {word.strip() for word in template.thought_words or ()}
    return _pattern(frozenset(_special_tokens(tokenizer)) - thought_words)


def mark_text(content: str, pattern: Optional[re.Pattern]) -> str:
    """`content` with each control token's text between TEXT_OPEN and TEXT_CLOSE (unchanged if there is none)."""
    return pattern.sub(lambda m: TEXT_OPEN + m.group(0) + TEXT_CLOSE, content) if pattern else content


def render_pieces(tokenizer, messages: Sequence[dict], template: TemplateChoice = None,
                  system: Optional[str] = None, add_generation_prompt: bool = True,
                  for_training: bool = False) -> list[str]:
    """The conversation as text in the model's chat format, cut where LLaMA-Factory encodes separately.

    The system prompt is `system`, else a leading system message, else the template's default (an empty one
    counts as none, as in LLaMA-Factory). `for_training` renders every assistant message as an answer being
    learned (LLaMA-Factory's encode_multiturn); otherwise earlier answers are the context of the next one
    (encode_oneturn). The two differ only for reasoning templates, in the thoughts of earlier answers.
    A model's own template is one piece.

    A control token's text inside a message or the system prompt comes between TEXT_OPEN and TEXT_CLOSE, so that
    encode_pieces encodes it as text (see the module's docstring); ordinary messages have no marks.
    """
    chat_template = resolve_template(tokenizer, template)
    messages = validate_messages(messages)
    leading = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if leading is not None else messages
    for i, message in enumerate(turns):
        if message["role"] == "system":
            raise ValueError(f"messages[{i + len(messages) - len(turns)}]: a system message may only come first")
    pattern = control_pattern(tokenizer, chat_template)
    turns = [{**message, "content": mark_text(message["content"], pattern)} for message in turns]
    turns = chat_template.shape_thoughts(turns, for_training, add_generation_prompt)
    system = (system if system is not None else leading) or chat_template.default_system
    reserved = _reserved_in(system)
    if reserved:
        raise ValueError(f"the system prompt holds {reserved}, a noncharacter reserved for internal use")
    if system:
        turns = [{"role": "system", "content": mark_text(system, pattern)}] + turns
    text = tokenizer.apply_chat_template(turns, chat_template=chat_template.jinja, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=chat_template.enable_thinking, piece_break=PIECE_BREAK)
    return [piece for piece in text.split(PIECE_BREAK) if piece]


def render_chat(tokenizer, messages: Sequence[dict], template: TemplateChoice = None,
                system: Optional[str] = None, add_generation_prompt: bool = True, for_training: bool = False) -> str:
    """The conversation as text in the model's chat format (see render_pieces, and plain_text to show it)."""
    return "".join(render_pieces(tokenizer, messages, template, system, add_generation_prompt, for_training))


def plain_text(text: str) -> str:
    """Rendered text without the TEXT_OPEN / TEXT_CLOSE marks (to show it; encode the marked text)."""
    return text.replace(TEXT_OPEN, "").replace(TEXT_CLOSE, "")


def encode_pieces(tokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """The ids of each piece, encoded on its own as LLaMA-Factory does (a tokenizer may merge across a boundary).

    Marked text in a piece (see render_pieces) is encoded as text; a piece without marks as before.
    """
    pieces = list(pieces)
    if not any(TEXT_OPEN in piece or TEXT_CLOSE in piece for piece in pieces):
        return tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    return [_encode_marked(tokenizer, piece) if TEXT_OPEN in piece or TEXT_CLOSE in piece
            else tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in pieces]


def _encode_marked(tokenizer, piece: str) -> list[int]:
    """A piece encoded as the tokenizer would, but with each marked control token as text.

    The piece is encoded in parts, split at the marks (as transformers' `sanitize_control_tokens` does): the part
    before the first mark as usual, each later one as text that continues the text before it. A mark the template
    separated from its partner (by cutting the message) is dropped but still splits the text, so that its two
    sides cannot join into a control token.
    """
    parts = _MARKED.split(piece)  # text, marked token (None: a lone mark), text, marked token, ..., text
    special_ids = {i for i in _special_tokens(tokenizer).values() if i is not None}

    def tokens(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_ids(text):
        return _as_text(tokenizer, text)

    ids, at_start = tokens(parts[0]), not parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if not part:
            continue
        if i % 2:  # a marked control token
            as_text = _continuing(text_ids, part, at_start)
            if special_ids & set(as_text):
                raise ValueError(f"the tokenizer encodes the text {part!r} (in a message) as a control token, "
                                 "so it cannot be kept as text")
            ids += as_text
        else:
            ids += _continuing(tokens, part, at_start)
        at_start = False
    return ids


def _continuing(encode, text: str, at_start: bool) -> list[int]:
    """`encode(text)`, as continuing earlier text unless `at_start`: a SentencePiece-style tokenizer starts a
    string with a word boundary ("▁"), so the text is encoded after a newline whose ids are then dropped (as
    transformers does)."""
    if at_start:
        return encode(text)
    newline, ids = encode("\n"), encode("\n" + text)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode(text)


def _as_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` matching no added token. A fast tokenizer runs its own pipeline rather than take
    `split_special_tokens`, a switch it shares with every other caller (e.g. the API server's other threads)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [token.id for split in splits for token in backend.model.tokenize(split)]


def encode_chat(tokenizer, messages: Sequence[dict], template: TemplateChoice = None,
                system: Optional[str] = None, add_generation_prompt: bool = True) -> list[int]:
    """The conversation's prompt ids (render_pieces, encode_pieces): a control token in a message is text."""
    pieces = render_pieces(tokenizer, messages, template, system, add_generation_prompt)
    return [token for ids in encode_pieces(tokenizer, pieces) for token in ids]


def stop_words(tokenizer, template: TemplateChoice = None) -> list[str]:
    return list(resolve_template(tokenizer, template).stop_words)
