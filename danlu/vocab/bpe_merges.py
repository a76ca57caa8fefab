"""New pieces for a BPE tokenizer.json: each one a vocabulary entry and the merge that builds it.

A BPE tokenizer only ever produces a piece by a merge, so a piece in the vocabulary without one is never used.
The merges are appended after the old ones: the old merges keep their priority, so a piece's old tokens form
first and the new merges join them afterwards. A learned piece gets the merge of the two tokens the extended
tokenizer leaves for it, which is the trainer's own pair whenever the old merges cut the piece as the trainer
did, and otherwise the pair that still makes the piece one token. A piece left in three or more tokens (an old
merge crossing the place the trainer joined) cannot be reached by one merge and is left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class MergeExtension:
    added: list[str] = field(default_factory=list)  # pieces added, in id order
    unreachable: list[str] = field(default_factory=list)  # learned pieces no single merge can produce


def bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The tokens a BPE model leaves for one pre-tokenized word: from its characters, join the adjacent pair of
    lowest rank (the leftmost on a tie) until no pair has a merge, as `tokenizers`' BPE does.

    Used while merges are being added, where building a `tokenizers` model for every piece would cost a second
    each; tests/vocab checks the result against `tokenizers` itself."""
    symbols = list(word)
    while len(symbols) > 1:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not ranked:
            break
        _, i = min(ranked)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def append_merges(model: dict, pieces: Iterable[str], first_id: int) -> MergeExtension:
    """Add `pieces` (in the tokenizer's own alphabet: byte-level characters or '▁'-spaced text) that the
    vocabulary lacks to a tokenizer.json "model" of type BPE, in place; ids count up from `first_id`.

    Single characters come first, as base symbols (the characters of a byte_fallback model's unknown script);
    the other pieces follow in the order given, the order they were learned in, so that the pieces a piece is
    made of are there before it."""
    _check_plain_bpe(model)
    vocab, merges = model["vocab"], model["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)  # older tokenizer.json: "a b"
    ranks = {_pair(m): rank for rank, m in enumerate(merges)}
    result, next_id = MergeExtension(), first_id
    ordered = sorted(dict.fromkeys(pieces), key=lambda p: len(p) > 1)  # stable: learned order otherwise kept
    for piece in ordered:
        if piece in vocab:
            continue
        if len(piece) > 1:
            parts = bpe_split(piece, ranks) if all(c in vocab for c in piece) else []
            if len(parts) != 2:
                result.unreachable.append(piece)
                continue
            ranks[tuple(parts)] = len(merges)
            merges.append(" ".join(parts) if as_strings else list(parts))
        vocab[piece] = next_id
        next_id += 1
        result.added.append(piece)
    return result


def pin_added_tokens(spec: dict) -> None:
    """Write the added tokens a tokenizer.json keeps outside its model's vocabulary (Qwen's <|im_end|>, ...) into
    that vocabulary at their ids, in place. `tokenizers` ignores the ids written in "added_tokens" and numbers
    such tokens after the model's vocabulary, so a grown vocabulary would move them onto the new pieces' ids.
    They are still matched as added tokens before BPE; no merge makes them."""
    vocab = spec["model"]["vocab"]
    for token in spec.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])


def _pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return tuple(merge)


def _check_plain_bpe(model: dict) -> None:
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer's model is {model.get('type')!r}: learned pieces are added as BPE "
                         f"merges, so --train-merges needs a BPE tokenizer; use --add-tokens for this one")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("the tokenizer's BPE marks word pieces (continuing_subword_prefix / end_of_word_suffix); "
                         "--train-merges supports byte-level and sentencepiece-style BPE only; use --add-tokens")
