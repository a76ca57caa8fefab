"""Continued pretraining (`--stage pt`): fixed-length blocks of a tokenized corpus, next-token loss on all."""
from __future__ import annotations

from functools import partial

from danlu.checkpoints.bundled import danlu_home
from danlu.data.collate import collate
from danlu.data.pretrain import prepare_pretrain_data
from danlu.training.losses import causal_lm_loss, chunked_causal_lm_loss
from danlu.training.stage import Stage, StepOutput


def build_stage(lm, args) -> Stage:
    def blocks(names, val_size):
        return prepare_pretrain_data(lm.tokenizer, args.dataset_dir, names, args.cutoff_len,
                                     danlu_home() / "token-cache", val_size, args.max_samples)

    train, held_out = blocks(args.names("dataset"), 0.0 if args.eval_dataset else args.val_size)
    if args.eval_dataset:
        held_out, _ = blocks(args.names("eval_dataset"), 0.0)
    return Stage(train, held_out, partial(collate, pad_id=pad_id(lm.tokenizer)),
                 partial(causal_lm_step, chunk_size=args.loss_chunk_size))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def causal_lm_step(model, batch: dict, chunk_size: int = 0) -> StepOutput:
    """Token-mean next-token cross-entropy over the labelled tokens; chunked through the head if asked."""
    inputs = dict(attention_mask=batch["attention_mask"], document_ids=batch.get("document_ids"))
    if chunk_size:
        hidden = model(batch["input_ids"], return_hidden=True, **inputs)
        loss, labelled = chunked_causal_lm_loss(hidden, model.lm_head, batch["labels"], chunk_size)
    else:
        loss, labelled = causal_lm_loss(model(batch["input_ids"], **inputs), batch["labels"])
    return StepOutput(loss, int(batch["attention_mask"].sum()), weight=labelled)
