"""Named templates render, cut into pieces, and SFT-label each answer exactly as LLaMA-Factory does.

The expected values are written out from LLaMA-Factory's definitions (src/llamafactory/data/template.py:
register_template(name=...) for each entry, and its Template / Llama2Template / ReasoningTemplate classes).
Each entry is what LLaMA-Factory's encode_multiturn encodes for MESSAGES: per turn a (prompt, answer) pair of
element lists. Template._convert_elements_to_ids encodes each element on its own ({"bos_token"} and
{"eos_token"} are elements of their own), and the answer is the part trained on. `<s>` / `</s>` stand for the
tokenizer's bos / eos.
"""
import copy

import pytest

from danlu.data.formats import Example
from danlu.data.supervised import IGNORE_INDEX, tokenize_example
from danlu.tokenization.chat import encode_chat, render_chat, render_pieces, resolve_template, stop_words
from danlu.tokenization.templates import TEMPLATES, get_template

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am danlu."}]
SYSTEM = "Be brief."
IM_SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"  # format_system of LF's chatml / qwen / qwen3 / qwen3_nothink
IM_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # their format_user
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"  # LF's ReasoningTemplate.add_thought() with the default thought_words
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
L3 = "<|start_header_id|>{}<|end_header_id|>\n\n"
L3_USER = L3.format("user") + "{}<|eot_id|>" + L3.format("assistant")

