"""The text files vocabulary extension reads: a list of tokens, a corpus, and how finely a tokenizer cuts it."""
from __future__ import annotations

from pathlib import Path

from danlu.data.files import DataError, read_records


def read_token_file(path: Path) -> list[str]:
    """One token per line, UTF-8, surrounding whitespace stripped; blank lines ignored, order and repeats kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such token file (one token per line)")
    tokens = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {e.start} of the line)") from None
            if "\x00" in line:
                raise DataError(f"{path}:{line_no}: a NUL character; is this a binary file?")
            if line.strip():
                tokens.append(line.strip())
    if not tokens:
        raise DataError(f"{path}: no tokens (expected one token per line; blank lines are ignored)")
    return tokens


def read_corpus(path: Path, column: str = "text") -> list[str]:
    """The documents of a corpus: the non-empty lines of a .txt file, or the `column` field of each record of a
    .jsonl (.json, .csv, .parquet) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such corpus file (a .txt file, or .jsonl with a {column!r} field)")
    if path.suffix == ".txt":
        try:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    else:
        texts = []
        for record in read_records(path):
            text = record.data.get(column)
            if not isinstance(text, str):
                raise DataError(f"{record.source}: expected a string {column!r} field")
            if text.strip():
                texts.append(text)
    if not texts:
        raise DataError(f"{path}: the corpus holds no text")
    return texts


def tokens_per_character(tokenizer, texts: list[str]) -> float:
    """Tokens the tokenizer makes of `texts` (no special tokens) per character: lower is a better fit."""
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / sum(len(text) for text in texts)
