"""Sentence embeddings from an encoder's hidden states, as sentence-transformers' all-MiniLM-L6-v2 makes them.

Its pipeline (modules.json) is Transformer -> Pooling (mean over the real tokens, 1_Pooling/config.json) ->
Normalize (L2), with texts cut at max_seq_length 256 tokens (sentence_bert_config.json).

Here beside the model rather than in evaluation or distillation: pooling is what an encoder's output becomes,
and both of those (and anything that compares sentences) read it from one place. It needs only the model and
a Hugging Face tokenizer object, so it imports nothing above danlu.models.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, hidden]: the mean of the hidden states of the real tokens (mask 1)."""
    mask = attention_mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_vectors(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, hidden] float32: mean-pooled over the real tokens, L2-normalised (what
    sentence_embeddings returns, here with gradients)."""
    return F.normalize(mean_pooled(hidden.float(), attention_mask), p=2, dim=-1)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: Sequence[str], batch_size: int = 32,
                        normalize: bool = True, max_length: int = MAX_SEQ_LENGTH) -> torch.Tensor:
    """[len(sentences), hidden] float32 embeddings: the encoder's last hidden states mean-pooled over each
    sentence's tokens, L2-normalised unless `normalize` is False; sentences longer than `max_length` tokens
    are cut, as sentence-transformers does."""
    if model.config.causal:
        raise ValueError(f"sentence_embeddings needs an encoder (causal=False); {model.config.name or 'this model'} "
                         f"is a decoder")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        # right padding whatever the tokenizer was saved with: the learned positions count from the first token
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, padding_side="right", return_tensors="pt").to(device)
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch.get("token_type_ids"))
        out.append(sentence_vectors(hidden, batch["attention_mask"]) if normalize
                   else mean_pooled(hidden.float(), batch["attention_mask"]))
    if not out:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(out)
