"""Preference data for rm, dpo and kto: LLaMA-Factory's ranking and kto formats, pairs, KL items, batches."""
import json
from pathlib import Path

import pytest
import torch

from danlu.data.collate import collate_feedback, collate_pairs
from danlu.data.files import DataError, read_records
from danlu.data.formats import (DatasetSpec, load_dataset_info, to_example, to_feedback_example,
                                to_preference_example)
from danlu.data.preference import (PreferenceReport, TokenizedFeedback, TokenizedPair, kl_answers,
                                   prepare_feedback_data, prepare_preference_data, tokenize_pair)
from danlu.data.supervised import IGNORE_INDEX
from tests.conftest import byte_tokenizer

LF_DIR = Path(__file__).parent.parent / "fixtures" / "llamafactory"
DATA_DIR = Path(__file__).parent.parent.parent / "data"
PAIRWISE = {"ranking": True, "columns": {"prompt": "question", "chosen": "chosen", "rejected": "rejected",
                                         "system": "system"}}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def dataset(tmp_path, entry, rows, name="d"):
    """A dataset_dir holding one dataset `name` with the given dataset_info.json entry and records."""
    write(tmp_path / f"{name}.json", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json", **entry}}))
    return str(tmp_path)


def record(tmp_path, row, name="r.json"):
    return read_records(write(tmp_path / name, [row]))[0]


def learned(tokenizer, tokens):
    return tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label != IGNORE_INDEX])


# formats


def test_alpaca_ranking_with_history_and_system(tmp_path):
    row = {"question": "Add", "input": "1+1", "chosen": "2", "rejected": "3", "system": "Be short.",
           "history": [["Hi", "Hello"]]}
    pair = to_preference_example(record(tmp_path, row), DatasetSpec("p", "r.json", columns=PAIRWISE["columns"],
                                                                     ranking=True))
    assert pair.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Add\n1+1"}]
    assert (pair.chosen, pair.rejected, pair.system) == ("2", "3", "Be short.")


def test_llamafactory_dpo_demo_parses_as_llamafactory(tmp_path):
    spec = load_dataset_info(LF_DIR)["dpo_en_demo"]
    assert spec.ranking and spec.formatting == "sharegpt"
    records = read_records(LF_DIR / spec.file_name)
    pairs = [to_preference_example(r, spec) for r in records]
    assert len(pairs) == 40
    for r, pair in zip(records, pairs):
        turns = r.data["conversations"]
        has_system = turns[0]["from"] == "system"
        assert pair.system == (turns[0]["value"] if has_system else None)
        assert len(pair.prompt) == len(turns) - has_system and pair.prompt[-1]["role"] == "user"
        assert (pair.chosen, pair.rejected) == (r.data["chosen"]["value"], r.data["rejected"]["value"])
    assert any(len(p.prompt) > 1 for p in pairs)  # multi-turn prompts are among them


def test_llamafactory_kto_demo_and_alpaca_kto(tmp_path):
    spec = load_dataset_info(LF_DIR)["kto_en_demo"]
    records = read_records(LF_DIR / spec.file_name)
    items = [to_feedback_example(r, spec) for r in records]
    assert len(items) == 40 and {True, False} == {i.desirable for i in items}
    for r, item in zip(records, items):
        assert item.desirable is r.data["label"]
        assert item.messages == [{"role": m["role"], "content": m["content"]} for m in r.data["messages"]]
        assert item.prompt[-1]["role"] == "user" and item.answer == r.data["messages"][-1]["content"]
    alpaca = DatasetSpec("k", "r.json", columns={"kto_tag": "good"})
    item = to_feedback_example(record(tmp_path, {"instruction": "Q", "output": "A", "good": False}), alpaca)
    assert (item.prompt, item.answer, item.desirable) == ([{"role": "user", "content": "Q"}], "A", False)


def test_ranking_flag_is_read_and_checked(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "p.json", "ranking": "yes"}}))
    with pytest.raises(DataError, match=r"p.ranking must be true or false, got 'yes'"):
        load_dataset_info(tmp_path)


SHAREGPT_PAIR = {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "A"},
                 "rejected": {"from": "gpt", "value": "B"}}
SHAREGPT = DatasetSpec("s", "r.json", "sharegpt", ranking=True)
ALPACA_PAIR = DatasetSpec("a", "r.json", ranking=True)
KTO = DatasetSpec("k", "r.json", "sharegpt", {"messages": "messages", "kto_tag": "label"})
KTO_ROW = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": True}


