"""Distillation from an encoder teacher (`--stage kd` when the teacher is BERT-family, `config.causal` False):
kd.py's build_stage hands over here once the student is cut and the method's objective is built.

`kd_task` takes the place of kd_stage's data and prediction layer (danlu.distillation.encoder_tasks):

* embedding: the training texts are the sentences of `dataset`: each record's text (the alpaca prompt column,
  `text` for danlu_text and danlu_topics) cut into sentences by split_sentences, each sentence once. The
  prediction is the L2-normalised mean-pooled sentence embedding, and the soft term is the MSE between the
  student's and the teacher's embeddings (sentence-transformers' distillation, Reimers & Gurevych 2020) in place
  of the logit divergence. There are no hard labels: the method's hard weight is unused, and kd_temperature and
  kd_divergence do not apply (setting them is refused). A student narrower than its teacher is compared through
  a learned linear map of its pooled vector (`sentence` among the distillation projections, trained and then
  dropped like TinyBERT's W_h); its own embedding is what it keeps.
* classification: each record's text and label (the alpaca response column: `label` for danlu_topics). The
  teacher's head is a linear probe on its frozen embeddings of the training texts (train_linear_probe; its
  train accuracy and, when the data has a test split, its test accuracy are logged). The student's head starts
  as a copy of it (a student of the teacher's width) or fresh (a narrower one) and trains with the student:
  soft = the divergence of the class logits at T (times T^2), hard = cross-entropy on the labels.

A record whose `split` field is present and not "train" (danlu_topics' test sentences) is never trained on: it
is the held-out set the result is measured on. The evaluation set during training is `val_size` of the training
examples, or the records of `eval_dataset` whose split is not "train" (every record if none has a split field).

The method's other terms look where an encoder's states mean something: attention scores over real-query x
real-key pairs (no causal mask), Patient-KD over the [CLS] vectors (TextBrewer's pkd_loss), the hidden states
and DistilBERT's cosine over the real tokens. Texts are cut at min(cutoff_len, the models' positions) tokens,
padded on the right; single sentences have token type 0 throughout, the models' default.

The student's head rides on it as `sentence_classifier` (a trained module: it is in every checkpoint) and is
written beside the BertModel checkpoint (classifier.safetensors, classifier.json) by finetuning.save_final.
Encoder students train with finetuning_type full.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from danlu.data.dataset import read_examples, shuffle_and_split
from danlu.data.files import DataError, ReadReport, Record
from danlu.data.formats import ALPACA_COLUMNS, DatasetSpec
from danlu.distillation.encoder_tasks import CLASSIFIER, SentenceClassifier, train_linear_probe
from danlu.distillation.objective import (PROJECTIONS, Objective, Outputs, build_projections, distillation_loss,
                                          encoder_pairs, run_model)
from danlu.evaluation.classification import accuracy
from danlu.evaluation.embeddings import split_sentences
from danlu.models.pooling import mean_pooled, sentence_embeddings, sentence_vectors
from danlu.training.arguments import ArgumentError
from danlu.training.stage import Stage, StepOutput
from danlu.utils.progress import logger

SENTENCE = "sentence"  # the projection of a narrower student's pooled vector to the teacher's width
NO_LABEL = -1


@dataclass(frozen=True)
class Sentence:
    """One training example: a text and, for classification, its class index."""

    text: str
    label: int = NO_LABEL


@dataclass(frozen=True)
class TaskRecord:
    text: str
    label: Optional[str]
    split: Optional[str]
    source: str


def build_encoder_stage(lm, teacher: nn.Module, objective: Objective, args) -> Stage:
    check_encoder_run(lm, teacher, args)
    objective = encoder_objective(objective, args.kd_task)
    logger.info("encoder distillation (kd_task %s): %s", args.kd_task, objective)
    max_length = min(args.cutoff_len, lm.config.max_position_embeddings, teacher.config.max_position_embeddings)
    device = next(lm.model.parameters()).device
    teacher_head, trained = None, ()
    if args.kd_task == "embedding":
        train, held_out = embedding_data(args)
    else:
        train, held_out, labels, test = classification_data(args)
        teacher_head = teacher_probe(teacher, lm.tokenizer, train, test, labels, max_length)
        same_width = lm.config.hidden_size == teacher.config.hidden_size
        head = copy.deepcopy(teacher_head) if same_width else SentenceClassifier(lm.config.hidden_size, labels)
        logger.info("student's classifier: %s", "the teacher's probe, copied" if same_width else "a fresh head")
        setattr(lm.model, CLASSIFIER, head.to(device).requires_grad_(True))
        trained = (CLASSIFIER,)
    projections = encoder_projections(objective, args.kd_task, lm.config.hidden_size, teacher.config.hidden_size)
    dropped = ()
    if projections is not None:
        setattr(lm.model, PROJECTIONS, projections.to(device))
        trained, dropped = trained + (PROJECTIONS,), (PROJECTIONS,)
    logger.info("%s: %d training and %d evaluation examples", args.kd_task, len(train), len(held_out))
    return Stage(train, held_out, partial(collate_sentences, tokenizer=lm.tokenizer, max_length=max_length),
                 partial(encoder_step, teacher=teacher, objective=objective, teacher_head=teacher_head),
                 trained_modules=trained, dropped_modules=dropped)


def check_encoder_run(lm, teacher: nn.Module, args) -> None:
    if args.finetuning_type != "full":
        raise ArgumentError(f"finetuning_type {args.finetuning_type}: an encoder student trains with finetuning_type "
                            f"full (LoRA and freeze on encoders are not supported)")
    if args.kd_method == "dynabert":
        raise ArgumentError("kd_method dynabert trains on kd_stage's language-modelling data; with an encoder "
                            "teacher use kd, pkd_skip, pkd_last, distilbert or tinybert")
    if args.kd_lmbda:
        raise ArgumentError(f"kd_lmbda {args.kd_lmbda}: on-policy answers are a decoder's; an encoder teacher "
                            f"distils kd_task {args.kd_task} on the dataset's sentences")
    if args.kd_task == "embedding" and (args.kd_temperature is not None or args.kd_divergence != "ce"):
        raise ArgumentError("kd_task embedding compares sentence embeddings by MSE: kd_temperature and "
                            "kd_divergence apply to class logits (kd_task classification)")


def encoder_objective(objective: Objective, task: str) -> Objective:
    """The method's objective where an encoder's losses look: Patient-KD on [CLS]; for the embedding task, the
    soft term on the sentence embeddings by MSE (no temperature) and no hard term."""
    changes = dict(pkd_position=0)
    if task == "embedding":
        changes.update(hard=0.0, soft_loss="mse", temperature=1.0)
    objective = dataclasses.replace(objective, **changes)
    if not (objective.soft or objective.hard or objective.cosine or objective.hidden or objective.attention
            or objective.embedding):
        raise ArgumentError(f"every loss of this objective has weight 0 for kd_task {task}: nothing to learn")
    return objective


def encoder_projections(objective: Objective, task: str, student_width: int,
                        teacher_width: int) -> Optional[nn.ModuleDict]:
    try:
        projections = build_projections(objective, student_width, teacher_width)
    except ValueError as e:
        raise ArgumentError(str(e)) from e
    if task == "embedding" and objective.soft and student_width != teacher_width:
        projections = projections if projections is not None else nn.ModuleDict()
        projections[SENTENCE] = nn.Linear(student_width, teacher_width)
    return projections


# ---------------------------------------------------------------- data

def task_record(record: Record, spec: DatasetSpec) -> TaskRecord:
    """A record's text (the alpaca prompt column), label (the response column, if any) and split field."""
    if spec.formatting != "alpaca":
        raise DataError(f"{record.source}: dataset {spec.name!r} is {spec.formatting} data; an encoder's kd reads "
                        f"alpaca records (the text in the prompt column, a label in the response column)")
    columns = {**ALPACA_COLUMNS, **spec.columns}
    text, label = record.data.get(columns["prompt"]), record.data.get(columns["response"])
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{record.source}: column {columns['prompt']!r} must hold the text, a non-empty string "
                        f"(columns present: {sorted(record.data)})")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise DataError(f"{record.source}: column {columns['response']!r} (the label) must be a non-empty string, "
                        f"got {label!r:.80}")
    split = record.data.get("split")
    return TaskRecord(text.strip(), label.strip() if label else None, None if split is None else str(split),
                      record.source)


