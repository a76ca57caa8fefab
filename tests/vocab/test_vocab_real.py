"""The seed's recipe on the real SmolLM2-135M-Instruct: learn Chinese merges on the bundled corpus, extend the
byte-level BPE and the (tied) embedding, continue pretraining, load the result in transformers."""

import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.vocab import extend_vocabulary
from tests.vocab.conftest import ZH_CORPUS, continue_pretraining

pytestmark = pytest.mark.real
OLD_VOCAB = 49152


@pytest.fixture(scope="module")
def real_extended(real_gguf, tmp_path_factory):
    report = extend_vocabulary(real_gguf, tmp_path_factory.mktemp("real-zh") / "model", corpus=ZH_CORPUS, size=2000)
    return report, load_pretrained(report.output, dtype="float32", device="cpu")


def test_old_logits_are_unchanged_and_new_rows_are_means(real_lm, real_extended):
    report, after = real_extended
    ids = real_lm.tokenizer("The weather in Beijing is nice today. 今天北京的天气很好。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(after.model(ids)[..., :OLD_VOCAB], real_lm.model(ids))
    assert after.config.tie_word_embeddings and after.model.lm_head.weight is after.model.model.embed_tokens.weight
    old_rows, new_rows = real_lm.model.model.embed_tokens.weight, after.model.model.embed_tokens.weight
    old_model = real_lm.tokenizer.backend_tokenizer.model
    for token_id in report.added_ids:
        old_ids = [t.id for t in old_model.tokenize(after.tokenizer.convert_ids_to_tokens(token_id))]
        assert torch.equal(new_rows[token_id], old_rows[old_ids].mean(0))


def test_tokens_per_character_falls(real_extended):
    report, _ = real_extended
    print(f"\nSmolLM2 + 2000 pieces learned on zh_corpus: {len(report.added)} tokens added "
          f"({report.skipped_known} already known, {report.unreachable} unreachable), vocabulary "
          f"{report.old_vocab_size} -> {report.new_vocab_size}, tokens per character "
          f"{report.tokens_per_char_before:.3f} -> {report.tokens_per_char_after:.3f}")
    assert report.old_vocab_size == OLD_VOCAB and report.unreachable == 0 and len(report.added) > 1000
    assert report.tokens_per_char_before > 1.5 and report.tokens_per_char_after < 0.5 * report.tokens_per_char_before


def test_continued_pretraining_then_transformers_loads_it(real_extended, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))  # the token cache
    report, _ = real_extended
    out = tmp_path / "pt"
    losses = continue_pretraining(report.output, out, cutoff_len=16, batch_size=1, learning_rate="1e-4")
    print(f"\nSmolLM2 extended, 20 steps of continued pretraining: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    tokenizer = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.vocab_size == len(tokenizer) == report.new_vocab_size
    words = {text: i for text, i in zip(report.added, report.added_ids) if text in ("天气", "北京", "今天", "城市")}
    assert len(words) == 4
    for text, token_id in words.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
