"""Vocabulary extension: new tokens for a model's tokenizer, and embedding rows for them (see extend.py)."""
from danlu.vocab.extend import VocabReport, extend_vocabulary

__all__ = ["VocabReport", "extend_vocabulary"]
