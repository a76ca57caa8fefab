"""Vocabulary extension fixtures: the bundled Chinese corpus and a tiny untied Llama with a byte-level tokenizer."""
from pathlib import Path

import pytest

from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model

DATA = Path(__file__).resolve().parents[2] / "data"
ZH_CORPUS = DATA / "zh_corpus.txt"


@pytest.fixture(scope="session")
def zh_lines() -> list[str]:
    from danlu.vocab.text_files import read_corpus

    return read_corpus(ZH_CORPUS)


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama, lm_head untied, whose tokenizer knows bytes only (no merges): every Chinese
    character is three tokens, so any learned piece is new."""
    tokenizer = byte_tokenizer()
    special = tokenizer.convert_tokens_to_ids
    model = make_hf_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=False,
                          bos_token_id=special("<|endoftext|>"), eos_token_id=special("<|im_end|>"),
                          pad_token_id=special("<|endoftext|>"))
    return save_hf_model(model, tmp_path_factory.mktemp("byte-llama"), tokenizer)
