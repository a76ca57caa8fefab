"""Text classification: accuracy and macro-F1 of predicted labels, and the reader of labelled text files.

Labels may be strings, integers or anything comparable with ==; predictions and labels may be lists, numpy
arrays or tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from danlu.evaluation.embeddings import read_text_lines


def _items(values, name: str) -> list:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
        return values.tolist()
    return list(values)


def _pair(predictions, labels) -> tuple[list, list]:
    p, y = _items(predictions, "predictions"), _items(labels, "labels")
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    if not y:
        raise ValueError("no labels to score")
    return p, y


def accuracy(predictions, labels) -> float:
    """The fraction of predictions equal to their label (sklearn.metrics.accuracy_score)."""
    p, y = _pair(predictions, labels)
    return sum(a == b for a, b in zip(p, y)) / len(y)


def macro_f1(predictions, labels, label_names: Optional[Sequence] = None) -> float:
    """The unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN) (sklearn's f1_score(average="macro")).

    The classes are `label_names` when given (a class that is neither predicted nor true scores 0, as sklearn's
    default zero_division), else every value among the labels and predictions.
    """
    p, y = _pair(predictions, labels)
    classes = list(dict.fromkeys(label_names if label_names is not None else [*y, *p]))
    if not classes:
        raise ValueError("label_names is empty")
    scores = []
    for c in classes:
        tp = sum(a == c and b == c for a, b in zip(p, y))
        fp = sum(a == c and b != c for a, b in zip(p, y))
        fn = sum(a != c and b == c for a, b in zip(p, y))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def read_labelled(path, split: Optional[str], text_field: str = "text",
                  label_field: str = "label") -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, label_names) of the records of `split` (None: every record) of a labelled file such as
    data/danlu_topics.jsonl. label_names are the sorted labels of the whole file, every split, so that a
    train and a test read map labels to the same indices: `label_names.index(label)`.

    Bad lines are DataErrors naming the file, the line and the field (see read_text_lines).
    """
    path = Path(path)
    texts = read_text_lines(path, text_field, split)
    labels = read_text_lines(path, label_field, split)
    label_names = sorted(set(read_text_lines(path, label_field)))
    return texts, labels, label_names
