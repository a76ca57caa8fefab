"""Named templates render as LLaMA-Factory writes them; the model's own template is the default."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from danlu.tokenization.chat import encode_chat, render_chat, resolve_template, stop_words, validate_messages


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A byte-level tokenizer with no chat template of its own."""
    vocab = {chr(i): i for i in range(32, 127)} | {"<s>": 1, "</s>": 2, "<unk>": 0, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Who?"}]

EXPECTED = {
    "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
              "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] Hi [/INST] Hello </s><s>[INST] Who? [/INST]",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nWho?\n\n"
              "### Response:\n",
    "default": "Human: Hi</s>\nAssistant:Hello</s>\nHuman: Who?</s>\nAssistant:",
}


@pytest.mark.parametrize("name", EXPECTED)
def test_named_templates(plain_tokenizer, name):
    assert render_chat(plain_tokenizer, CONVERSATION, template=name) == EXPECTED[name]


def test_llama2_system_goes_inside_first_instruction(plain_tokenizer):
    text = render_chat(plain_tokenizer, CONVERSATION[:1], template="llama2", system="Be brief.")
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


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
