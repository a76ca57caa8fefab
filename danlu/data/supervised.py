"""SFT examples to token ids and labels: only the assistant's answers are trained (-100 elsewhere).

The conversation is rendered with the same chat template chat and serving use (danlu.tokenization),
so a model trained here answers the same way in `danlu chat`.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

from danlu.data.formats import Example
from danlu.tokenization.chat import TemplateChoice, encode_pieces, render_chat, render_pieces

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    document_ids: Optional[list[int]] = None  # set on packed rows: which example each token belongs to


@dataclass
class TokenizeReport:
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation


def answer_spans(tokenizer, example: Example, template: TemplateChoice) -> tuple[list[str], list[tuple[int, int]]]:
    """The conversation in LLaMA-Factory's encoding pieces and the character spans, in their concatenation, of
    each assistant answer (with its end marker)."""
    def render(messages, add_generation_prompt):
        return render_chat(tokenizer, messages, template, example.system, add_generation_prompt, for_training=True)

    pieces = render_pieces(tokenizer, example.messages, template, example.system, add_generation_prompt=False,
                           for_training=True)
    text = "".join(pieces)
    spans = []
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        before = render(example.messages[:i], add_generation_prompt=True)
        through = render(example.messages[:i + 1], add_generation_prompt=False)
        if not text.startswith(through) or not through.startswith(before):
            raise ValueError(f"{example.source}: the chat template does not render turns as a growing prefix, "
                             f"so answers cannot be located; choose another --template")
        spans.append((len(before), len(through)))
    return pieces, spans


def tokenize_example(tokenizer, example: Example, template: TemplateChoice, cutoff_len: int,
                     train_on_prompt: bool = False, report: Optional[TokenizeReport] = None) -> Optional[Tokenized]:
    """Token ids and labels as LLaMA-Factory's supervised processor makes them: each piece encoded on its own
    (render_pieces; a model's own template is cut only around answers), answers learned."""
    pieces, spans = answer_spans(tokenizer, example, template)
    text = "".join(pieces)
    cuts = sorted({0, len(text), *accumulate(len(piece) for piece in pieces), *(b for span in spans for b in span)})
    ids, labels = [], []
    for start, piece_ids in zip(cuts, encode_pieces(tokenizer, [text[a:b] for a, b in zip(cuts, cuts[1:])])):
        learned = train_on_prompt or any(s <= start < e for s, e in spans)
        ids += piece_ids
        labels += piece_ids if learned else [IGNORE_INDEX] * len(piece_ids)
    if len(ids) > cutoff_len:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if report is not None:
            report.truncated += 1
    if all(label == IGNORE_INDEX for label in labels[1:]):
        if report is not None:
            report.dropped += 1
        return None
    return Tokenized(ids, labels)


def pack_examples(examples: list[Tokenized], cutoff_len: int) -> list[Tokenized]:
    """Put several examples in one row of at most cutoff_len tokens (first fit, longest first).

    Each keeps its own document id, so attention and positions stay within it (see Transformer.forward).
    """
    rows: list[list[Tokenized]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(example)
                room[i] -= n
                break
        else:
            rows.append([example])
            room.append(cutoff_len - n)
    packed = []
    for row in rows:
        packed.append(Tokenized([t for e in row for t in e.input_ids], [t for e in row for t in e.labels],
                                [i + 1 for i, e in enumerate(row) for _ in e.input_ids]))
    return packed
