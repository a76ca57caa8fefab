"""Vocabulary extension fixtures: the bundled Chinese corpus and a tiny untied Llama with a byte-level tokenizer."""
from pathlib import Path

import pytest

from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model

DATA = Path(__file__).resolve().parents[2] / "data"
ZH_CORPUS = DATA / "zh_corpus.txt"


def continue_pretraining(model_dir: Path, out: Path, cutoff_len: int, batch_size: int,
                         learning_rate: str) -> list[float]:
    """20 steps of full `danlu train --stage pt` on zh_corpus from `model_dir`; the logged losses."""
    import json

    from danlu.cli.main import main

    assert main(["train", "--stage", "pt", "--model_name_or_path", str(model_dir), "--dataset", "zh_corpus",
                 "--dataset_dir", str(ZH_CORPUS.parent), "--cutoff_len", str(cutoff_len), "--max_steps", "20",
                 "--per_device_train_batch_size", str(batch_size), "--learning_rate", learning_rate,
                 "--logging_steps", "1", "--finetuning_type", "full", "--output_dir", str(out)]) == 0
    return [r["loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]


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
