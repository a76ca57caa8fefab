"""Extend a model's vocabulary for new text, the seed's 中文继续预训练汉化指引 (Chinese continued pretraining):

1. get the pieces: listed in a file, or learned on one's own corpus (danlu.vocab.train_pieces);
2. add them to the model's tokenizer with new ids after the old ones, so that it uses them on new text;
3. grow `model.embed_tokens` and an untied `lm_head`: a new row is the mean of the old rows of the tokens the old
   tokenizer cuts the new token into ("天气" = mean("天", "气")); config.json's vocab_size follows;
4. save a Hugging Face directory that `danlu train --stage pt` continues pretraining from.

How a piece enters the tokenizer depends on the tokenizer:
- learned pieces, tokenizer.json BPE (SmolLM2's byte-level BPE): each piece becomes a vocabulary entry and the
  merge that builds it, appended after the old merges (danlu.vocab.bpe_merges). That is the byte-level BPE
  form of the seed's sentencepiece merge: the pieces take part in ordinary BPE, inside words and next to
  other text, and decode as any token does.
- learned pieces, sentencepiece tokenizer.model (LLaMA's): the pieces are appended to the ModelProto as the seed
  does (danlu.vocab.sentencepiece_model), and the same pieces, with the same ids, to the tokenizer.json that
  transformers reads, as merges; both files are saved.
- listed tokens (--add-tokens), any tokenizer: `tokenizer.add_tokens`, transformers' added tokens, which are
  matched in the text before BPE runs. Exact and simple for a list of words; note that an added token is
  matched anywhere, inside longer words too.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.load import load_pretrained, parse_dtype, resolve_source
from danlu.utils.progress import logger
from danlu.vocab.bpe_merges import append_merges, pin_added_tokens
from danlu.vocab.embeddings import grow_vocabulary, padded_size
from danlu.vocab.sentencepiece_model import append_pieces, read_model_proto
from danlu.vocab.text_files import read_corpus, read_token_file, tokens_per_character
from danlu.vocab.train_pieces import check_size, learn_bpe_pieces, learn_sentencepiece_pieces

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SENTENCEPIECE_FILE = "tokenizer.model"
MEASURED_DOCUMENTS = 10_000  # tokens per character: a sample of a large corpus tells as much as all of it


@dataclass
class VocabReport:
    """What `extend_vocabulary` did; `lines()` is what the CLI prints."""
    output: Path
    added: list[str] = field(default_factory=list)  # the new tokens as text, in id order
    added_ids: list[int] = field(default_factory=list)
    skipped_duplicates: int = 0  # repeated lines of the token file
    skipped_known: int = 0  # already one token of the old tokenizer
    unreachable: int = 0  # learned pieces no single merge produces (see danlu.vocab.bpe_merges)
    old_vocab_size: int = 0  # rows of the embedding
    new_vocab_size: int = 0
    tokens_per_char_before: Optional[float] = None
    tokens_per_char_after: Optional[float] = None

    def lines(self) -> list[str]:
        # A byte-level BPE also learns pieces of characters (the first bytes of 天): not worth showing.
        whole = [t for t in self.added if "\ufffd" not in t]
        shown = " ".join(whole[:20]) + (" ..." if len(whole) > 20 else "")
        lines = [f"added {len(self.added)} tokens: {shown}",
                 f"skipped {self.skipped_duplicates + self.skipped_known + self.unreachable}: "
                 f"{self.skipped_duplicates} duplicates, {self.skipped_known} already in the vocabulary, "
                 f"{self.unreachable} unreachable by one merge",
                 f"vocabulary size {self.old_vocab_size} -> {self.new_vocab_size}"]
        if self.tokens_per_char_before is not None:
            lines.append(f"tokens per character {self.tokens_per_char_before:.3f} -> "
                         f"{self.tokens_per_char_after:.3f}")
        return lines + [f"wrote {self.output}"]


@dataclass
class NewTokens:
    """The extended tokenizer and, for each new id, the old ids its text was cut into."""
    tokenizer: Any
    sources: dict[int, list[int]]
    added: list[str]
    skipped_duplicates: int = 0
    skipped_known: int = 0
    unreachable: int = 0
    sentencepiece_model: Optional[bytes] = None  # the extended tokenizer.model, when the model has one


def extend_vocabulary(model, output, add_tokens=None, corpus=None, size: Optional[int] = None,
                      eval_text=None, pad_to_multiple_of: Optional[int] = None,
                      dtype: str | torch.dtype = torch.float32, force: bool = False) -> VocabReport:
    """Add the tokens listed in `add_tokens` (a file, one per line), or the pieces of a `size`-piece vocabulary
    learned on `corpus` (.txt lines or .jsonl "text"), to `model` (a directory, .gguf or hub id; None: the
    bundled model), and write the extended model to `output` in `dtype`. Tokens per character are measured on
    `eval_text`, else on the corpus (their first MEASURED_DOCUMENTS documents). Bad input raises ValueError
    (CheckpointError for the model), before any weight is read where it can be."""
    _check_arguments(add_tokens, corpus, size, pad_to_multiple_of, Path(output), force)
    dtype = parse_dtype(dtype)
    tokens = read_token_file(add_tokens) if add_tokens is not None else None
    texts = read_corpus(corpus) if corpus is not None else None
    measured = read_corpus(eval_text) if eval_text is not None else texts
    source = _source_with_tokenizer(model)

    # Read in the dtype written: old rows are copied as they are, new ones averaged in float32 (grown_rows).
    lm = load_pretrained(source, dtype=dtype, device="cpu")
    if lm.tokenizer is None:
        raise CheckpointError(f"{source}: no tokenizer found; vocab extend adds tokens to the model's tokenizer")
    if tokens is not None:
        new = added_token_extension(lm.tokenizer, tokens)
    else:
        new = learned_piece_extension(lm.tokenizer, texts, size, _sentencepiece_file(source), str(corpus))
    if not new.added:
        raise ValueError(f"{add_tokens or corpus}: nothing to add, every token is already in the vocabulary")
    state, config = grow_vocabulary(lm.model.state_dict(), lm.config, new.sources, pad_to_multiple_of)
    logger.info("writing %s (%d tokens added, vocabulary %d -> %d)", output, len(new.added),
                lm.config.vocab_size, config.vocab_size)
    files = new.tokenizer if new.sentencepiece_model is None else \
        TokenizerWithModelFile(new.tokenizer, new.sentencepiece_model)
    save_hf_checkpoint(state, config, Path(output), dtype, tokenizer=files,
                       generation_config=dict(lm.generation_defaults))
    report = VocabReport(Path(output), new.added, list(new.sources), new.skipped_duplicates, new.skipped_known,
                         new.unreachable, lm.config.vocab_size, config.vocab_size)
    if measured is not None:
        sample = measured[:MEASURED_DOCUMENTS]
        report.tokens_per_char_before = tokens_per_character(lm.tokenizer, sample)
        report.tokens_per_char_after = tokens_per_character(new.tokenizer, sample)
    return report


def _check_arguments(add_tokens, corpus, size, pad_to_multiple_of, output: Path, force: bool) -> None:
    if (add_tokens is None) == (corpus is None):
        raise ValueError("give either a token file (--add-tokens) or a corpus to learn pieces on (--train-merges)")
    if corpus is not None:
        if size is None:
            raise ValueError("--train-merges needs --size, the number of pieces to learn")
        check_size(size)
    padded_size(1, pad_to_multiple_of)  # raises on a bad multiple
    if output.exists() and not force:
        raise ValueError(f"{output}: already exists; pass --force to replace it")


def added_token_extension(old, tokens: list[str]) -> NewTokens:
    """`tokens` as transformers added tokens; repeats, and texts the old tokenizer already makes one token of
    (or has in its vocabulary), are skipped."""
    unique = list(dict.fromkeys(tokens))
    vocab = old.get_vocab()
    old_ids = {t: old(t, add_special_tokens=False)["input_ids"] for t in unique}
    new_tokens = [t for t in unique if t not in vocab and len(old_ids[t]) != 1]
    tokenizer = copy_tokenizer(old)
    tokenizer.add_tokens(new_tokens)
    sources = {tokenizer.convert_tokens_to_ids(t): old_ids[t] for t in new_tokens}
    return NewTokens(tokenizer, sources, new_tokens, skipped_duplicates=len(tokens) - len(unique),
                     skipped_known=len(unique) - len(new_tokens))


def learned_piece_extension(old, texts: list[str], size: int, sentencepiece_file: Optional[Path],
                            source: str) -> NewTokens:
    """Learn `size` pieces on `texts` and add those the old tokenizer lacks as BPE merges (and, when the model
    has a sentencepiece tokenizer.model, as pieces of it)."""
    backend = getattr(old, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer ({type(old).__name__}) has no tokenizer.json backend; --train-merges "
                         f"adds merges to one; use --add-tokens")
    spec = json.loads(backend.to_str())
    proto = read_model_proto(sentencepiece_file) if sentencepiece_file is not None else None
    if proto is not None:
        pieces = learn_sentencepiece_pieces(proto, texts, size, source)
    else:
        pieces = learn_bpe_pieces(backend, texts, size)
    logger.info("learned %d pieces with %s on %s", len(pieces), "sentencepiece" if proto else "tokenizers' BPE",
                source)
    vocab = old.get_vocab()
    first_id = max(vocab.values()) + 1
    pin_added_tokens(spec)
    extension = append_merges(spec["model"], [p for p in pieces if p not in vocab], first_id)
    sources = {first_id + i: [t.id for t in backend.model.tokenize(piece)]
               for i, piece in enumerate(extension.added)}
    texts_added = [old.convert_tokens_to_string([piece]) for piece in extension.added]
    known = len(pieces) - len(extension.added) - len(extension.unreachable)
    return NewTokens(copy_tokenizer(old, spec), sources, texts_added, skipped_known=known,
                     unreachable=len(extension.unreachable),
                     sentencepiece_model=None if proto is None else
                     extended_sentencepiece_model(proto, extension.added, old, first_id, sentencepiece_file))


def extended_sentencepiece_model(proto, pieces: list[str], old, first_id: int, path: Path) -> bytes:
    """tokenizer.model with `pieces` appended, checked to give them the ids tokenizer.json gives them."""
    added_tokens = {i: (t.content, t.special) for i, t in old.added_tokens_decoder.items()}
    append_pieces(proto, pieces, added_tokens)
    if len(proto.pieces) != first_id + len(pieces):
        raise CheckpointError(f"{path} has {len(proto.pieces) - len(pieces)} pieces with the tokenizer's added "
                              f"tokens, the tokenizer {first_id} tokens: the new pieces' ids would differ between "
                              f"tokenizer.model and tokenizer.json")
    return proto.SerializeToString()


def copy_tokenizer(tokenizer, spec: Optional[dict] = None):
    """A fresh copy of a transformers tokenizer, through its saved files, with tokenizer.json replaced by
    `spec` if given (its chat template, special tokens and settings are kept)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if spec is not None:
            (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


@dataclass
class TokenizerWithModelFile:
    """A tokenizer whose save_pretrained also writes the extended sentencepiece tokenizer.model (transformers 5
    saves only tokenizer.json), so that save_hf_checkpoint writes both in one complete directory."""
    tokenizer: Any
    model_proto: bytes

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        (Path(directory) / SENTENCEPIECE_FILE).write_bytes(self.model_proto)


def _source_with_tokenizer(model) -> Path:
    """The model's local path (a hub id downloaded), refused before its weights are read if it has no tokenizer."""
    source = resolve_source(model)
    if isinstance(source, str):
        raise CheckpointError(f"{model}: a preset has random weights and no tokenizer; vocab extend needs a model "
                              f"with its tokenizer")
    if source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{source}: no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); vocab extend "
                              f"adds tokens to the model's tokenizer, so save it beside the weights")
    return source


def _sentencepiece_file(source: Path) -> Optional[Path]:
    path = source / SENTENCEPIECE_FILE
    return path if source.is_dir() and path.is_file() else None
