"""Preference data to tokens: pairs for rm and dpo, judged answers with their KL counterparts for kto.

Each side is the prompt and one answer rendered with the same chat template as sft (tokenize_example), so the
prompt's tokens are identical on both sides and only the final answer is learned. Bad items are counted and
left out (PreferenceReport) rather than stopping a run; only an empty result is an error.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from danlu.data.dataset import PreparedData, read_examples, shuffle_and_split
from danlu.data.files import DataError, ReadReport
from danlu.data.formats import Example, FeedbackExample, PreferenceExample, to_feedback_example, to_preference_example
from danlu.data.supervised import IGNORE_INDEX, Tokenized, TokenizeReport, tokenize_example
from danlu.tokenization.chat import TemplateChoice


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized


@dataclass
class TokenizedFeedback:
    completion: Tokenized  # the prompt and its judged answer
    kl: Tokenized  # the same prompt with another item's answer: KTO's estimate of the KL to the reference
    desirable: bool


@dataclass
class PreferenceReport(TokenizeReport):
    """Per pair (or kto item): `truncated` if a side was cut at cutoff_len, `dropped` if a side had no answer
    token left, `identical` if chosen and rejected were the same tokens (nothing to prefer)."""
    identical: int = 0


def tokenize_answer(tokenizer, example: Example, template: TemplateChoice,
                    cutoff_len: int) -> tuple[Optional[Tokenized], bool]:
    """The conversation's tokens with only its last answer learned, and whether cutoff_len cut it.

    Earlier answers are context, as in LLaMA-Factory's pairwise and feedback processors (encode_oneturn). They
    are masked before truncating, so a cut that removes the last answer leaves nothing learned.
    """
    full = tokenize_example(tokenizer, example, template, cutoff_len=sys.maxsize)
    if full is None:
        return None, False
    start = last_answer_start(full.labels)
    ids, labels = full.input_ids, [IGNORE_INDEX] * start + full.labels[start:]
    truncated = len(ids) > cutoff_len
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, truncated
    return Tokenized(ids, labels), truncated


def last_answer_start(labels: list[int]) -> int:
    """Where the last run of learned tokens (the final answer with its end marker) begins."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def prompt_of(example: Tokenized) -> Tokenized:
    """The conversation up to its last answer (with the assistant's header): what the policy completes."""
    start = last_answer_start(example.labels)
    return Tokenized(example.input_ids[:start], [])


def tokenize_sides(tokenizer, examples: list[Example], template: TemplateChoice, cutoff_len: int,
                   report: PreferenceReport) -> Optional[list[Tokenized]]:
    """Every side of one pair or kto item, or None (counted as dropped) when a side has no answer left."""
    sides = [tokenize_answer(tokenizer, e, template, cutoff_len) for e in examples]
    if any(truncated for _, truncated in sides):
        report.truncated += 1
    if any(tokens is None for tokens, _ in sides):
        report.dropped += 1
        return None
    return [tokens for tokens, _ in sides]


def tokenize_pair(tokenizer, pair: PreferenceExample, template: TemplateChoice, cutoff_len: int,
                  report: PreferenceReport) -> Optional[TokenizedPair]:
    sides = tokenize_sides(tokenizer, [pair.answered(pair.chosen), pair.answered(pair.rejected)], template,
                           cutoff_len, report)
    if sides is None:
        return None
    if sides[0].input_ids == sides[1].input_ids:  # the same text, or the same once cut at cutoff_len
        report.identical += 1
        return None
    return TokenizedPair(*sides)


def kl_answers(items: list[FeedbackExample]) -> list[str]:
    """The mismatched answer for each item's KL term: the previous item's answer, the first taking the last's
    (LLaMA-Factory's feedback processor: the responses rotated by one)."""
    answers = [item.answer for item in items]
    return answers[-1:] + answers[:-1]


def tokenize_feedback(tokenizer, item: FeedbackExample, kl_answer: str, template: TemplateChoice, cutoff_len: int,
                      report: PreferenceReport) -> Optional[TokenizedFeedback]:
    sides = tokenize_sides(tokenizer, [item.answered(item.answer), item.answered(kl_answer)], template,
                           cutoff_len, report)
    return None if sides is None else TokenizedFeedback(sides[0], sides[1], item.desirable)


def prepare_preference_data(tokenizer, dataset_dir: str, names: list[str], template: TemplateChoice,
                            cutoff_len: int, max_samples: Optional[int] = None, val_size: float = 0.0,
                            seed: int = 42, skip_bad_lines: bool = False) -> PreparedData:
    """Pairs (TokenizedPair) for rm and dpo from datasets with "ranking": true."""
    read, report = ReadReport(), PreferenceReport()
    pairs = read_examples(dataset_dir, names, to_preference_example, max_samples, skip_bad_lines, read)
    data = [t for p in pairs if (t := tokenize_pair(tokenizer, p, template, cutoff_len, report)) is not None]
    _require_some(data, names, dataset_dir, len(pairs), "pairs", report, cutoff_len)
    train, held_out = shuffle_and_split(data, val_size, seed, "pairs")
    return PreparedData(train, held_out, read, report)


def prepare_feedback_data(tokenizer, dataset_dir: str, names: list[str], template: TemplateChoice,
                          cutoff_len: int, max_samples: Optional[int] = None, val_size: float = 0.0,
                          seed: int = 42, skip_bad_lines: bool = False) -> PreparedData:
    """Judged answers (TokenizedFeedback) for kto from datasets with a kto_tag column. The KL answers are
    paired in reading order, before shuffling: LLaMA-Factory's order when no val_size shuffles its split."""
    read, report = ReadReport(), PreferenceReport()
    items = read_examples(dataset_dir, names, to_feedback_example, max_samples, skip_bad_lines, read)
    data = [t for item, kl in zip(items, kl_answers(items))
            if (t := tokenize_feedback(tokenizer, item, kl, template, cutoff_len, report)) is not None]
    _require_some(data, names, dataset_dir, len(items), "examples", report, cutoff_len)
    train, held_out = shuffle_and_split(data, val_size, seed, "examples")
    return PreparedData(train, held_out, read, report)


def _require_some(data: list, names: list[str], dataset_dir: str, n_read: int, unit: str,
                  report: PreferenceReport, cutoff_len: int) -> None:
    if not data:
        raise DataError(f"no training {unit} left from {', '.join(names)} in {dataset_dir} ({n_read} read, "
                        f"{report.identical} identical: chosen equals rejected, {report.dropped} dropped: no "
                        f"answer left within cutoff_len={cutoff_len})")
