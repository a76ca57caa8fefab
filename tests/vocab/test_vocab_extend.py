"""extend_vocabulary on a tiny untied Llama with a bytes-only tokenizer: learned merges and listed tokens."""
import json

import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.vocab import extend_vocabulary
from tests.vocab.conftest import ZH_CORPUS, continue_pretraining

OLD_VOCAB = 259  # 256 bytes and 3 special tokens


@pytest.fixture(scope="module")
def learned(byte_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "model"
    report = extend_vocabulary(byte_model_dir, out, corpus=ZH_CORPUS, size=700)
    return report, load_pretrained(byte_model_dir, dtype="float32"), load_pretrained(out, dtype="float32")


def test_logits_of_old_tokens_are_unchanged(learned):
    _, before, after = learned
    torch.manual_seed(0)
    ids = torch.randint(0, OLD_VOCAB, (2, 120))
    with torch.no_grad():
        old_logits, new_logits = before.model(ids), after.model(ids)
    assert new_logits.shape[-1] == after.config.vocab_size > OLD_VOCAB
    assert torch.equal(new_logits[..., :OLD_VOCAB], old_logits)


def test_new_rows_are_the_mean_of_their_bytes(learned):
    report, before, after = learned
    assert report.added_ids == list(range(OLD_VOCAB, OLD_VOCAB + len(report.added)))
    old_embedding, old_head = before.model.model.embed_tokens.weight, before.model.lm_head.weight
    for token_id in report.added_ids:
        # the old tokenizer knows bytes only: a piece's old ids are its byte-level characters
        old_ids = before.tokenizer.convert_tokens_to_ids(list(after.tokenizer.convert_ids_to_tokens(token_id)))
        assert torch.equal(after.model.model.embed_tokens.weight[token_id], old_embedding[old_ids].mean(0))
        assert torch.equal(after.model.lm_head.weight[token_id], old_head[old_ids].mean(0))


def test_report_and_tokens_per_character(learned):
    report, before, after = learned
    print(f"\ntiny byte-level model: {len(report.added)} tokens added, tokens per character "
          f"{report.tokens_per_char_before:.3f} -> {report.tokens_per_char_after:.3f}")
    assert report.old_vocab_size == OLD_VOCAB and report.new_vocab_size == OLD_VOCAB + len(report.added)
    assert report.unreachable == 0 and report.skipped_duplicates == 0
    assert report.tokens_per_char_before > 2.5  # three bytes a character, less the ASCII punctuation
    assert report.tokens_per_char_after < 0.5 * report.tokens_per_char_before
    assert "天气" in report.added
    assert json.loads((report.output / "config.json").read_text())["vocab_size"] == report.new_vocab_size


def test_transformers_loads_it_and_new_tokens_are_one_id_each(learned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report, _, after = learned
    tokenizer = AutoTokenizer.from_pretrained(report.output)
    whole = [(text, i) for text, i in zip(report.added, report.added_ids) if "\ufffd" not in text]
    assert len(whole) > 200
    for text, token_id in whole:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id], text
    hf = AutoModelForCausalLM.from_pretrained(report.output, dtype=torch.float32).eval()
    ids = tokenizer("今天的天气很好，我们去公园散步吧。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - after.model(ids)).abs().max() < 1e-4


def test_continued_pretraining_runs_on_the_extended_model(learned, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))  # the token cache
    report = learned[0]
    out = tmp_path / "pt"
    losses = continue_pretraining(report.output, out, cutoff_len=64, batch_size=4, learning_rate="3e-3")
    print(f"\ntiny model, 20 steps of continued pretraining: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 20 and losses[-1] < losses[0]
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.vocab_size == report.new_vocab_size


def test_listed_tokens_are_added_tokens(byte_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("天气\n\n北京\n  天气  \na\n<|im_end|>\n人工智能\n", encoding="utf-8")
    report = extend_vocabulary(byte_model_dir, tmp_path / "out", add_tokens=tokens, eval_text=ZH_CORPUS,
                               pad_to_multiple_of=64)
    assert report.added == ["天气", "北京", "人工智能"] and report.added_ids == [259, 260, 261]
    assert (report.skipped_duplicates, report.skipped_known) == (1, 2)  # 天气 again; "a" and <|im_end|>: one token
    assert report.new_vocab_size == 320 and report.tokens_per_char_after < report.tokens_per_char_before
    before, after = load_pretrained(byte_model_dir, dtype="float32"), load_pretrained(report.output, dtype="float32")
    old_embedding = before.model.model.embed_tokens.weight
    for text, token_id in zip(report.added, report.added_ids):
        old_ids = before.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(old_ids) == 3 * len(text)
        assert torch.equal(after.model.model.embed_tokens.weight[token_id], old_embedding[old_ids].mean(0))
    padding = after.model.model.embed_tokens.weight[262:]
    assert padding.shape[0] == 58 and torch.equal(padding, old_embedding.mean(0).expand_as(padding))
    tokenizer = AutoTokenizer.from_pretrained(report.output)
    assert len(tokenizer) == 262
    assert tokenizer("北京的天气", add_special_tokens=False)["input_ids"] == [260, *old_ids_of(before, "的"), 259]


def old_ids_of(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_bfloat16_model_stays_bfloat16(byte_model_dir, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("天气\n", encoding="utf-8")
    report = extend_vocabulary(byte_model_dir, tmp_path / "out", add_tokens=tokens, dtype="bfloat16")
    assert json.loads((report.output / "config.json").read_text())["torch_dtype"] == "bfloat16"
    before, after = load_pretrained(byte_model_dir, dtype="bfloat16"), load_pretrained(report.output, dtype="bfloat16")
    old, new = before.model.model.embed_tokens.weight, after.model.model.embed_tokens.weight
    assert new.dtype == torch.bfloat16 and torch.equal(new[:OLD_VOCAB], old)
    assert torch.equal(new[259], old[old_ids_of(before, "天气")].float().mean(0).bfloat16())