# With system=SYSTEM: [(prompt 1, answer 1), (prompt 2, answer 2)], each a list of LF's elements.
WITH_SYSTEM = {
    # register_template(name="default")
    "default": [(["System: Be brief.", "</s>", "\n", "Human: Hi", "</s>", "\nAssistant:"], ["Hello", "</s>", "\n"]),
                (["Human: Who are you?", "</s>", "\nAssistant:"], ["I am danlu.", "</s>", "\n"])],
    # register_template(name="alpaca"): format_system is the bare content
    "alpaca": [(["Be brief.", "### Instruction:\nHi\n\n### Response:\n"], ["Hello", "</s>", "\n\n"]),
               (["### Instruction:\nWho are you?\n\n### Response:\n"], ["I am danlu.", "</s>", "\n\n"])],
    # register_template(name="chatml")
    "chatml": [([IM_SYSTEM.format(SYSTEM), IM_USER.format("Hi")], ["Hello<|im_end|>\n"]),
               ([IM_USER.format("Who are you?")], ["I am danlu.<|im_end|>\n"])],
    # register_template(name="qwen")
    "qwen": [([IM_SYSTEM.format(SYSTEM), IM_USER.format("Hi")], ["Hello<|im_end|>\n"]),
             ([IM_USER.format("Who are you?")], ["I am danlu.<|im_end|>\n"])],
    # register_template(name="qwen3", template_class=ReasoningTemplate); with enable_thinking=True (LF's default)
    # encode_multiturn puts the empty thought's ids before each answer that has no thought, and trains on them
    "qwen3": [([IM_SYSTEM.format(SYSTEM), IM_USER.format("Hi")], [EMPTY_THOUGHT, "Hello<|im_end|>\n"]),
              ([IM_USER.format("Who are you?")], [EMPTY_THOUGHT, "I am danlu.<|im_end|>\n"])],
    # register_template(name="qwen3_nothink"): a plain Template, no thought at all
    "qwen3_nothink": [([IM_SYSTEM.format(SYSTEM), IM_USER.format("Hi")], ["Hello<|im_end|>\n"]),
                      ([IM_USER.format("Who are you?")], ["I am danlu.<|im_end|>\n"])],
    # register_template(name="llama2", template_class=Llama2Template): the system goes inside the first user
    # message; format_assistant is the default ["{{content}}", {"eos_token"}]
    "llama2": [(["<s>", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"], ["Hello", "</s>"]),
               (["<s>", "[INST] Who are you? [/INST]"], ["I am danlu.", "</s>"])],
    # register_template(name="llama3"): format_prefix is the bos token
    "llama3": [(["<s>", L3.format("system") + "Be brief.<|eot_id|>", L3_USER.format("Hi")], ["Hello<|eot_id|>"]),
               ([L3_USER.format("Who are you?")], ["I am danlu.<|eot_id|>"])],
    # register_template(name="mistral", template_class=Llama2Template)
    "mistral": [(["<s>", "[INST] Be brief.\n\nHi[/INST]"], [" Hello", "</s>"]),
                (["[INST] Who are you?[/INST]"], [" I am danlu.", "</s>"])],
}

# Without a system prompt only the first prompt changes: LF uses default_system (empty for most).
FIRST_PROMPT_WITHOUT_SYSTEM = {
    "default": ["Human: Hi", "</s>", "\nAssistant:"],
    "alpaca": [ALPACA_SYSTEM, "### Instruction:\nHi\n\n### Response:\n"],
    "chatml": [IM_USER.format("Hi")],
    "qwen": [IM_SYSTEM.format(QWEN_SYSTEM), IM_USER.format("Hi")],
    "qwen3": [IM_USER.format("Hi")],
    "qwen3_nothink": [IM_USER.format("Hi")],
    "llama2": ["<s>", "[INST] Hi [/INST]"],
    "llama3": ["<s>", L3_USER.format("Hi")],
    "mistral": ["<s>", "[INST] Hi[/INST]"],
}

# LF's stop_words and replace_eos (the tokenizer's eos becomes stop_words[0]).
STOPS = {"default": ((), False), "alpaca": ((), False), "chatml": (("<|im_end|>", "<|im_start|>"), True),
         "qwen": (("<|im_end|>",), True), "qwen3": (("<|im_end|>",), True), "qwen3_nothink": (("<|im_end|>",), True),
         "llama2": ((), False), "llama3": (("<|eot_id|>", "<|eom_id|>"), True), "mistral": ((), False)}


def lf_pairs(name, system):
    pairs = list(WITH_SYSTEM[name])
    if system is None:
        pairs[0] = (FIRST_PROMPT_WITHOUT_SYSTEM[name], pairs[0][1])
    return pairs


def flat(pairs):
    return [element for prompt, answer in pairs for element in prompt + answer]


def with_tokens(tokenizer, elements):
    return [e.replace("<s>", tokenizer.bos_token).replace("</s>", tokenizer.eos_token) for e in elements]


def lf_ids_and_labels(tokenizer, pairs):
    """LF's supervised processor: each element encoded on its own, prompt ids masked, answer ids learned."""
    def encode(elements):
        elements = with_tokens(tokenizer, elements)
        return [t for e in elements for t in tokenizer(e, add_special_tokens=False)["input_ids"]]

    ids, labels = [], []
    for prompt, answer in pairs:
        ids += encode(prompt) + encode(answer)
        labels += [IGNORE_INDEX] * len(encode(prompt)) + encode(answer)
    return ids, labels


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("name", WITH_SYSTEM)
def test_conversation_renders_as_llamafactory(char_tokenizer, name, system):
    pieces = render_pieces(char_tokenizer, MESSAGES, name, system, add_generation_prompt=False, for_training=True)
    assert pieces == flat(lf_pairs(name, system))
    assert render_chat(char_tokenizer, MESSAGES, name, system, False, for_training=True) == "".join(pieces)


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("name", [n for n in WITH_SYSTEM if n != "qwen3"])
def test_generation_prompt_is_llamafactory_oneturn_prompt(char_tokenizer, name, system):
    """LF's chat: encode_oneturn(messages + [empty assistant]) -> its prompt ids."""
    (prompt1, answer1), (prompt2, _) = lf_pairs(name, system)
    assert render_pieces(char_tokenizer, MESSAGES[:3], name, system) == prompt1 + answer1 + prompt2


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("name", WITH_SYSTEM)
def test_sft_labels_are_llamafactory_answers(char_tokenizer, name, system):
    tokens = tokenize_example(char_tokenizer, Example(MESSAGES, system), name, cutoff_len=4096)
    assert (tokens.input_ids, tokens.labels) == lf_ids_and_labels(char_tokenizer, lf_pairs(name, system))


@pytest.mark.real
@pytest.mark.parametrize("name", WITH_SYSTEM)
def test_ids_with_a_real_tokenizer(real_tokenizer, name):
    """SmolLM2's byte-level BPE joins across boundaries ("\\n\\n" + "###"): each element must be encoded alone."""
    pairs = lf_pairs(name, None)
    tokens = tokenize_example(real_tokenizer, Example(MESSAGES), name, cutoff_len=4096)
    assert (tokens.input_ids, tokens.labels) == lf_ids_and_labels(real_tokenizer, pairs)
    learned = real_tokenizer.decode([t for t in tokens.labels if t != IGNORE_INDEX])
    assert learned == "".join(with_tokens(real_tokenizer, [e for _, answer in pairs for e in answer]))
    prompt_ids, _ = lf_ids_and_labels(real_tokenizer, [(pairs[0][0] + pairs[0][1] + pairs[1][0], [])])
    if name != "qwen3":
        assert encode_chat(real_tokenizer, MESSAGES[:3], name) == prompt_ids


THOUGHTFUL = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello"},
              {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am danlu."}]


def test_qwen3_generation_prompt_drops_earlier_thoughts(char_tokenizer):
    # ReasoningTemplate.encode_oneturn: earlier answers lose their thoughts (preserve_thinking=False) and get no
    # empty one; with enable_thinking=False the empty thought's ids end the prompt.
    history = [IM_USER.format("Hi"), "Hello<|im_end|>\n", IM_USER.format("Who are you?")]
    assert render_pieces(char_tokenizer, THOUGHTFUL[:3], "qwen3") == history
    no_thinking = get_template("qwen3", enable_thinking=False)
    assert render_pieces(char_tokenizer, THOUGHTFUL[:3], no_thinking) == history + [EMPTY_THOUGHT]
    preserve = get_template("qwen3", preserve_thinking=True)
    kept = render_pieces(char_tokenizer, THOUGHTFUL[:3], preserve)[1]
    assert kept == "<think>\nGreet.\n</think>\n\nHello<|im_end|>\n"


@pytest.mark.parametrize("enable_thinking,pairs", [
    # encode_multiturn, enable_thinking=True: thoughts kept and trained; an answer without one gets the empty one
    (True, [([IM_USER.format("Hi")], ["<think>\nGreet.\n</think>\n\nHello<|im_end|>\n"]),
            ([IM_USER.format("Who are you?")], [EMPTY_THOUGHT, "I am danlu.<|im_end|>\n"])]),
    # enable_thinking=False: every thought removed, the empty thought ends each prompt and is not trained
    (False, [([IM_USER.format("Hi"), EMPTY_THOUGHT], ["Hello<|im_end|>\n"]),
             ([IM_USER.format("Who are you?"), EMPTY_THOUGHT], ["I am danlu.<|im_end|>\n"])]),
])
def test_qwen3_training_thoughts(char_tokenizer, enable_thinking, pairs):
    template = get_template("qwen3", enable_thinking=enable_thinking)
    tokens = tokenize_example(char_tokenizer, Example(THOUGHTFUL), template, cutoff_len=4096)
    assert (tokens.input_ids, tokens.labels) == lf_ids_and_labels(char_tokenizer, pairs)


def test_qwen3_thought_marker_that_cannot_be_removed(char_tokenizer):
    """LF would train such an answer with no empty thought in the prompt; danlu says so instead."""
    odd = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>x</think>Hello"}]
    with pytest.raises(ValueError, match="enable_thinking is off but an answer has a thought marker"):
        tokenize_example(char_tokenizer, Example(odd), get_template("qwen3", enable_thinking=False), 4096)


def test_qwen3_nothink_ignores_thinking_options(char_tokenizer):
    template = get_template("qwen3_nothink", enable_thinking=False)
    pieces = render_pieces(char_tokenizer, MESSAGES, template, add_generation_prompt=False, for_training=True)
    assert pieces == flat(lf_pairs("qwen3_nothink", None))


@pytest.mark.parametrize("name", STOPS)
def test_stop_words_and_replace_eos(name):
    words, replace_eos = STOPS[name]
    assert (get_template(name).stop_words, get_template(name).replace_eos) == (words, replace_eos)
    assert stop_words(None, name) == list(words)


def test_every_template_is_checked_and_named_in_errors():
    assert set(TEMPLATES) == set(WITH_SYSTEM)
    with pytest.raises(ValueError) as error:
        get_template("qwen4")
    assert "Did you mean qwen" in str(error.value)
    for name in ("qwen3", "qwen3_nothink", "llama3", "mistral", "chatml", "llama2", "alpaca", "default"):
        assert name in str(error.value)


def test_template_options():
    assert get_template("qwen", default_system="You are danlu.").default_system == "You are danlu."
    assert get_template("qwen", default_system=None).default_system == QWEN_SYSTEM
    with pytest.raises(ValueError, match="unknown template option 'thinking'; options are default_system"):
        get_template("qwen3", thinking=False)


def test_options_reach_a_models_own_template(plain_tokenizer):
    tokenizer = copy.deepcopy(plain_tokenizer)
    tokenizer.chat_template = ("{{ messages[0]['content'] }}:{% if enable_thinking is defined and enable_thinking "
                               "is false %}off{% else %}on{% endif %}")
    template = resolve_template(tokenizer, enable_thinking=False, default_system="S")
    assert render_pieces(tokenizer, MESSAGES[:1], template) == ["S:off"]
    assert render_chat(tokenizer, MESSAGES[:1]) == "Hi:on"


def test_empty_system_means_the_default_and_system_only_first(char_tokenizer):
    assert render_chat(char_tokenizer, MESSAGES[:1], "qwen", system="").startswith(IM_SYSTEM.format(QWEN_SYSTEM))
    leading = [{"role": "system", "content": SYSTEM}] + MESSAGES[:1]
    assert render_chat(char_tokenizer, leading, "llama2") == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    with pytest.raises(ValueError, match=r"messages\[1\]: a system message may only come first"):
        render_chat(char_tokenizer, MESSAGES[:1] + [{"role": "system", "content": "x"}], "qwen")
    with pytest.raises(ValueError, match=r"messages\[0\].content holds U\+FDD0"):
        render_chat(char_tokenizer, [{"role": "user", "content": "a\ufdd0b"}], "qwen")
    with pytest.raises(ValueError, match="the system prompt holds U\\+FDD0"):
        render_chat(char_tokenizer, MESSAGES[:1], "qwen", system="\ufdd0")
