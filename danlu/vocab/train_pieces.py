"""Learn a vocabulary on a corpus, the way the model's own tokenizer was learned.

A sentencepiece model (tokenizer.model, LLaMA's) is retrained with sentencepiece and the old model's settings,
as the seed does; a tokenizer.json BPE (SmolLM2's byte-level BPE, GPT-2 style) is retrained with `tokenizers`'
BPE trainer behind the old normalizer and pre-tokenizer, so the learned pieces are in the old vocabulary's
alphabet and never cross a boundary the old tokenizer cuts at. Both return pieces in the order learned.
"""
from __future__ import annotations

import io
import json
import re
from typing import Iterable

# LLaMA's choice, and the seed's: leave the rarest 0.05% of characters to byte fallback.
CHARACTER_COVERAGE = 0.9995
NORMAL_PIECE = 1  # sentencepiece_model.proto: ModelProto.SentencePiece.Type.NORMAL


def check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"--size must be a positive number of pieces to learn, got {size!r}")


def is_byte_level(tokenizer_spec: dict) -> bool:
    """Whether a tokenizer.json pre-tokenizes to bytes (GPT-2's ByteLevel, alone or in a Sequence)."""
    return '"type": "ByteLevel"' in json.dumps(tokenizer_spec.get("pre_tokenizer"))


def learn_bpe_pieces(backend, texts: Iterable[str], size: int) -> list[str]:
    """Train a BPE of `size` pieces on `texts` behind `backend`'s (a `tokenizers.Tokenizer`) normalizer and
    pre-tokenizer. For a byte-level tokenizer the 256 byte symbols are the trainer's alphabet, given, not
    learned: they are left out, and `size` must leave room for merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    check_size(size)
    byte_level = is_byte_level(json.loads(backend.to_str()))
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    if size <= len(alphabet):
        raise ValueError(f"--size {size}: a byte-level BPE starts from {len(alphabet)} byte symbols, so it "
                         f"learns nothing below {len(alphabet) + 1} pieces; ask for more")
    learner = Tokenizer(models.BPE())
    learner.normalizer = backend.normalizer
    learner.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, special_tokens=[],
                                  show_progress=False)
    learner.train_from_iterator(texts, trainer)
    vocab = learner.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    return [p for p in pieces if not (byte_level and len(p) == 1)]


def learn_sentencepiece_pieces(old_proto, texts: Iterable[str], size: int, source: str) -> list[str]:
    """Train a sentencepiece model of `size` pieces on `texts` with the old model's type and normalization
    (`old_proto`: its ModelProto); return its normal pieces, best first (a BPE model's merged pieces in the
    order learned, then its characters)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    check_size(size)
    old_trainer, old_normalizer = old_proto.trainer_spec, old_proto.normalizer_spec
    learned = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=learned, vocab_size=size,
            model_type=model_pb2.TrainerSpec.ModelType.Name(old_trainer.model_type).lower(),
            character_coverage=CHARACTER_COVERAGE, normalization_rule_name=old_normalizer.name or "identity",
            add_dummy_prefix=old_normalizer.add_dummy_prefix,
            remove_extra_whitespaces=old_normalizer.remove_extra_whitespaces,
            split_digits=old_trainer.split_digits, byte_fallback=False, minloglevel=2)
    except RuntimeError as e:
        # e.g. "Vocabulary size is smaller than required_chars. 120 vs 298. Increase vocab_size ..."
        reason = re.sub(r"^.*?\] ", "", str(e)).strip()
        raise ValueError(f"--size {size}: sentencepiece cannot learn that vocabulary from {source}: {reason}") \
            from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(learned.getvalue())
    return [p.piece for p in proto.pieces if p.type == NORMAL_PIECE]
