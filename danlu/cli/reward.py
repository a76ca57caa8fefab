"""`danlu reward --model RM --input pairs.jsonl`: score answers with a reward model (a `--stage rm` output).

Each record is rendered with the chat template as the reward model was trained. A pairwise record (chosen and
rejected, in LLaMA-Factory's alpaca or sharegpt layout) gets both scores and whether the chosen one wins; a
record with one answer (alpaca's output, or a conversation ending with the assistant) gets its score.
"""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub, name):
    from danlu.cli.common import add_model_options, add_template_option

    parser = sub.add_parser(name, help="score answers (or chosen/rejected pairs) with a reward model")
    add_model_options(parser)
    parser.add_argument("--input", required=True, help=".json or .jsonl records: alpaca (instruction, input, "
                                                       "output | chosen, rejected) or sharegpt/OpenAI messages")
    parser.add_argument("--output", default=None, help="write one JSON line of scores per record here")
    parser.add_argument("--cutoff_len", type=int, default=1024, help="longer conversations are cut (as training)")
    parser.add_argument("--batch_size", type=int, default=8)
    add_template_option(parser)
    parser.add_argument("--system", "--default_system", dest="system", default=None, help="system prompt")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    from danlu.checkpoints.value_head import load_value_head, read_value_head
    from danlu.cli.common import load_from_args
    from danlu.data.files import read_records
    from danlu.tokenization.chat import resolve_template
    from danlu.training.rewards import ModelReward
    from danlu.utils.atomic import atomic_write_text, check_output_file

    if args.batch_size < 1 or args.cutoff_len < 1:
        raise ValueError("--batch_size and --cutoff_len must be at least 1")
    if args.output:
        check_output_file(args.output, "--output")
    records = read_records(Path(args.input))
    if not records:
        raise ValueError(f"{args.input}: no records to score")
    lm = load_from_args(args)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; scoring text needs a checkpoint with one")
    adapters = [a.strip() for a in (args.adapter or "").split(",") if a.strip()]
    load_value_head(lm.model, next((a for a in reversed(adapters) if read_value_head(a) is not None), lm.source))
    template = resolve_template(lm.tokenizer, args.template, default_system=args.system)
    sides = [record_sides(r, lm.tokenizer, template, args.cutoff_len) for r in records]
    reward = ModelReward(lm.model, lm.tokenizer.pad_token_id or 0)
    flat = [ids for record in sides for ids in record if ids is not None]
    scores = iter([s for start in range(0, len(flat), args.batch_size)
                   for s in reward.score(flat[start:start + args.batch_size]).tolist()])
    results = [result_line(i, [next(scores) if ids is not None else None for ids in record])
               for i, record in enumerate(sides)]
    if args.output:
        atomic_write_text(Path(args.output), "".join(json.dumps(r) + "\n" for r in results))
    else:
        for r in results:
            print(json.dumps(r))
    print(summary(results))
    return 0


def record_sides(record, tokenizer, template, cutoff_len: int) -> list:
    """The token ids of each answer of a record (chosen and rejected, or the one), None where nothing is left."""
    from danlu.data.formats import to_example, to_preference_example
    from danlu.data.preference import tokenize_answer

    spec = spec_for(record)
    if spec.ranking:
        pair = to_preference_example(record, spec)
        examples = [pair.answered(pair.chosen), pair.answered(pair.rejected)]
    else:
        examples = [to_example(record, spec)]
    sides = [tokenize_answer(tokenizer, example, template, cutoff_len)[0] for example in examples]
    return [side.input_ids if side is not None else None for side in sides]


def spec_for(record):
    """The layout of a record read on its own: sharegpt (conversations), OpenAI (messages) or alpaca."""
    from danlu.data.formats import DatasetSpec

    ranking = "chosen" in record.data or "rejected" in record.data
    for column in ("conversations", "messages"):
        if column in record.data:
            return DatasetSpec("input", "", "sharegpt", {"messages": column}, ranking=ranking)
    return DatasetSpec("input", "", "alpaca", ranking=ranking)


def result_line(index: int, scores: list) -> dict:
    if len(scores) == 1:
        return {"index": index, "score": scores[0]} if scores[0] is not None else \
            {"index": index, "skipped": "no answer token left within cutoff_len"}
    chosen, rejected = scores
    if chosen is None or rejected is None:
        return {"index": index, "skipped": "no answer token left within cutoff_len"}
    return {"index": index, "chosen_score": chosen, "rejected_score": rejected, "margin": chosen - rejected,
            "chosen_wins": chosen > rejected}


def summary(results: list[dict]) -> str:
    pairs = [r for r in results if "margin" in r]
    singles = [r["score"] for r in results if "score" in r]
    skipped = sum("skipped" in r for r in results)
    parts = []
    if pairs:
        accuracy = sum(r["chosen_wins"] for r in pairs) / len(pairs)
        margin = sum(r["margin"] for r in pairs) / len(pairs)
        parts.append(f"{len(pairs)} pairs: accuracy {accuracy:.3f}, mean margin {margin:.4f}")
    if singles:
        parts.append(f"{len(singles)} answers: mean score {sum(singles) / len(singles):.4f}")
    if skipped:
        parts.append(f"{skipped} skipped (no answer left within cutoff_len)")
    return "; ".join(parts)
