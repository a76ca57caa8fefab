"""Build the training and validation sets named by `--dataset` from `--dataset_dir`."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from danlu.data.files import DataError, ReadReport, Record, read_records
from danlu.data.formats import DatasetSpec, find_spec, load_dataset_info, to_example
from danlu.data.supervised import TokenizeReport, tokenize_example
from danlu.tokenization.chat import TemplateChoice


@dataclass
class PreparedData:
    train: list  # Tokenized for sft; TokenizedPair / TokenizedFeedback for rm, dpo / kto (danlu.data.preference)
    eval: list
    read: ReadReport = field(default_factory=ReadReport)
    tokenized: TokenizeReport = field(default_factory=TokenizeReport)


def validation_count(val_size: float, total: int, unit: str) -> int:
    """How many of `total` items go to validation: a fraction (at least one) or a whole number (LLaMA-Factory)."""
    n_eval = int(val_size) if val_size >= 1 else int(round(total * val_size))
    if val_size and n_eval == 0:
        n_eval = 1
    if n_eval >= total:
        raise DataError(f"val_size={val_size} leaves no training {unit} out of {total}")
    return n_eval


def read_examples(dataset_dir: str, names: list[str], convert: Callable[[Record, DatasetSpec], object],
                  max_samples: Optional[int], skip_bad_lines: bool, read: ReadReport) -> list:
    """The records of each named dataset (the first max_samples of each), in order, made examples by
    `convert` (to_example for sft, to_preference_example / to_feedback_example for rm, dpo / kto)."""
    specs = load_dataset_info(Path(dataset_dir))
    examples = []
    for name in names:
        spec = find_spec(specs, name, Path(dataset_dir))
        records = read_records(Path(dataset_dir) / spec.file_name, skip_bad_lines, read)
        if max_samples is not None:
            records = records[:max_samples]
        examples += [convert(r, spec) for r in records]
    return examples


def shuffle_and_split(items: list, val_size: float, seed: int, unit: str) -> tuple[list, list]:
    """Training and validation items: shuffled with the seed, then the first validation_count are held out."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = validation_count(val_size, len(items), unit)
    return items[n_eval:], items[:n_eval]


def prepare_sft_data(tokenizer, dataset_dir: str, names: list[str], template: TemplateChoice, cutoff_len: int,
                     max_samples: Optional[int] = None, val_size: float = 0.0, seed: int = 42,
                     train_on_prompt: bool = False, skip_bad_lines: bool = False) -> PreparedData:
    read = ReadReport()
    examples = read_examples(dataset_dir, names, to_example, max_samples, skip_bad_lines, read)
    tokenized = TokenizeReport()
    data = [t for e in examples
            if (t := tokenize_example(tokenizer, e, template, cutoff_len, train_on_prompt, tokenized)) is not None]
    if not data:
        raise DataError(f"no training examples left from {', '.join(names)} in {dataset_dir} "
                        f"({len(examples)} read, {tokenized.dropped} dropped: nothing to learn within "
                        f"cutoff_len={cutoff_len})")
    train, held_out = shuffle_and_split(data, val_size, seed, "examples")
    return PreparedData(train, held_out, read, tokenized)
