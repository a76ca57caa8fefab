"""Spearman, pairwise cosines and the sentence-embedding agreement, against scipy and sklearn; the text reader."""
import json
import math

import numpy as np
import pytest
import torch

from danlu.data.files import DataError
from danlu.evaluation.embeddings import (embedding_agreement, pairwise_cosine, rank, read_text_lines, spearman,
                                         split_sentences)


def test_spearman_matches_scipy_with_and_without_ties():
    import scipy.stats as stats
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    # many ties on both sides: small integers
    a, b = rng.integers(0, 5, size=300), rng.integers(0, 4, size=300)
    b = np.where(rng.random(300) < 0.5, a, b)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert rank(a) == pytest.approx(stats.rankdata(a))
    # tensors and lists give the same value as arrays
    assert spearman(torch.tensor(a), b.tolist()) == pytest.approx(spearman(a, b), abs=1e-12)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [9, 1, 0, -5]) == -1.0
    # ranks x = 1, 2.5, 2.5, 4 and y = 1, 2, 3, 4: pearson = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # no spread: undefined, as scipy


def test_spearman_refuses_bad_input():
    with pytest.raises(ValueError, match="equally long, got 3 and 2"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 values"):
        spearman([1], [1])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, float("nan"), 3], [1, 2, 3])
    with pytest.raises(ValueError, match="one-dimensional"):
        spearman(np.ones((2, 2)), np.ones((2, 2)))


def test_pairwise_cosine_matches_sklearn():
    import sklearn.metrics.pairwise as pairwise
    rng = np.random.default_rng(1)
    e = rng.normal(size=(7, 5))
    e[3] = 0.0  # a zero row: cosine 0, as sklearn
    expected = pairwise.cosine_similarity(e)[np.triu_indices(7, 1)]
    ours = pairwise_cosine(e)
    assert isinstance(ours, np.ndarray) and ours.shape == (21,)
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    t = pairwise_cosine(torch.tensor(e, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6)
    assert pairwise_cosine(torch.tensor(e).to(torch.bfloat16)).dtype == torch.float32


def test_pairwise_cosine_order_and_shape():
    e = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    np.testing.assert_allclose(pairwise_cosine(e), [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)])  # 0-1, 0-2, 1-2
    with pytest.raises(ValueError, match=r"\(n, d\) matrix"):
        pairwise_cosine([1.0, 2.0])
    with pytest.raises(ValueError, match=r"\(n, d\) matrix"):
        pairwise_cosine([[1.0, 2.0]])


def test_embedding_agreement():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(40, 32, generator=g)
    # a rotation and a rescaling keep every cosine: perfect agreement, whatever the widths
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert embedding_agreement(3 * teacher @ rotation, teacher) == pytest.approx(1.0)
    padded = torch.cat([teacher, torch.zeros(40, 8)], dim=1)  # a wider student with the same geometry
    assert embedding_agreement(padded, teacher) == pytest.approx(1.0)
    # a noisy student agrees less, an unrelated one hardly at all
    noisy = teacher + 0.5 * torch.randn(40, 32, generator=g)
    unrelated = torch.randn(40, 16, generator=g)
    assert 0.5 < embedding_agreement(noisy, teacher) < 1.0
    assert abs(embedding_agreement(unrelated, teacher)) < 0.2
    with pytest.raises(ValueError, match="embedded 39 sentences and the teacher 40"):
        embedding_agreement(teacher[:39], teacher)
    with pytest.raises(ValueError, match="at least 3 sentences"):
        embedding_agreement(teacher[:2], teacher[:2])


def test_agreement_equals_spearman_of_the_pair_cosines():
    import scipy.stats as stats
    rng = np.random.default_rng(2)
    student, teacher = rng.normal(size=(25, 8)), rng.normal(size=(25, 12))
    student[:, :8] += teacher[:, :8]
    expected = stats.spearmanr(pairwise_cosine(student), pairwise_cosine(teacher)).statistic
    assert embedding_agreement(student, teacher) == pytest.approx(expected, abs=1e-12)


def test_split_sentences():
    text = 'Water boils at 100 degrees. Does it? "Yes," she said. It does! (Mostly.) 42 people agreed.'
    assert split_sentences(text) == ["Water boils at 100 degrees.", "Does it?", '"Yes," she said.', "It does!",
                                     "(Mostly.)", "42 people agreed."]
    assert split_sentences("version 1.5 is out. so is 2.0") == ["version 1.5 is out. so is 2.0"]
    assert split_sentences("  ") == []


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_text_lines_and_split(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "split": "train"}, {"text": "b", "split": "test"},
                                              {"text": "c", "split": "train", "extra": 1}])
    assert read_text_lines(path) == ["a", "b", "c"]
    assert read_text_lines(path, split="train") == ["a", "c"]
    assert read_text_lines(path, field="split") == ["train", "test", "train"]
    with pytest.raises(DataError, match=r"s.jsonl: no record has split 'tset' \(splits present: test, train\)"):
        read_text_lines(path, split="tset")
    txt = tmp_path / "t.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    assert read_text_lines(txt) == ["one", "two"]
    with pytest.raises(DataError, match="t.txt: a .txt file has no split field"):
        read_text_lines(txt, split="test")


@pytest.mark.parametrize("line, message", [
    ('{"txt": "typo"}', r"bad.jsonl:2: missing field 'text' \(fields present: \['txt'\]\)"),
    ('{"text": 3}', r"bad.jsonl:2: field 'text' must be a non-empty string, got 3"),
    ('{"text": "   "}', r"bad.jsonl:2: field 'text' must be a non-empty string"),
    ('{"text": "x",}', r"bad.jsonl:2: invalid JSON"),
    ('["text"]', r"bad.jsonl:2: expected a JSON object, got list"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError, match=message):
        read_text_lines(path)


def test_missing_split_field_and_empty_files(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "split": "test"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: no 'split' field, but split 'test' was asked for"):
        read_text_lines(path, split="test")
    with pytest.raises(DataError, match="e.jsonl: no records"):
        read_text_lines(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(DataError, match="nothing.jsonl: no such dataset file"):
        read_text_lines(tmp_path / "nothing.jsonl")
