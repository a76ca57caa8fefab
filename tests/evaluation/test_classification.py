"""Accuracy and macro-F1 against sklearn; the labelled-file reader."""
import json
import warnings

import numpy as np
import pytest
import torch

from danlu.data.files import DataError
from danlu.evaluation.classification import accuracy, macro_f1, read_labelled

LABELS = ["food", "science", "sports", "technology"]


def random_predictions(seed, n=200, classes=LABELS, wrong_classes=LABELS):
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, n)
    predictions = np.where(rng.random(n) < 0.6, labels, rng.choice(wrong_classes, n))
    return predictions.tolist(), labels.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_macro_f1_match_sklearn(seed):
    import sklearn.metrics as metrics
    predictions, labels = random_predictions(seed)
    assert accuracy(predictions, labels) == pytest.approx(metrics.accuracy_score(labels, predictions))
    assert macro_f1(predictions, labels) == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))


def test_macro_f1_with_unseen_and_extra_classes_matches_sklearn():
    import sklearn.metrics as metrics
    # predictions include a class that is never true ("other"); label_names include one never seen ("music")
    predictions, labels = random_predictions(3, classes=LABELS[:3], wrong_classes=LABELS[:3] + ["other"])
    assert macro_f1(predictions, labels) == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))
    names = LABELS[:3] + ["music"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that music's F1 is ill-defined (set to 0)
        expected = metrics.f1_score(labels, predictions, average="macro", labels=names)
    assert macro_f1(predictions, labels, label_names=names) == pytest.approx(expected)


def test_by_hand_and_tensors():
    y = torch.tensor([0, 0, 1, 1, 2])
    p = torch.tensor([0, 1, 1, 1, 0])
    assert accuracy(p, y) == pytest.approx(3 / 5)
    # class 0: tp 1 fp 1 fn 1 -> 1/2; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: tp 0 fn 1 -> 0
    assert macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(np.array(["a", "b"]), ["a", "b"]) == 1.0


def test_refuses_mismatched_or_empty():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="no labels"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="one-dimensional"):
        accuracy(torch.zeros(2, 2), torch.zeros(2, 2))


def test_read_labelled(tmp_path):
    rows = [{"text": "t1", "label": "b", "split": "train"}, {"text": "t2", "label": "a", "split": "test"},
            {"text": "t3", "label": "c", "split": "train"}, {"text": "t4", "label": "b", "split": "test"}]
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts, labels, names = read_labelled(path, "test")
    assert (texts, labels) == (["t2", "t4"], ["a", "b"])
    assert names == ["a", "b", "c"]  # the whole file's labels, so train and test share indices
    assert read_labelled(path, "train")[2] == names
    assert read_labelled(path, None)[0] == ["t1", "t2", "t3", "t4"]
    path.write_text(path.read_text() + json.dumps({"text": "t5", "split": "test"}) + "\n")
    with pytest.raises(DataError, match=r"l.jsonl:5: missing field 'label'"):
        read_labelled(path, "test")
