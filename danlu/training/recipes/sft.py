"""Supervised fine-tuning (`--stage sft`): conversations rendered with the chat template, loss on answers."""
from __future__ import annotations

from functools import partial

from danlu.data.collate import collate
from danlu.data.dataset import PreparedData, prepare_sft_data
from danlu.data.supervised import pack_examples
from danlu.tokenization.chat import resolve_template
from danlu.training.recipes.pt import causal_lm_step, pad_id
from danlu.training.stage import Stage
from danlu.utils.progress import logger


def build_stage(lm, args) -> Stage:
    template = resolve_template(lm.tokenizer, args.template, default_system=args.default_system,
                                enable_thinking=args.enable_thinking, preserve_thinking=args.preserve_thinking)

    def examples(names, val_size) -> PreparedData:
        data = prepare_sft_data(lm.tokenizer, args.dataset_dir, names, template, args.cutoff_len,
                                args.max_samples, val_size, args.seed, args.train_on_prompt, args.skip_bad_lines)
        report(data, args.cutoff_len)
        return data

    data = examples(args.names("dataset"), 0.0 if args.eval_dataset else args.val_size)
    if args.eval_dataset:  # as LLaMA-Factory: a named evaluation set replaces the val_size split
        data.eval = examples(args.names("eval_dataset"), 0.0).train
    if args.packing:
        before = len(data.train)
        data.train = pack_examples(data.train, args.cutoff_len)
        logger.info("packing: %d examples in %d rows of at most %d tokens", before, len(data.train), args.cutoff_len)
    logger.info("training examples: %d, validation examples: %d", len(data.train), len(data.eval))
    return Stage(data.train, data.eval, partial(collate, pad_id=pad_id(lm.tokenizer)),
                 partial(causal_lm_step, chunk_size=args.loss_chunk_size))


def report(data: PreparedData, cutoff_len: int) -> None:
    if data.read.skipped:
        logger.warning("skipped %d bad line(s), first: %s", len(data.read.skipped), data.read.skipped[0])
    if data.tokenized.truncated:
        logger.info("%d example(s) longer than cutoff_len=%d were truncated", data.tokenized.truncated, cutoff_len)
    if data.tokenized.dropped:
        logger.info("%d example(s) had no answer left within cutoff_len=%d and were dropped",
                    data.tokenized.dropped, cutoff_len)
