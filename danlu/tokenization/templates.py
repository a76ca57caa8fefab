"""Named chat templates, as LLaMA-Factory users write them (`--template qwen3`), rendering as LLaMA-Factory does.

A template is declared the way LLaMA-Factory registers it: the text of its prefix, system, user and assistant
slots, where `{content}` is the message and `{bos}` / `{eos}` the tokenizer's tokens. The slots become one
Jinja string, so rendering still goes through `tokenizer.apply_chat_template` like a model's own template
(tokenizer_config.json / GGUF), which is used when no name is given.

LLaMA-Factory's user slot ends with the assistant's header (`<|im_start|>assistant\\n`); `generation` names
that tail, so a conversation ending with the user gets it only with `add_generation_prompt`.

LLaMA-Factory encodes each slot, each bos / eos and an added empty thought on its own, and a tokenizer may merge
differently across such a boundary than inside one text. The Jinja therefore writes the `piece_break` variable
there; chat.render_pieces sets it and cuts, anyone else rendering the Jinja leaves it undefined (empty).

Reasoning templates (LLaMA-Factory's ReasoningTemplate, e.g. `qwen3`) also edit the assistant messages before
rendering, see `ChatTemplate.shape_thoughts`. Templates with LLaMA-Factory's `efficient_eos` (the eos of one
answer trained at the start of the next turn) are not expressible here and none is registered.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

_THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")  # LLaMA-Factory's default thought_words
PIECE_BREAK = "\ufdd0"  # a Unicode noncharacter (for internal use): where LLaMA-Factory encodes separately


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    default_system: str = ""
    stop_words: tuple[str, ...] = field(default=())
    replace_eos: bool = False  # LLaMA-Factory makes stop_words[0] the tokenizer's eos (generation, export)
    thought_words: Optional[tuple[str, str]] = None  # set: a reasoning template
    enable_thinking: bool = True  # LLaMA-Factory's data argument of the same name, and its default
    preserve_thinking: bool = False  # keep earlier answers' thoughts in a prompt

    @property
    def empty_thought(self) -> str:
        return "".join(self.thought_words or ())

    def has_thought(self, content: str) -> bool:
        return any(word.strip() in content for word in self.thought_words or ())

    def remove_thought(self, content: str) -> str:
        opening, closing = self.thought_words
        return re.sub(f"{re.escape(opening)}.*?{re.escape(closing)}", "", content, flags=re.DOTALL).lstrip("\n")

    def shape_thoughts(self, turns: Sequence[dict], for_training: bool, add_generation_prompt: bool) -> list[dict]:
        """The user/assistant turns with thoughts as LLaMA-Factory encodes them (no change without thought words).

        An answer is an assistant message being learned or generated: all of them for training (LLaMA-Factory's
        encode_multiturn), else only a final one (encode_oneturn). Without thinking an answer loses its thought;
        an answer without one gets the empty thought (with `enable_thinking` LLaMA-Factory trains on it, else it
        belongs to the prompt; the text is the same). Earlier answers in a prompt lose their thoughts unless
        `preserve_thinking`. A generation prompt gets the empty thought from the Jinja when thinking is off.
        """
        if self.thought_words is None:
            return list(turns)
        last = len(turns) - 1
        shaped = []
        for i, message in enumerate(turns):
            content = message["content"]
            if message["role"] == "assistant":
                if for_training or (i == last and not add_generation_prompt):
                    if not self.enable_thinking:
                        content = self.remove_thought(content)
                        if for_training and self.has_thought(content):  # LF would train it with no empty thought
                            raise ValueError(f"enable_thinking is off but an answer has a thought marker outside a "
                                             f"removable {self.thought_words[0]!r}...{self.thought_words[1]!r}: "
                                             f"{content[:60]!r}")
                    if not self.has_thought(content):  # LF encodes the empty thought on its own
                        content = self.empty_thought + PIECE_BREAK + content
                elif not self.preserve_thinking:
                    content = self.remove_thought(content)
            shaped.append({**message, "content": content})
        return shaped


def _expression(slot: str, content: str, eos: str, new_piece: bool = True) -> str:
    """A slot's text as one Jinja expression (literals quoted, so Jinja's whitespace control never applies).

    `piece_break` marks where LLaMA-Factory encodes separately: where a slot starts, and around bos / eos.
    """
    names = {"{content}": content, "{bos}": "bos_token", "{eos}": eos}
    items = ["piece_break"] if new_piece else []
    for piece in re.split(r"(\{content\}|\{bos\}|\{eos\})", slot):
        if piece in ("{bos}", "{eos}"):
            items += ["piece_break", names[piece], "piece_break"]
        elif piece:
            items.append(names.get(piece) or json.dumps(piece))
    return " ~ ".join(items) or "''"


def slot_template(name: str, *, user: str, assistant: str, system: str = "{content}", prefix: str = "",
                  generation: str = "", fuse_system: bool = False, default_system: str = "",
                  stop_words: Sequence[str] = (), replace_eos: bool = False,
                  thought_words: Optional[tuple[str, str]] = None) -> ChatTemplate:
    """A template from LLaMA-Factory-style slots.

    `generation` is the tail of `user` that opens the assistant's turn; `fuse_system` puts the system slot inside
    the first user message (LLaMA-Factory's Llama2Template). With `replace_eos`, `{eos}` is stop_words[0].
    """
    if not user.endswith(generation):
        raise ValueError(f"template {name!r}: generation {generation!r} must end the user slot {user!r}")
    eos = json.dumps(stop_words[0]) if replace_eos else "eos_token"
    jinja = ("{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
             "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}")
    if prefix:
        jinja += "{{- " + _expression(prefix, "''", eos) + " }}"
    if not fuse_system:
        jinja += "{%- if system %}{{- " + _expression(system, "system", eos) + " }}{%- endif %}"
    jinja += "{%- for m in turns %}{%- if m['role'] == 'user' %}"
    if fuse_system:
        jinja += ("{%- set content = (" + _expression(system, "system", eos, new_piece=False)
                  + " ~ m['content']) if loop.first and system else m['content'] %}")
    else:
        jinja += "{%- set content = m['content'] %}"
    jinja += "{{- " + _expression(user[:len(user) - len(generation)], "content", eos) + " }}"
    if generation or thought_words:
        jinja += "{%- if not loop.last or add_generation_prompt %}"
        if generation:
            jinja += "{{- " + _expression(generation, "''", eos, new_piece=False) + " }}"
        if thought_words:
            jinja += ("{%- if loop.last and enable_thinking is defined and not enable_thinking %}{{- piece_break ~ "
                      + json.dumps("".join(thought_words)) + " }}{%- endif %}")
        jinja += "{%- endif %}"
    jinja += ("{%- elif m['role'] == 'assistant' %}{{- " + _expression(assistant, "m['content']", eos)
              + " }}{%- endif %}{%- endfor %}")
    return ChatTemplate(name, jinja, default_system, tuple(stop_words), replace_eos, thought_words)


def _qwen_like(name: str, **options) -> ChatTemplate:
    """ChatML as LLaMA-Factory's `chatml`, `qwen`, `qwen3` and `qwen3_nothink` write it."""
    return slot_template(name, user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                         generation="<|im_start|>assistant\n", assistant="{content}<|im_end|>\n",
                         system="<|im_start|>system\n{content}<|im_end|>\n", replace_eos=True, **options)


# Each entry follows LLaMA-Factory's register_template(name=...) in src/llamafactory/data/template.py.
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    slot_template("default", user="Human: {content}{eos}\nAssistant:", generation="Assistant:",
                  assistant="{content}{eos}\n", system="System: {content}{eos}\n"),
    slot_template("alpaca", user="### Instruction:\n{content}\n\n### Response:\n", generation="### Response:\n",
                  assistant="{content}{eos}\n\n",
                  default_system="Below is an instruction that describes a task. "
                                 "Write a response that appropriately completes the request.\n\n"),
    _qwen_like("chatml", stop_words=("<|im_end|>", "<|im_start|>")),
    _qwen_like("qwen", stop_words=("<|im_end|>",),
               default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    _qwen_like("qwen3", stop_words=("<|im_end|>",), thought_words=_THOUGHT_WORDS),
    _qwen_like("qwen3_nothink", stop_words=("<|im_end|>",)),
    slot_template("llama2", user="{bos}[INST] {content} [/INST]", assistant="{content}{eos}",
                  system="<<SYS>>\n{content}\n<</SYS>>\n\n", fuse_system=True),
    slot_template("llama3", prefix="{bos}",
                  user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n",
                  generation="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
                  system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                  stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True),
    slot_template("mistral", prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}",
                  system="{content}\n\n", fuse_system=True),
)}

OPTIONS = ("default_system", "enable_thinking", "preserve_thinking")


def with_options(template: ChatTemplate, **options) -> ChatTemplate:
    """The template with LLaMA-Factory's data arguments of these names set (None keeps the template's own).

    enable_thinking and preserve_thinking only change reasoning templates, as in LLaMA-Factory.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown template option {unknown[0]!r}; options are {', '.join(OPTIONS)}")
    return dataclasses.replace(template, **{k: v for k, v in options.items() if v is not None})


def get_template(name: str, **options) -> ChatTemplate:
    """A named template, with `with_options` applied."""
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, TEMPLATES, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown template {name!r}.{hint} Known templates: {', '.join(sorted(TEMPLATES))}")
    return with_options(TEMPLATES[name], **options)