def read_task_records(args, key: str) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """The records of the datasets named by `key` (dataset or eval_dataset): (split "train" or no split field,
    every other split)."""
    records = read_examples(args.dataset_dir, args.names(key), task_record, args.max_samples, args.skip_bad_lines,
                            ReadReport())
    training = [r for r in records if r.split in (None, "train")]
    held = [r for r in records if r.split not in (None, "train")]
    if held and key == "dataset":
        logger.info("%d records of %s whose split is not 'train' are held out of training", len(held),
                    args.dataset)
    return training, held


def embedding_data(args) -> tuple[list[Sentence], list[Sentence]]:
    def sentences(records: list[TaskRecord]) -> list[Sentence]:
        return [Sentence(s) for s in dict.fromkeys(s for r in records for s in split_sentences(r.text))]

    training, _ = read_task_records(args, "dataset")
    examples = sentences(training)
    if not examples:
        raise DataError(f"no training sentences in {args.dataset} (every record is held out by its split field)")
    if args.eval_dataset:
        training_eval, held = read_task_records(args, "eval_dataset")
        return examples, sentences(held or training_eval)
    return shuffle_and_split(examples, args.val_size, args.seed, "sentences")


def classification_data(args) -> tuple[list[Sentence], list[Sentence], list[str], list[Sentence]]:
    """(training examples, evaluation examples, label names, the dataset's held-out test examples)."""
    training, test = read_task_records(args, "dataset")
    labels = sorted({r.label for r in training + test if r.label is not None})
    missing = next((r for r in training + test if r.label is None), None)
    if missing is not None:
        raise DataError(f"{missing.source}: kd_task classification needs a label in every record (the alpaca "
                        f"response column)")
    if len(labels) < 2:
        raise DataError(f"kd_task classification needs two or more labels in {args.dataset}, found {labels}")

    def examples(records: list[TaskRecord]) -> list[Sentence]:
        unknown = next((r for r in records if r.label not in labels), None)
        if unknown is not None:
            raise DataError(f"{unknown.source}: label {unknown.label!r} is not among the training data's {labels}")
        return [Sentence(r.text, labels.index(r.label)) for r in records]

    if not training:
        raise DataError(f"no training records in {args.dataset} (every record is held out by its split field)")
    if args.eval_dataset:
        training_eval, held = read_task_records(args, "eval_dataset")
        train, held_out = examples(training), examples(held or training_eval)
    else:
        train, held_out = shuffle_and_split(examples(training), args.val_size, args.seed, "examples")
    return train, held_out, labels, examples(test)


