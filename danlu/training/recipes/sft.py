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
    data = chat_data(lm, args, partial(prepare_sft_data, train_on_prompt=args.train_on_prompt))
    if args.packing:
        before = len(data.train)
        data.train = pack_examples(data.train, args.cutoff_len)
        logger.info("packing: %d examples in %d rows of at most %d tokens", before, len(data.train), args.cutoff_len)
    logger.info("training examples: %d, validation examples: %d", len(data.train), len(data.eval))
    return Stage(data.train, data.eval, partial(collate, pad_id=pad_id(lm.tokenizer)),
                 partial(causal_lm_step, chunk_size=args.loss_chunk_size))


def chat_data(lm, args, prepare) -> PreparedData:
    """The training and validation sets of a stage that renders conversations with the chat template (sft, rm,
    dpo, kto, ppo): `prepare(tokenizer, dataset_dir, names, template, cutoff_len, max_samples=, val_size=,
    seed=, skip_bad_lines=)` reads and tokenizes them."""
    template = chat_template(lm, args)

    def examples(names, val_size) -> PreparedData:
        data = prepare(lm.tokenizer, args.dataset_dir, names, template, args.cutoff_len, max_samples=args.max_samples,
                       val_size=val_size, seed=args.seed, skip_bad_lines=args.skip_bad_lines)
        report(data, args.cutoff_len)
        return data

    data = examples(args.names("dataset"), 0.0 if args.eval_dataset else args.val_size)
    if args.eval_dataset:  # as LLaMA-Factory: a named evaluation set replaces the val_size split
        data.eval = examples(args.names("eval_dataset"), 0.0).train
    return data


def chat_template(lm, args):
    return resolve_template(lm.tokenizer, args.template, default_system=args.default_system,
                            enable_thinking=args.enable_thinking, preserve_thinking=args.preserve_thinking)


def report(data: PreparedData, cutoff_len: int) -> None:
    if data.read.skipped:
        logger.warning("skipped %d bad line(s), first: %s", len(data.read.skipped), data.read.skipped[0])
    if data.tokenized.truncated:
        logger.info("%d example(s) longer than cutoff_len=%d were truncated", data.tokenized.truncated, cutoff_len)
    if data.tokenized.dropped:
        logger.info("%d example(s) had no answer left within cutoff_len=%d and were dropped",
                    data.tokenized.dropped, cutoff_len)
    if getattr(data.tokenized, "identical", 0):  # pairs (rm, dpo) whose chosen and rejected answers are the same
        logger.warning("%d pair(s) had identical chosen and rejected answers and were dropped",
                       data.tokenized.identical)
