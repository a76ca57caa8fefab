"""Named chat templates, as LLaMA-Factory users write them (`--template qwen`), expressed as Jinja.

A model's own chat template (tokenizer_config.json / GGUF) is used when no name is given.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    default_system: str = ""
    stop_words: tuple[str, ...] = field(default=())


_CHATML = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}System: {{ m['content'] }}{{ eos_token }}\n"
    "{%- elif m['role'] == 'user' %}Human: {{ m['content'] }}{{ eos_token }}\nAssistant:"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
)

_ALPACA = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
)

_LLAMA2 = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- for m in messages if m['role'] != 'system' %}"
    "{%- if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] }} [/INST]"
    "{%- else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)

_LLAMA3 = (
    "{{ bos_token }}{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "default": ChatTemplate("default", _DEFAULT),
    "chatml": ChatTemplate("chatml", _CHATML, stop_words=("<|im_end|>", "<|im_start|>")),
    "qwen": ChatTemplate("qwen", _CHATML, default_system="You are a helpful assistant.",
                         stop_words=("<|im_end|>",)),
    "llama2": ChatTemplate("llama2", _LLAMA2),
    "llama3": ChatTemplate("llama3", _LLAMA3, stop_words=("<|eot_id|>", "<|eom_id|>")),
    "alpaca": ChatTemplate("alpaca", _ALPACA,
                           default_system="Below is an instruction that describes a task. "
                                          "Write a response that appropriately completes the request.\n\n"),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, TEMPLATES, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown template {name!r}.{hint} Known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
