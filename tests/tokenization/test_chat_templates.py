"""Resolving a template (the model's own is the default), system prompts and message validation."""
import pytest

from danlu.tokenization.chat import encode_chat, render_chat, resolve_template, stop_words, validate_messages

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Who?"}]
# Each named template against LLaMA-Factory: test_template_parity.py


def test_system_prompt_replaces_the_default(plain_tokenizer):
    text = render_chat(plain_tokenizer, CONVERSATION[:1], template="qwen", system="You are danlu.")
    assert text.startswith("<|im_start|>system\nYou are danlu.<|im_end|>\n") and "helpful" not in text


def test_model_template_is_used_when_none_named(real_tokenizer):
    text = render_chat(real_tokenizer, [{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_chat(real_tokenizer, [{"role": "user", "content": "Hi"}])
    assert ids == real_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                     add_generation_prompt=True, return_dict=False)


def test_without_any_template_default_is_used(plain_tokenizer):
    assert resolve_template(plain_tokenizer).name == "default"
    assert stop_words(plain_tokenizer, "qwen") == ["<|im_end|>"]


def test_unknown_template_suggests():
    with pytest.raises(ValueError, match="Did you mean qwen"):
        resolve_template(None, "qwne")


@pytest.mark.parametrize("messages,message", [
    ([], "messages is empty"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role must be one of"),
    ([{"role": "user"}], r"messages\[0\] must be an object with 'role' and 'content'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
])
def test_bad_messages(messages, message):
    with pytest.raises(ValueError, match=message):
        validate_messages(messages)
