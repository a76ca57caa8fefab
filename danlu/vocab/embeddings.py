"""Grow the token embedding and the lm_head for new token ids (pure tensors, no files)."""
from __future__ import annotations

import torch

from danlu.models.config import ModelConfig

EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def padded_size(size: int, multiple: int | None) -> int:
    if multiple is None:
        return size
    if multiple <= 0:
        raise ValueError(f"--pad-to-multiple-of must be a positive integer, got {multiple}")
    return -(-size // multiple) * multiple


def grown_rows(weight: torch.Tensor, sources: dict[int, list[int]], rows: int) -> torch.Tensor:
    """`weight` with `rows` rows: row i of `sources` is the mean of the old rows `sources[i]` (the seed's
    "天气" = mean("天", "气")); rows past the old ones that no token uses (padding) are the mean of all old rows.

    Why the mean and not zeros for padding: in the lm_head a row's logit is a dot product, and zero gives logit 0,
    which beats every token whose logit is negative; the mean gives the mean logit, and exp(mean logit) is at
    most the mean of exp(logit) (Jensen), so an id no tokenizer emits takes no more probability than an average
    token (J. Hewitt, "Initializing new word embeddings for pretrained language models", 2021)."""
    old_rows = weight.shape[0]
    if rows < old_rows or any(i >= rows for i in sources):
        raise ValueError(f"cannot shrink or overflow the embedding: {old_rows} rows, asked for {rows}")
    out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[:old_rows] = weight
    out[old_rows:] = weight.float().mean(0).to(weight.dtype)
    for token_id, ids in sources.items():
        if not ids or max(ids) >= old_rows:
            raise ValueError(f"new token id {token_id}: its old pieces {ids} are not rows of the old embedding")
        out[token_id] = weight[ids].float().mean(0).to(weight.dtype)
    return out


def grow_vocabulary(state: dict[str, torch.Tensor], config: ModelConfig, sources: dict[int, list[int]],
                    pad_to_multiple_of: int | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The model's state and config with the vocabulary grown to hold every id of `sources` (new id -> the old
    ids its text encodes to), rounded up to `pad_to_multiple_of`. Old rows, and so the logits of old tokens,
    are unchanged. A tied lm_head stays the embedding; an untied one grows the same way from its own rows."""
    rows = padded_size(max([config.vocab_size, *(i + 1 for i in sources)]), pad_to_multiple_of)
    grown = dict(state)
    grown[EMBEDDING] = grown_rows(state[EMBEDDING], sources, rows)
    if config.tie_word_embeddings:
        if HEAD in state:
            grown[HEAD] = grown[EMBEDDING]
    else:
        grown[HEAD] = grown_rows(state[HEAD], sources, rows)
    return grown, config.replace(vocab_size=rows)