@torch.no_grad()
def teacher_probe(teacher: nn.Module, tokenizer, train: list[Sentence], test: list[Sentence], labels: list[str],
                  max_length: int) -> SentenceClassifier:
    """The teacher's head: a linear probe on its frozen sentence embeddings of the training examples."""
    embed = partial(sentence_embeddings, teacher, tokenizer, batch_size=32, max_length=max_length)
    vectors = embed([s.text for s in train])
    targets = torch.tensor([s.label for s in train], device=vectors.device)
    probe = train_linear_probe(vectors, targets, labels)
    report = f"train accuracy {accuracy(probe(vectors).argmax(-1), targets):.4f} ({len(train)} examples)"
    if test:
        test_vectors = embed([s.text for s in test])
        report += f", test accuracy {accuracy(probe(test_vectors).argmax(-1).cpu(), [s.label for s in test]):.4f} " \
                  f"({len(test)} held-out examples)"
    logger.info("teacher's linear probe over %s: %s", labels, report)
    return probe


def collate_sentences(rows: list[Sentence], tokenizer, max_length: int) -> dict:
    """A BERT batch: input_ids and attention_mask padded on the right, cut at max_length; labels if any."""
    encoded = tokenizer([row.text for row in rows], padding=True, truncation=True, max_length=max_length,
                        padding_side="right", return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if rows and rows[0].label != NO_LABEL:
        batch["labels"] = torch.tensor([row.label for row in rows])
    return batch


# ---------------------------------------------------------------- the step

def encoder_step(model, batch: dict, teacher: nn.Module, objective: Objective,
                 teacher_head: Optional[SentenceClassifier] = None) -> StepOutput:
    """One batch: the task's predictions (sentence embeddings, or class logits when the teacher has a head) and
    the method's terms through objective.distillation_loss."""
    student = run_model(model, batch, objective)
    with torch.no_grad():
        teacher_out = run_model(teacher, batch, objective)
    mask = batch["attention_mask"]
    projections = getattr(model, PROJECTIONS, None)
    metrics = {}
    if teacher_head is None:
        pooled = mean_pooled(student.logits.float(), mask)
        if projections is not None and SENTENCE in projections:
            pooled = projections[SENTENCE](pooled)
        predicted, target = F.normalize(pooled, p=2, dim=-1), sentence_vectors(teacher_out.logits, mask)
        hard = predicted.new_zeros(())
    else:
        predicted = getattr(model, CLASSIFIER)(sentence_vectors(student.logits, mask))
        target = teacher_head(sentence_vectors(teacher_out.logits, mask))
        hard = F.cross_entropy(predicted, batch["labels"])
        metrics = {"ce_loss": float(hard.detach()),
                   "accuracy": float((predicted.argmax(-1) == batch["labels"]).float().mean())}
    pairs = encoder_pairs(mask) if objective.attention else None
    loss, terms = distillation_loss(objective, Outputs(predicted, student.seen), Outputs(target, teacher_out.seen),
                                    hard, None, mask, pairs, projections)
    return StepOutput(loss, int(mask.sum()), {**terms, **metrics}, weight=len(mask))
