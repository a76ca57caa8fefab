"""Appending learned pieces to a BPE tokenizer.json as merges: tokenizers itself is the judge."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from danlu.vocab.bpe_merges import append_merges, bpe_split


def byte_level_bpe(texts, size) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def words(tokenizer: Tokenizer, texts):
    return [w for text in texts for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_bpe_split_is_what_tokenizers_does(zh_lines):
    old = byte_level_bpe(zh_lines[:200] + ["the weather is nice, isn't it?"] * 20, 600)
    model = json.loads(old.to_str())["model"]
    ranks = {tuple(m): rank for rank, m in enumerate(model["merges"])}
    checked = words(old, zh_lines + ["aaaa bbb the weather, 1234"])
    assert len(checked) > 300
    for word in checked:
        assert bpe_split(word, ranks) == [t.value for t in old.model.tokenize(word)], word


def test_appended_pieces_are_single_tokens_and_old_ids_stay(zh_lines):
    old = byte_level_bpe(zh_lines[:100], 400)
    learned = byte_level_bpe(zh_lines, 1500)
    spec = json.loads(old.to_str())
    old_vocab, old_merges = dict(spec["model"]["vocab"]), list(spec["model"]["merges"])
    pieces = [p for p in sorted(learned.get_vocab(), key=learned.get_vocab().get) if len(p) > 1]
    result = append_merges(spec["model"], pieces, first_id=len(old_vocab))
    extended = Tokenizer.from_str(json.dumps(spec))
    assert len(result.added) > 900 and not result.unreachable
    assert {p: i for p, i in spec["model"]["vocab"].items() if p in old_vocab} == old_vocab
    assert spec["model"]["merges"][:len(old_merges)] == old_merges
    for offset, piece in enumerate(result.added):
        assert [t.id for t in extended.model.tokenize(piece)] == [len(old_vocab) + offset]
    # and on whole text the new pieces are used: fewer tokens than before
    text = "".join(zh_lines)
    assert len(extended.encode(text).ids) < 0.6 * len(old.encode(text).ids)


def test_a_piece_no_single_merge_can_make_is_left_out():
    model = {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "d": 3, "bc": 4}, "merges": [["b", "c"]]}
    result = append_merges(model, ["ab", "abcd", "cd"], first_id=5)
    # "ab" then "abcd": the old merge b+c fires first, leaving a | bc | d
    assert result.added == ["ab", "cd"] and result.unreachable == ["abcd"]
    assert model["merges"] == [["b", "c"], ["a", "b"], ["c", "d"]] and model["vocab"]["cd"] == 6


def test_single_characters_become_base_symbols_first():
    model = {"type": "BPE", "vocab": {"<0xE5>": 0, "▁": 1}, "merges": [], "byte_fallback": True}
    result = append_merges(model, ["▁天", "天", "▁"], first_id=2)
    assert result.added == ["天", "▁天"] and model["merges"] == [["▁", "天"]]


def test_merges_written_as_strings_stay_strings():
    model = {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}
    model["vocab"]["ab"] = 2
    append_merges(model, ["abb"], first_id=3)
    assert model["merges"] == ["a b", "ab b"]


@pytest.mark.parametrize("model, message", [
    ({"type": "WordPiece", "vocab": {}}, "needs a BPE tokenizer"),
    ({"type": "BPE", "vocab": {}, "merges": [], "continuing_subword_prefix": "##"}, "continuing_subword_prefix"),
])
def test_other_tokenizer_models_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        append_merges(model, ["ab"], first_id=0)


def test_added_tokens_outside_the_vocabulary_keep_their_ids():
    from tests.conftest import byte_tokenizer

    from danlu.vocab.bpe_merges import pin_added_tokens

    spec = json.loads(byte_tokenizer().backend_tokenizer.to_str())  # 256 bytes, then 3 added tokens
    pin_added_tokens(spec)
    append_merges(spec["model"], ["ab", "abc"], first_id=259)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>", "ab", "abc")] == \
        [256, 257, 258, 259, 260]
    assert tokenizer.encode("abc<|im_end|>").ids == [260, 257]
