"""Continued pretraining data: plain text tokenized once into a memory-mapped token cache, cut into blocks.

The cache is written while reading (one line at a time), so a corpus larger than memory works, and it is
reused by later runs with the same files and tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from danlu.data.dataset import validation_count
from danlu.data.files import DataError, read_records
from danlu.data.formats import find_spec, load_dataset_info
from danlu.data.supervised import Tokenized
from danlu.utils.atomic import atomic_write_text, temporary_sibling
from danlu.utils.progress import logger, progress


def _documents(path: Path, column: str):
    """Yield the documents of a file: each non-empty line of a .txt, or the text column of each record."""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line.rstrip("\n")
        return
    for record in read_records(path):
        text = record.data.get(column)
        if not isinstance(text, str):
            raise DataError(f"{record.source}: column {column!r} must be a string of text")
        yield text


def _cache_key(sources: list[tuple[Path, str]], tokenizer) -> str:
    h = hashlib.sha256()
    for f, column in sources:
        stat = f.stat()
        h.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{column}".encode())
    h.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def build_token_cache(tokenizer, sources: list[tuple[Path, str]], cache_dir: Path) -> np.memmap:
    """All documents' tokens, each followed by EOS, as a read-only memmap (built once, then reused).
    sources: each file with the column its text is in (json/jsonl)."""
    key = _cache_key(sources, tokenizer)
    data_path, meta_path = Path(cache_dir) / f"{key}.bin", Path(cache_dir) / f"{key}.json"
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        logger.info("reusing the token cache %s (%d tokens)", data_path, meta["tokens"])
        return np.memmap(data_path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # a name of this process's own: the ranks of a distributed run may build the same cache at once, and each
    # then renames its own complete file into place (the same bytes)
    partial = temporary_sibling(data_path)
    total = 0
    eos = tokenizer.eos_token_id
    bar = progress(desc="Tokenizing", unit="doc")
    with open(partial, "wb") as out:
        for file, column in sources:
            for text in _documents(file, column):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                np.asarray(ids, dtype=dtype).tofile(out)
                total += len(ids)
                bar.update(1)
    bar.close()
    os.replace(partial, data_path)
    atomic_write_text(meta_path, json.dumps({"tokens": total, "dtype": np.dtype(dtype).name,
                                             "files": [str(f) for f, _ in sources]}))
    logger.info("wrote the token cache %s (%d tokens)", data_path, total)
    return np.memmap(data_path, dtype=dtype, mode="r", shape=(total,))


class TokenBlocks:
    """Fixed-length blocks of the token stream, read from the memmap on demand."""

    def __init__(self, tokens: np.ndarray, block: int, start: int = 0, count: int | None = None):
        self.tokens, self.block, self.start = tokens, block, start
        self.count = len(tokens) // block - start if count is None else count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tokenized:
        if not 0 <= i < self.count:
            raise IndexError(i)
        begin = (self.start + i) * self.block
        ids = self.tokens[begin:begin + self.block].astype(np.int64).tolist()
        return Tokenized(ids, ids)


def prepare_pretrain_data(tokenizer, dataset_dir: str, names: list[str], cutoff_len: int, cache_dir: Path,
                          val_size: float = 0.0, max_samples: int | None = None):
    specs = load_dataset_info(Path(dataset_dir))
    sources = []  # each dataset's files with its own text column
    for name in names:
        spec = find_spec(specs, name, Path(dataset_dir))
        column = spec.columns.get("prompt", "text")
        path = Path(dataset_dir) / spec.file_name
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".json", ".jsonl")) if path.is_dir() else [path]
        sources += [(file, column) for file in files]
    tokens = build_token_cache(tokenizer, sources, cache_dir)
    n_blocks = len(tokens) // cutoff_len
    if max_samples is not None:
        n_blocks = min(n_blocks, max_samples)
    if n_blocks == 0:
        raise DataError(f"{', '.join(names)}: {len(tokens)} tokens make no block of cutoff_len={cutoff_len}")
    n_eval = validation_count(val_size, n_blocks, "blocks")
    return TokenBlocks(tokens, cutoff_len, n_eval, n_blocks - n_eval), TokenBlocks(tokens, cutoff_len, 0, n_eval)
