"""The shipped distillation data (data/README.md): the counts and rules it documents, and that it loads
through danlu's own data paths."""
import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest

from danlu.data.files import read_records
from danlu.data.formats import find_spec, load_dataset_info, to_example
from danlu.data.pretrain import prepare_pretrain_data
from danlu.evaluation.classification import read_labelled
from danlu.evaluation.embeddings import distillation_sentences, read_text_lines, split_sentences
from tests.conftest import byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
TEXT, TOPICS, HELD_OUT = DATA / "danlu_text.jsonl", DATA / "danlu_topics.jsonl", DATA / "danlu_sentences_heldout.jsonl"
LABELS = ["food", "science", "sports", "technology"]


def normal(s: str) -> str:
    return " ".join(s.lower().split())


def words(s: str) -> set:
    return set(re.findall(r"[a-z0-9']+", s.lower()))


def corpus_sentences() -> list[str]:
    return [s for p in read_text_lines(TEXT) for s in split_sentences(p)]


def test_corpus_paragraphs():
    paragraphs = read_text_lines(TEXT)
    assert len(paragraphs) == 250
    assert all(60 <= len(p.split()) <= 150 for p in paragraphs)
    assert len({normal(p) for p in paragraphs}) == 250
    assert all(not p.lstrip().startswith(("#", "-", "*")) and "\n" not in p for p in paragraphs)  # prose only


def test_corpus_sentences_are_whole_sentences():
    sentences = corpus_sentences()
    assert len(sentences) > 900
    # split_sentences has no abbreviation list: a fragment such as "Dr." or "e.g." would show up here
    assert all(len(s.split()) >= 4 and s[0].isupper() and s.endswith((".", "!", "?")) for s in sentences)


def test_topics_counts_and_split():
    texts, labels, names = read_labelled(TOPICS, None)
    assert names == LABELS
    assert len(texts) == 480 and Counter(labels) == {label: 120 for label in LABELS}
    splits = read_text_lines(TOPICS, field="split")
    assert set(splits) == {"train", "test"}
    assert Counter(zip(labels, splits)) == {(label, s): n for label in LABELS for s, n in (("train", 90), ("test", 30))}
    assert all(8 <= len(t.split()) <= 30 for t in texts)
    assert len({normal(t) for t in texts}) == 480


def test_topics_split_is_the_scripts_rule():
    spec = importlib.util.spec_from_file_location("make_topic_split", REPO / "scripts" / "make_topic_split.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [r.data for r in read_records(TOPICS)]
    assert [r["split"] for r in rows] == script.split_of(rows, script.SEED, script.TEST_FRACTION)
    assert script.main([str(TOPICS), "--check"]) == 0
    # order-independent: the same rule on the lines reversed gives each line the same split
    assert script.split_of(rows[::-1]) == [r["split"] for r in rows[::-1]]


def test_no_test_sentence_in_train_nor_a_near_copy():
    train, test = read_text_lines(TOPICS, split="train"), read_text_lines(TOPICS, split="test")
    assert not {normal(t) for t in train} & {normal(t) for t in test}
    train_words = [words(t) for t in train]
    for sentence in test:  # no test sentence is a train sentence with a word or two changed
        w = words(sentence)
        assert max(len(w & v) / len(w | v) for v in train_words) < 0.5, sentence


def test_held_out_sentences():
    rows = [r.data for r in read_records(HELD_OUT)]
    assert len(rows) == 100
    pairs = Counter(r["pair"] for r in rows if "pair" in r)
    assert len(pairs) == 40 and set(pairs.values()) == {2}
    assert sum("pair" not in r for r in rows) == 20
    texts = read_text_lines(HELD_OUT)
    assert len({normal(t) for t in texts}) == 100
    for k in pairs:  # a paraphrase pair is two different sentences
        a, b = (r["text"] for r in rows if r.get("pair") == k)
        assert normal(a) != normal(b)


def test_sentence_sets_are_disjoint():
    train, held_out = distillation_sentences(DATA)
    assert len(held_out) == 120 + 100 and len(train) == len(corpus_sentences()) + 360
    assert not {normal(s) for s in train} & {normal(s) for s in held_out}
    topics = {normal(t) for t in read_text_lines(TOPICS)}
    assert not topics & {normal(s) for s in corpus_sentences()}


def test_registered_in_dataset_info():
    specs = load_dataset_info(DATA)
    assert (specs["danlu_text"].file_name, specs["danlu_text"].columns) == ("danlu_text.jsonl", {"prompt": "text"})
    topics = specs["danlu_topics"]
    assert (topics.file_name, topics.formatting, topics.columns) == \
        ("danlu_topics.jsonl", "alpaca", {"prompt": "text", "response": "label"})
    assert "danlu_sentences_heldout" not in specs  # held out: not offered for training


def test_topics_read_as_sft_examples():
    spec = find_spec(load_dataset_info(DATA), "danlu_topics", DATA)
    records = read_records(DATA / spec.file_name)
    examples = [to_example(r, spec) for r in records]
    assert len(examples) == 480
    first = examples[0]
    assert first.messages == [{"role": "user", "content": records[0].data["text"]},
                              {"role": "assistant", "content": records[0].data["label"]}]
    assert {e.messages[1]["content"] for e in examples} == set(LABELS)


def test_corpus_loads_through_the_pretraining_path(tmp_path):
    tokenizer = byte_tokenizer()
    train, held_out = prepare_pretrain_data(tokenizer, str(DATA), ["danlu_text"], cutoff_len=256,
                                            cache_dir=tmp_path, val_size=0.1)
    # one token per UTF-8 byte, and an end-of-text after each paragraph
    paragraphs = read_text_lines(TEXT)
    total = sum(len(p.encode("utf-8")) + 1 for p in paragraphs)
    assert len(train) + len(held_out) == total // 256
    assert len(held_out) == round(0.1 * (total // 256))
    block = train[0]
    assert len(block.input_ids) == 256 and block.labels == block.input_ids
    text = tokenizer.decode(block.input_ids)
    assert any(piece in " ".join(paragraphs) for piece in text.split("<|im_end|>") if len(piece) > 20)
    # the held-out blocks (the first tenth of the stream) span several topics: the paragraphs are shuffled
    first_tenth = tokenizer.decode([t for b in held_out for t in b.input_ids])
    assert sum(w in first_tenth for w in ("atom", "river", "team", "cook", "computer", "painting", "price")) >= 3


@pytest.mark.parametrize("name", ["danlu_text", "danlu_topics"])
def test_registered_files_have_no_bad_lines(name):
    spec = load_dataset_info(DATA)[name]
    for record in read_records(DATA / spec.file_name):  # raises on any bad line
        assert set(record.data) <= {"text", "label", "split"}


def test_each_pretraining_dataset_reads_its_own_text_column(tmp_path):
    """Two datasets whose text sits under different columns: each is read from its own (not the last one's)."""
    import json

    (tmp_path / "notes.jsonl").write_text(json.dumps({"body": "zebra " * 40}) + "\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "quokka " * 40}) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "notes": {"file_name": "notes.jsonl", "columns": {"prompt": "body"}},
        "plain": {"file_name": "plain.jsonl", "columns": {"prompt": "text"}}}))
    tokenizer = byte_tokenizer()
    train, _ = prepare_pretrain_data(tokenizer, str(tmp_path), ["notes", "plain"], cutoff_len=16,
                                     cache_dir=tmp_path / "cache")
    text = tokenizer.decode([t for i in range(len(train)) for t in train[i].input_ids])
    assert "zebra" in text and "quokka" in text
