"""Shared fixtures: tiny random Hugging Face checkpoints for unit tests, the real model for `real` tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch



def make_hf_model(family: str, **overrides):
    """A tiny random transformers model of a family, with values that exercise its switches."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = model_class(config_class(**common)).eval()
    with torch.no_grad():  # nonzero biases and norm weights so that a dropped one shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(merges: tuple[tuple[str, str], ...] = ()):
    """A byte-level tokenizer with ChatML's special tokens and chat template: real text, no download. Each merge
    adds its joined piece to the vocabulary after the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + ["".join(pair) for pair in merges])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def save_hf_model(model, directory: Path, tokenizer=None) -> Path:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    from danlu.checkpoints.bundled import ensure_bundled_model

    return ensure_bundled_model()


@pytest.fixture(scope="session")
def real_lm(real_gguf):
    from danlu.checkpoints.load import load_pretrained

    return load_pretrained(real_gguf, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_real(real_gguf):
    """transformers' own reading of the same GGUF: the reference for parity."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_tokenizer(real_gguf):
    from danlu.checkpoints.bundled import danlu_home
    from danlu.checkpoints.gguf import gguf_tokenizer

    return gguf_tokenizer(real_gguf, danlu_home() / "gguf-cache")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, real_tokenizer) -> Path:
    """A tiny random Llama with the real model's tokenizer and chat template: fast CLI tests with real text."""
    model = make_hf_model("llama", vocab_size=len(real_tokenizer), bos_token_id=1, eos_token_id=2,
                          pad_token_id=2, tie_word_embeddings=True)
    return save_hf_model(model, tmp_path_factory.mktemp("tiny-chat"), real_tokenizer)


def pytest_collection_modifyitems(config, items):
    # A real test collected without the marker would hide a slow test among the fast ones.
    for item in items:
        uses_real = {"real_gguf", "real_lm", "hf_real", "real_tokenizer", "tiny_chat_dir"} & set(item.fixturenames)
        if uses_real and "real" not in item.keywords:
            item.add_marker(pytest.mark.real)
