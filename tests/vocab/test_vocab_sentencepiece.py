"""The sentencepiece path (the seed's): a tiny random Llama whose tokenizer.model was trained on English with
byte fallback, as LLaMA's; the pieces learned on the Chinese corpus go into tokenizer.model and tokenizer.json."""
import io

import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.vocab import extend_vocabulary
from danlu.vocab.sentencepiece_model import append_pieces, read_model_proto
from tests.conftest import make_hf_model
from tests.vocab.conftest import ZH_CORPUS

ENGLISH = ["The weather is nice today, so we walk in the park after lunch.",
           "Cities grow quickly when people move there for work and study.",
           "Tea, rice and noodles are popular foods in many countries.",
           "Science explains how the world works, from atoms to galaxies."]


def train_sentencepiece(texts, size, **options) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=size,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **options)
    return model.getvalue()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, zh_lines):
    """LLaMA's layout in small: tokenizer.model beside the tokenizer.json transformers makes of it."""
    from transformers import LlamaTokenizer

    directory = tmp_path_factory.mktemp("sp-llama")
    (directory / "tokenizer.model").write_bytes(
        train_sentencepiece(ENGLISH * 30 + zh_lines[:4], 400, character_coverage=0.99))
    tokenizer = LlamaTokenizer.from_pretrained(directory)
    model = make_hf_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def extended(llama_dir, tmp_path_factory):
    report = extend_vocabulary(llama_dir, tmp_path_factory.mktemp("sp-out") / "model", corpus=ZH_CORPUS, size=2000)
    return report, load_pretrained(llama_dir, dtype="float32"), load_pretrained(report.output, dtype="float32")


def test_pieces_are_appended_to_tokenizer_model_after_the_old_ones(llama_dir, extended):
    import sentencepiece as spm

    report, before, after = extended
    old, new = read_model_proto(llama_dir / "tokenizer.model"), read_model_proto(report.output / "tokenizer.model")
    assert list(new.pieces)[:len(old.pieces)] == list(old.pieces)
    assert [p.piece for p in new.pieces][len(old.pieces):] == \
        after.tokenizer.convert_ids_to_tokens(report.added_ids)
    assert len(new.pieces) == len(after.tokenizer) == report.new_vocab_size == 400 + len(report.added)
    assert max(p.score for p in list(new.pieces)[400:]) < min(p.score for p in old.pieces)
    processor = spm.SentencePieceProcessor(model_proto=new.SerializeToString())
    # a word-initial piece is the whole of its text once sentencepiece prefixes the "▁"
    initial = [(p, i) for p, i in ((new.pieces[i].piece, i) for i in report.added_ids) if p.startswith("▁")]
    assert len(initial) > 30
    for piece, token_id in initial:
        assert processor.encode(piece[1:]) == [token_id], piece
        assert after.tokenizer(piece[1:], add_special_tokens=False)["input_ids"] == [token_id], piece


def test_sentencepiece_and_transformers_cut_the_corpus_alike(extended, zh_lines):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    report, _, _ = extended
    processor = spm.SentencePieceProcessor(model_file=str(report.output / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(report.output)
    texts = zh_lines + ENGLISH
    assert [processor.encode(t) for t in texts] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    print(f"\nsentencepiece path: {len(report.added)} pieces added, tokens per character "
          f"{report.tokens_per_char_before:.3f} -> {report.tokens_per_char_after:.3f}")
    assert report.tokens_per_char_after < 0.5 * report.tokens_per_char_before
    assert "天气" in report.added and tokenizer.tokenize("天气") in (["▁天气"], ["▁", "天气"])


def test_logits_and_rows(extended):
    report, before, after = extended
    ids = before.tokenizer("The weather is nice today. 今天天气很好。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(after.model(ids)[..., :400], before.model(ids))
    backend = before.tokenizer.backend_tokenizer.model
    for token_id in report.added_ids:
        piece = after.tokenizer.convert_ids_to_tokens(token_id)
        old_ids = [t.id for t in backend.tokenize(piece)]  # byte fallback for characters the old model lacks
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            old_rows, new_rows = before.model.state_dict()[name], after.model.state_dict()[name]
            assert torch.equal(new_rows[token_id], old_rows[old_ids].mean(0))


def test_appended_pieces_follow_the_tokenizers_added_tokens():
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(train_sentencepiece(ENGLISH * 10, 320))
    size = len(proto.pieces)
    append_pieces(proto, ["▁天气", "天"], {0: ("<unk>", True), size: ("<pad>", True), size + 1: ("<tool>", False)})
    assert [(p.piece, p.type) for p in list(proto.pieces)[size:]] == \
        [("<pad>", 3), ("<tool>", 4), ("▁天气", 1), ("天", 1)]
    with pytest.raises(ValueError, match="leave a gap before id"):
        append_pieces(proto, ["x"], {len(proto.pieces) + 1: ("<gap>", True)})


def test_too_small_a_size_for_sentencepiece(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--size 500: sentencepiece cannot learn .*zh_corpus.txt: Vocabulary size "
                                         r"is smaller than required_chars"):
        extend_vocabulary(llama_dir, tmp_path / "out", corpus=ZH_CORPUS, size=500)
