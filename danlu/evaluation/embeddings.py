"""How closely a student encoder's sentence embeddings agree with its teacher's.

The two may differ in width, so their vectors are never compared directly. Each model's embeddings of the same
held-out sentences give the cosine similarity of every pair (i < j); the agreement is the Spearman correlation
of the student's pair similarities with the teacher's: 1 when the student ranks every pair of sentences
exactly as the teacher does, about 0 when its similarities say nothing about the teacher's.

Also here: the readers of the text files the measures run on (data/README.md describes the shipped ones), and
the sentence sets of the sentence-embedding task.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from danlu.data.files import DataError, read_records


def _vector(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN or infinite value(s)")
    return a


def rank(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (scipy.stats.rankdata's 'average')."""
    a = _vector(values, "values")
    order = np.argsort(a, kind="stable")
    ordered = a[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    ends = np.append(starts[1:], len(a))  # a run of ties holds sorted positions starts..ends-1
    ranks = np.empty(len(a))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equally long vectors (lists, numpy arrays or tensors): the Pearson
    correlation of their ranks, ties averaged, as scipy.stats.spearmanr. NaN when either vector is constant
    (its ranks have no spread), as scipy."""
    a, b = _vector(x, "x"), _vector(y, "y")
    if len(a) != len(b):
        raise ValueError(f"x and y must be equally long, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"spearman needs at least 2 values, got {len(a)}")
    ra, rb = rank(a), rank(b)
    ra -= ra.mean()
    rb -= rb.mean()
    spread = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if spread == 0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / spread, -1.0, 1.0))


def pairwise_cosine(embeddings):
    """The cosine similarity of every pair of rows i < j of an (n, d) matrix, in row-major order
    (0-1, 0-2, ..., 1-2, ...: torch.triu_indices(n, n, 1), scipy's pdist): n(n-1)/2 values.

    A tensor gives a tensor on its device (float32 at least); anything else a float64 numpy array. A row of
    zeros has cosine 0 with every row (sklearn's cosine_similarity). Memory: one n x n matrix.
    """
    as_tensor = isinstance(embeddings, torch.Tensor)
    e = embeddings.detach() if as_tensor else torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    if e.ndim != 2 or e.shape[0] < 2:
        raise ValueError(f"embeddings must be an (n, d) matrix with n >= 2 rows, got shape {tuple(e.shape)}")
    if not e.is_floating_point() or e.dtype in (torch.float16, torch.bfloat16):
        e = e.float()
    unit = F.normalize(e, dim=1)
    i, j = torch.triu_indices(e.shape[0], e.shape[0], 1, device=e.device)
    cosines = (unit @ unit.T)[i, j].clamp(-1.0, 1.0)
    return cosines if as_tensor else cosines.numpy()


def embedding_agreement(student_embeddings, teacher_embeddings) -> float:
    """The sentence-embedding task's quality: the Spearman correlation between the student's and the teacher's
    pairwise cosine similarities over the same sentences (row k of each is sentence k; widths may differ)."""
    n_student, n_teacher = len(student_embeddings), len(teacher_embeddings)
    if n_student != n_teacher:
        raise ValueError(f"the student embedded {n_student} sentences and the teacher {n_teacher}; "
                         f"row k of each must be the same sentence")
    if n_student < 3:
        raise ValueError(f"agreement needs at least 3 sentences (3 pairs), got {n_student}")
    return spearman(pairwise_cosine(student_embeddings), pairwise_cosine(teacher_embeddings))


# A sentence ends at ., ! or ? (and any closing quote or bracket) followed by space and a capital, a digit or
# an opening quote. No abbreviation list: the shipped corpus is written without abbreviations ending in a
# full stop (tests/data/test_distillation_data.py checks that every piece is a whole sentence).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """The sentences of a paragraph of prose, each stripped."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        closing = m.group(0).rstrip()  # a closing quote or bracket belongs to the sentence it ends
        pieces.append(text[start:m.start() + len(closing)])
        start = m.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def read_text_lines(path, field: str = "text", split: Optional[str] = None) -> list[str]:
    """The `field` string of each record of a json / jsonl / csv / parquet file (or each non-empty line of a
    .txt), in order; with `split`, only the records whose "split" field equals it.

    A bad line is a DataError naming the file, the line and the field: invalid JSON, not an object, the field
    missing, not a string or blank, or (with `split`) no "split" field. So is a file with no record, or no
    record of the split asked for.
    """
    path = Path(path)
    if path.suffix == ".txt":
        if split is not None:
            raise DataError(f"{path}: a .txt file has no split field; split={split!r} needs json/jsonl records")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if not lines:
            raise DataError(f"{path}: no text (every line is empty)")
        return lines
    records = read_records(path)
    texts, splits_seen = [], set()
    for record in records:
        if split is not None:
            if "split" not in record.data:
                raise DataError(f"{record.source}: no 'split' field, but split {split!r} was asked for "
                                f"(fields present: {sorted(record.data)})")
            splits_seen.add(str(record.data["split"]))
            if record.data["split"] != split:
                continue
        value = record.data.get(field)
        if value is None:
            raise DataError(f"{record.source}: missing field {field!r} (fields present: {sorted(record.data)})")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{record.source}: field {field!r} must be a non-empty string, got {value!r:.80}")
        texts.append(value)
    if not records:
        raise DataError(f"{path}: no records")
    if not texts:
        raise DataError(f"{path}: no record has split {split!r} (splits present: {', '.join(sorted(splits_seen))})")
    return texts


def distillation_sentences(dataset_dir="data") -> tuple[list[str], list[str]]:
    """The sentence-embedding task's (training, held-out) sentences from the shipped files (data/README.md):
    training = the sentences of danlu_text.jsonl's paragraphs and the train split of danlu_topics.jsonl;
    held-out = the test split of danlu_topics.jsonl and danlu_sentences_heldout.jsonl. Each list without
    repeats, in file order."""
    d = Path(dataset_dir)
    train = [s for p in read_text_lines(d / "danlu_text.jsonl") for s in split_sentences(p)]
    train += read_text_lines(d / "danlu_topics.jsonl", split="train")
    held_out = read_text_lines(d / "danlu_topics.jsonl", split="test")
    held_out += read_text_lines(d / "danlu_sentences_heldout.jsonl")
    return list(dict.fromkeys(train)), list(dict.fromkeys(held_out))
