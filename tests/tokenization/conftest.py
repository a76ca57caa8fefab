"""Offline tokenizers for template tests: one token per character, so no merge hides a wrong boundary."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<think>",
           "</think>"]


def char_level_tokenizer(markers=()):
    vocab = {chr(i): i for i in range(32, 127)} | {"<s>": 1, "</s>": 2, "<unk>": 0, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.add_tokens(list(markers), special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A character-level tokenizer with no chat template of its own."""
    return char_level_tokenizer()


@pytest.fixture(scope="module")
def char_tokenizer():
    """The same, with the named templates' markers (<|im_start|>, <|eot_id|>, <think>, ...) as whole tokens."""
    return char_level_tokenizer(MARKERS)
