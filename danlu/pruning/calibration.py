"""Calibration text for importance scores: a .txt or .jsonl file cut into rows of token ids."""
from __future__ import annotations

from pathlib import Path

import torch

from danlu.data.files import read_records

TEXT_FIELD = "text"


def read_calibration_texts(path, flag: str = "--calibration") -> list[str]:
    """A .txt file as one text, or the "text" field of every line of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    if path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif path.suffix == ".jsonl":
        texts = []
        for record in read_records(path):
            if not isinstance(record.data.get(TEXT_FIELD), str):
                raise ValueError(f"{record.source}: {flag} needs a string field {TEXT_FIELD!r} on every line")
            texts.append(record.data[TEXT_FIELD])
    else:
        raise ValueError(f"{flag} {path}: expected a .txt or .jsonl file, got {path.suffix or 'no suffix'!r}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{flag} {path}: holds no text")
    return texts


def calibration_batches(tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 4,
                        max_tokens: int = 8192) -> list[torch.Tensor]:
    """The texts' tokens, one after the other (an end-of-sequence token between two), cut into rows of seq_len
    (the last row shorter rather than padded), at most max_tokens of them, `batch_size` rows per batch."""
    ids: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the calibration text has fewer than 2 tokens")
    full = len(ids) // seq_len * seq_len
    rows = torch.tensor(ids[:full]).view(-1, seq_len) if full else torch.empty(0, seq_len, dtype=torch.long)
    batches = list(rows.split(batch_size)) if len(rows) else []
    if full < len(ids):
        batches.append(torch.tensor([ids[full:]]))
    return batches