@pytest.mark.parametrize("row, spec, convert, expected", [
    ({"instruction": "Q", "chosen": "A"}, ALPACA_PAIR, to_preference_example,
     r"r.json:item 0: missing column 'rejected'"),
    ({"instruction": "Q", "chosen": ["A"], "rejected": "B"}, ALPACA_PAIR, to_preference_example,
     r"r.json:item 0: column 'chosen' must be a string, got list"),
    ({**SHAREGPT_PAIR, "chosen": "A"}, SHAREGPT, to_preference_example,
     r"r.json:item 0: column 'chosen' must be a message \{'from': 'gpt', 'value': \"...\"\}, got 'A'"),
    ({**SHAREGPT_PAIR, "rejected": {"from": "human", "value": "B"}}, SHAREGPT, to_preference_example,
     r"r.json:item 0: column 'rejected' has role 'human'; an answer must have the assistant's role 'gpt'"),
    ({k: v for k, v in SHAREGPT_PAIR.items() if k != "chosen"}, SHAREGPT, to_preference_example,
     r"r.json:item 0: missing column 'chosen'"),
    ({**SHAREGPT_PAIR, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     SHAREGPT, to_preference_example, r"r.json:item 0: messages must alternate .* end with the user"),
    ({"instruction": "Q", "output": "A"}, DatasetSpec("plain", "r.json"), to_preference_example,
     r"r.json:item 0: dataset 'plain' is not pairwise .*set \"ranking\": true"),
    ({"instruction": "Q", "output": "A"}, DatasetSpec("plain", "r.json"), to_feedback_example,
     r"r.json:item 0: dataset 'plain' has no kto_tag column.*\"kto_tag\""),
    ({k: v for k, v in KTO_ROW.items() if k != "label"}, KTO, to_feedback_example,
     r"r.json:item 0: missing column 'label' \(the kto_tag"),
    ({**KTO_ROW, "label": "true"}, KTO, to_feedback_example,
     r"r.json:item 0: column 'label' \(the kto_tag\) must be true or false, got str 'true'"),
    ({**KTO_ROW, "messages": KTO_ROW["messages"][:1]}, KTO, to_feedback_example,
     r"r.json:item 0: messages must alternate .* end with the assistant"),
    (SHAREGPT_PAIR, SHAREGPT, to_feedback_example, r"r.json:item 0: dataset 's' is pairwise data .*kto"),
    (SHAREGPT_PAIR, SHAREGPT, to_example, r"r.json:item 0: dataset 's' is pairwise data .*sft"),
])
def test_bad_preference_records_name_item_and_field(tmp_path, row, spec, convert, expected):
    with pytest.raises(DataError, match=expected):
        convert(record(tmp_path, row), spec)


# tokenization


def test_pair_shares_masked_prompt_and_learns_only_the_final_answer(tokenizer, tmp_path):
    row = {"question": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five.", "history": [["Hi", "Hello"]]}
    pair = to_preference_example(record(tmp_path, row), DatasetSpec("p", "r.json", columns=PAIRWISE["columns"],
                                                                     ranking=True))
    tokens = tokenize_pair(tokenizer, pair, None, 1024, PreferenceReport())
    chosen, rejected = tokens.chosen, tokens.rejected
    n_prompt = next(i for i, label in enumerate(chosen.labels) if label != IGNORE_INDEX)
    assert chosen.input_ids[:n_prompt] == rejected.input_ids[:n_prompt]
    assert set(chosen.labels[:n_prompt]) == set(rejected.labels[:n_prompt]) == {IGNORE_INDEX}
    assert tokenizer.decode(chosen.input_ids[:n_prompt]).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert learned(tokenizer, chosen) == "It is 4.<|im_end|>\n"  # the history's "Hello" is context only
    assert learned(tokenizer, rejected) == "Five.<|im_end|>\n"


def test_identical_and_too_long_pairs_are_counted_not_fatal(tokenizer, tmp_path):
    rows = [{"question": "Q1", "chosen": "A", "rejected": "B"},
            {"question": "Q2", "chosen": "Same", "rejected": "Same"},
            {"question": "long " * 100, "chosen": "A", "rejected": "B"},
            {"question": "Q3", "chosen": "shared start " * 20 + "x", "rejected": "shared start " * 20 + "y"},
            {"question": "Q4", "chosen": "A" * 200, "rejected": "B"}]
    data = prepare_preference_data(tokenizer, dataset(tmp_path, PAIRWISE, rows), ["d"], None, 120)
    report = data.tokenized
    assert (report.identical, report.dropped, report.truncated) == (2, 1, 3)  # Q2, Q3 cut alike; long; long, Q3, Q4
    assert len(data.train) == 2 and all(isinstance(p, TokenizedPair) for p in data.train)
    assert all(len(p.chosen.input_ids) <= 120 and len(p.rejected.input_ids) <= 120 for p in data.train)


def test_nothing_left_names_datasets_and_counts(tokenizer, tmp_path):
    rows = [{"question": "Q", "chosen": "Same", "rejected": "Same"}, {"question": "long " * 100, "chosen": "A",
                                                                       "rejected": "B"}]
    with pytest.raises(DataError, match=r"no training pairs left from d in .*2 read, 1 identical.*1 dropped.*"
                                        r"cutoff_len=64"):
        prepare_preference_data(tokenizer, dataset(tmp_path, PAIRWISE, rows), ["d"], None, 64)


def test_llamafactory_fixtures_and_shipped_data_tokenize(tokenizer):
    pairs = prepare_preference_data(tokenizer, str(LF_DIR), ["dpo_en_demo"], None, 4096, val_size=0.1)
    assert len(pairs.train) + len(pairs.eval) + pairs.tokenized.dropped + pairs.tokenized.identical == 40
    assert len(pairs.eval) == 4
    feedback = prepare_feedback_data(tokenizer, str(LF_DIR), ["kto_en_demo"], None, 4096)
    assert len(feedback.train) + feedback.tokenized.dropped == 40
    shipped = json.loads((DATA_DIR / "identity_preference.json").read_text())
    assert len(shipped) == 24 and all(r["chosen"] != r["rejected"] for r in shipped)
    assert len(prepare_preference_data(tokenizer, str(DATA_DIR), ["identity_preference"], None, 1024).train) == 24
    kto = prepare_feedback_data(tokenizer, str(DATA_DIR), ["identity_kto"], None, 1024).train
    assert len(kto) == 48 and sum(item.desirable for item in kto) == 24


def test_kl_items_pair_each_prompt_with_the_previous_answer(tokenizer, tmp_path):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}", "good": i % 2 == 0} for i in range(4)]
    entry = {"columns": {"kto_tag": "good"}}
    records = read_records(write(tmp_path / "k.json", rows))
    items = [to_feedback_example(r, DatasetSpec("k", "k.json", columns=entry["columns"])) for r in records]
    assert kl_answers(items) == ["A3", "A0", "A1", "A2"]  # LLaMA-Factory: responses rotated by one
    data = prepare_feedback_data(tokenizer, dataset(tmp_path, entry, rows), ["d"], None, 256, seed=3)
    assert len(data.train) == 4 and all(isinstance(t, TokenizedFeedback) for t in data.train)
    for item in data.train:
        i = int(learned(tokenizer, item.completion)[1])
        assert learned(tokenizer, item.kl) == f"A{(i - 1) % 4}<|im_end|>\n"
        assert item.kl.input_ids[:5] == item.completion.input_ids[:5] and item.desirable == (i % 2 == 0)
        assert f"Q{i}<|im_end|>" in tokenizer.decode(item.kl.input_ids)


# batches


def test_collate_pairs_puts_chosen_rows_first(tokenizer, tmp_path):
    rows = [{"question": "Q", "chosen": "short", "rejected": "a much longer answer"},
            {"question": "Another question", "chosen": "yes", "rejected": "no"}]
    pairs = prepare_preference_data(tokenizer, dataset(tmp_path, PAIRWISE, rows), ["d"], None, 256).train
    batch = collate_pairs(pairs, pad_id=0)
    rows_in_order = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    assert batch["input_ids"].shape == (4, max(len(t.input_ids) for t in rows_in_order))
    for i, tokens in enumerate(rows_in_order):
        n = len(tokens.input_ids)
        assert batch["input_ids"][i, :n].tolist() == tokens.input_ids
        assert batch["labels"][i, :n].tolist() == tokens.labels
        assert batch["attention_mask"][i].sum() == n and (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_collate_feedback_adds_kl_rows_and_desirable(tokenizer, tmp_path):
    rows = [{"instruction": "Q", "output": "a long answer here", "good": True},
            {"instruction": "Q2", "output": "no", "good": False}]
    items = prepare_feedback_data(tokenizer, dataset(tmp_path, {"columns": {"kto_tag": "good"}}, rows), ["d"],
                                  None, 256).train
    batch = collate_feedback(items, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "kl_input_ids", "kl_labels",
                          "kl_attention_mask", "desirable"}
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [i.desirable for i in items]
    for i, item in enumerate(items):
        n = len(item.kl.input_ids)
        assert batch["kl_input_ids"][i, :n].tolist() == item.kl.input_ids and batch["kl_attention_mask"][i].sum() == n
        assert batch["input_ids"][i, :len(item.completion.input_ids)].tolist() == item.completion.input_ids
