"""Dataset files, LLaMA-Factory formats, SFT label masking and the errors bad data gets."""
import json

import pytest

from danlu.data.dataset import prepare_sft_data
from danlu.data.files import DataError, ReadReport, read_records
from danlu.data.formats import DatasetSpec, load_dataset_info, to_example
from danlu.data.supervised import IGNORE_INDEX, TokenizeReport, tokenize_example

pytestmark = pytest.mark.real  # uses the real model's tokenizer and chat template


def write(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_alpaca_with_history_and_system(tmp_path):
    records = read_records(write(tmp_path / "a.json", [{"instruction": "Add", "input": "1+1", "output": "2",
                                                          "system": "Be short.", "history": [["Hi", "Hello"]]}]))
    example = to_example(records[0], DatasetSpec("a", "a.json"))
    assert example.system == "Be short."
    assert example.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Add\n1+1"}, {"role": "assistant", "content": "2"}]


def test_sharegpt_and_openai_messages(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]}]
    example = to_example(read_records(write(tmp_path / "s.json", rows))[0], DatasetSpec("s", "s.json", "sharegpt"))
    assert example.system == "S" and [m["role"] for m in example.messages] == ["user", "assistant"]
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    spec = DatasetSpec("o", "o.jsonl", "sharegpt", {"messages": "messages"})
    (tmp_path / "o.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert to_example(read_records(tmp_path / "o.jsonl")[0], spec).messages[1]["content"] == "A"


def test_missing_column_names_file_item_and_column(tmp_path):
    records = read_records(write(tmp_path / "a.json", [{"instruction": "x", "output": "y"}, {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"a.json:item 1: missing column 'output'"):
        [to_example(r, DatasetSpec("a", "a.json")) for r in records]


def test_bad_json_line_stops_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n[1]\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON .*--skip_bad_lines"):
        read_records(path)
    report = ReadReport()
    assert len(read_records(path, skip_bad_lines=True, report=report)) == 1
    assert len(report.skipped) == 2 and "d.jsonl:3: expected a JSON object" in report.skipped[1]


def test_sharegpt_roles_must_alternate(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}]}]
    with pytest.raises(DataError, match="must alternate user, assistant"):
        to_example(read_records(write(tmp_path / "s.json", rows))[0], DatasetSpec("s", "s.json", "sharegpt"))


def test_only_answers_are_labelled(real_tokenizer, tmp_path):
    rows = [{"instruction": "What is 2+2?", "output": "It is 4.", "history": [["Hi", "Hello there"]]}]
    example = to_example(read_records(write(tmp_path / "a.json", rows))[0], DatasetSpec("a", "a.json"))
    tokens = tokenize_example(real_tokenizer, example, None, cutoff_len=1024)
    learned = real_tokenizer.decode([t for t, l in zip(tokens.input_ids, tokens.labels) if l != IGNORE_INDEX])
    assert learned == "Hello there<|im_end|>\nIt is 4.<|im_end|>\n"
    full = real_tokenizer.decode(tokens.input_ids)
    assert full.startswith("<|im_start|>system\n") and "What is 2+2?" in full


def test_cutoff_truncates_and_drops_with_counts(real_tokenizer, tmp_path):
    rows = [{"instruction": "word " * 20, "output": "answer " * 100}, {"instruction": "word " * 200, "output": "x"}]
    records = read_records(write(tmp_path / "a.json", rows))
    report = TokenizeReport()
    results = [tokenize_example(real_tokenizer, to_example(r, DatasetSpec("a", "a.json")), None, 80, report=report)
               for r in records]
    assert len(results[0].input_ids) == 80 and results[1] is None
    assert any(label != IGNORE_INDEX for label in results[0].labels)
    assert report.truncated == 2 and report.dropped == 1


def test_shipped_datasets_and_mixing(real_tokenizer):
    data = prepare_sft_data(real_tokenizer, "data", ["identity", "danlu_instruct", "danlu_chat"], None, 512,
                            val_size=0.1)
    assert len(data.train) + len(data.eval) == len(json.load(open("data/identity.json"))) + \
        len(json.load(open("data/danlu_instruct.json"))) + 2
    assert len(data.eval) >= 1
    # alpaca_en_demo: LLaMA-Factory's demo name, registered with our own instructions so its YAMLs run as shipped
    assert set(load_dataset_info("data")) == {"identity", "danlu_instruct", "danlu_chat", "alpaca_en_demo",
                                              "identity_preference", "identity_kto", "danlu_text", "danlu_topics",
                                              "zh_corpus"}
    assert load_dataset_info("data")["alpaca_en_demo"].file_name == "danlu_instruct.json"


def test_unknown_dataset_and_empty_result(real_tokenizer, tmp_path):
    with pytest.raises(DataError, match="'identty' is not in .*did you mean 'identity'"):
        prepare_sft_data(real_tokenizer, "data", ["identty"], None, 512)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"long": {"file_name": "l.json"}}))
    write(tmp_path / "l.json", [{"instruction": "word " * 300, "output": "x"}])
    with pytest.raises(DataError, match="no training examples left .*1 dropped"):
        prepare_sft_data(real_tokenizer, str(tmp_path), ["long"], None, 64)


def test_processes_building_one_token_cache_at_once_all_get_it(tmp_path):
    """The ranks of a distributed pt run build the same cache at the same time: each writes a file of its own and
    renames it into place (one shared `.part` name made the second rename fail)."""
    import threading

    import numpy as np

    from danlu.data.pretrain import build_token_cache
    from tests.conftest import byte_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(200)))
    tokenizer = byte_tokenizer()  # built once: transformers' lazy imports are not thread-safe
    results, errors = [], []

    def build():
        try:
            results.append(np.asarray(build_token_cache(tokenizer, [(corpus, "text")], tmp_path / "cache")))
        except Exception as e:  # noqa: BLE001 - the test reports whatever a builder raised
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(np.array_equal(r, results[0]) for r in results)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [p.name for p in (tmp_path / "cache").glob("*.bin")] + [p.name for p in (tmp_path / "cache").glob("*.json")])
