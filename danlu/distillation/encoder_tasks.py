"""An encoder's two distillation tasks (issue 12, `--stage kd --kd_task ...` with a BERT-family teacher): what
each task's prediction layer is, the classifier head and its files, and how a student is measured.

* embedding: the prediction is the sentence embedding, the last hidden states mean-pooled over the real tokens
  and L2-normalised (all-MiniLM-L6-v2's pipeline, danlu.models.pooling). A student is judged by
  `evaluate_embedding_student`: the Spearman correlation of its pairwise cosine similarities with the
  teacher's over held-out sentences (danlu.evaluation.embeddings.embedding_agreement).
* classification: the prediction is a linear layer over that sentence embedding (`SentenceClassifier`). The
  teacher's is a linear probe, `train_linear_probe`: multinomial logistic regression on the frozen teacher's
  embeddings of the training sentences (scikit-learn's LogisticRegression objective and its default C = 1,
  solved by full-batch L-BFGS from zeros: deterministic). A student is judged by `evaluate_classifier`
  (accuracy and macro-F1).

Named for the tasks rather than for evaluation: the prediction layers and the head's file format here are what
the kd recipe (danlu/training/recipes/kd_encoder.py) trains and what the final save writes
(danlu/training/finetuning.py), and the same definitions measure the result, so both sides read one place.

The head's files, beside the student's BertModel checkpoint (which transformers' AutoModel loads as it is):
`classifier.safetensors` ({"weight": [classes, hidden], "bias": [classes]}) and `classifier.json`
({"labels": [...], "hidden_size": ..., "input": ...}); `load_classifier(directory)` reads them back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from danlu.checkpoints.errors import CheckpointError
from danlu.evaluation.classification import accuracy, macro_f1
from danlu.evaluation.embeddings import embedding_agreement
from danlu.models.pooling import MAX_SEQ_LENGTH, sentence_embeddings

TASKS = ("embedding", "classification")
CLASSIFIER = "sentence_classifier"  # where a student's head rides on it while it trains (a trained module)
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_INPUT = "the encoder's last hidden states mean-pooled over the real tokens, L2-normalised"


class SentenceClassifier(nn.Linear):
    """Logits over `labels` from a sentence embedding (danlu.models.pooling.sentence_vectors): one linear layer."""

    def __init__(self, hidden_size: int, labels: Sequence[str]):
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs two or more distinct labels, got {list(labels)}")
        super().__init__(hidden_size, len(labels))
        self.labels = [str(label) for label in labels]


def train_linear_probe(embeddings: torch.Tensor, targets: torch.Tensor, labels: Sequence[str], c: float = 1.0,
                       steps: int = 200) -> SentenceClassifier:
    """Multinomial logistic regression on fixed embeddings [n, hidden] with class indices `targets` [n]: the
    minimum of mean cross-entropy + |W|^2 / (2 C n) (scikit-learn's LogisticRegression(C) objective; the bias
    is not penalised), by at most `steps` iterations of full-batch L-BFGS from zeros. Deterministic."""
    x = embeddings.detach().float()
    y = torch.as_tensor(targets, dtype=torch.long, device=x.device)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"expected embeddings [n, hidden] and n targets, got {tuple(x.shape)} and {len(y)}")
    if c <= 0 or steps < 1:
        raise ValueError(f"c and steps must be positive, got c={c}, steps={steps}")
    head = SentenceClassifier(x.shape[1], labels).to(x.device)
    if int(y.min()) < 0 or int(y.max()) >= len(head.labels):
        raise ValueError(f"targets must be class indices 0..{len(head.labels) - 1}")
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    penalty = 1.0 / (2.0 * c * len(x))
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + penalty * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.requires_grad_(False)


# ---------------------------------------------------------------- the head's files

def save_classifier(head: SentenceClassifier, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file({"weight": head.weight.detach().float().contiguous().cpu(),
               "bias": head.bias.detach().float().contiguous().cpu()},
              str(directory / CLASSIFIER_FILE), metadata={"format": "pt"})
    config = {"labels": head.labels, "hidden_size": head.in_features, "input": CLASSIFIER_INPUT}
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory / CLASSIFIER_FILE


def load_classifier(directory: Path, device: Optional[torch.device | str] = None) -> SentenceClassifier:
    """The head `save_classifier` wrote in `directory` (a `--kd_task classification` run's output_dir)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, config_path = directory / CLASSIFIER_FILE, directory / CLASSIFIER_CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise CheckpointError(f"{directory}: no classifier head ({CLASSIFIER_FILE} and {CLASSIFIER_CONFIG}); it is "
                              f"written by danlu train --stage kd --kd_task classification")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        labels = config["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: expected {{\"labels\": [...], ...}} ({e})") from None
    state = load_file(str(weights))
    if set(state) != {"weight", "bias"} or tuple(state["weight"].shape)[0] != len(labels) or \
            tuple(state["bias"].shape) != (len(labels),):
        raise CheckpointError(f"{weights}: expected weight [{len(labels)}, hidden] and bias [{len(labels)}] for the "
                              f"labels {labels}; found {({k: tuple(v.shape) for k, v in state.items()})}")
    head = SentenceClassifier(state["weight"].shape[1], labels)
    head.load_state_dict(state)
    return head.to(device or "cpu").eval().requires_grad_(False)


# ---------------------------------------------------------------- measures

def evaluate_embedding_student(student: nn.Module, teacher: nn.Module, tokenizer, sentences: Sequence[str],
                               batch_size: int = 32, max_length: int = MAX_SEQ_LENGTH) -> float:
    """The Spearman correlation between the student's and the teacher's cosine similarities over every pair of
    `sentences` (their widths may differ; both read the sentences through `tokenizer`)."""
    student_vectors = sentence_embeddings(student, tokenizer, sentences, batch_size, True, max_length)
    teacher_vectors = sentence_embeddings(teacher, tokenizer, sentences, batch_size, True, max_length)
    return embedding_agreement(student_vectors, teacher_vectors)


@torch.no_grad()
def predict_labels(model: nn.Module, head: SentenceClassifier, tokenizer, texts: Sequence[str], batch_size: int = 32,
                   max_length: int = MAX_SEQ_LENGTH) -> list[str]:
    vectors = sentence_embeddings(model, tokenizer, texts, batch_size, True, max_length)
    return [head.labels[i] for i in head(vectors.to(head.weight.device)).argmax(-1).tolist()]


def evaluate_classifier(model: nn.Module, head: SentenceClassifier, tokenizer, texts: Sequence[str],
                        labels: Sequence[str], batch_size: int = 32,
                        max_length: int = MAX_SEQ_LENGTH) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of the head's predictions on `texts` against their `labels` (label names)."""
    unknown = sorted(set(labels) - set(head.labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the head's {head.labels}")
    predicted = predict_labels(model, head, tokenizer, texts, batch_size, max_length)
    return {"accuracy": accuracy(predicted, labels), "macro_f1": macro_f1(predicted, labels, head.labels)}
