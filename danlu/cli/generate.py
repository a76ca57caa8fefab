"""`danlu generate --input FILE --output OUT.jsonl`: offline batch generation that resumes where it stopped."""
from __future__ import annotations

from danlu.cli.common import (add_compile_option, add_config_argument, add_model_options, add_sampling_options,
                              decoding_of, load_from_args, sampling_config)
from danlu.generation.sampling import GenerationConfig


def add_parser(sub, name):
    parser = sub.add_parser(name, help="offline batch generation from a .txt or .jsonl file of prompts")
    add_config_argument(parser)
    add_model_options(parser)
    parser.add_argument("--input", required=True, help=".txt (one prompt per line) or .jsonl "
                                                       "({'prompt': ...} or {'messages': [...]} per line)")
    parser.add_argument("--output", required=True, help="results, one JSON object per line")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--batch_size", type=int, default=8)
    add_sampling_options(parser, GenerationConfig(max_new_tokens=256, temperature=0.0))
    add_compile_option(parser)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    from danlu.generation.batch_file import answered_indices, append_results, read_prompts
    from danlu.generation.generate import generate
    from danlu.tokenization.chat import encode_chat, stop_words
    from danlu.utils.atomic import check_output_file
    from danlu.utils.progress import progress

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    records = read_prompts(args.input)
    check_output_file(args.output, "--output")  # before the model loads: the answers must have somewhere to go
    done = answered_indices(args.output)
    todo = [r for r in records if r.index not in done]
    if not todo:
        print(f"all {len(records)} prompts already answered in {args.output}")
        return 0
    config = sampling_config(args)
    lm = load_from_args(args)
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; generation needs a checkpoint with one")
    if args.chat or any(r.messages for r in todo):
        config = config.with_stops(stop_words(tokenizer, args.template))

    def encode(record):
        if record.messages is not None:
            return encode_chat(tokenizer, record.messages, args.template, args.system)
        if args.chat:
            return encode_chat(tokenizer, [{"role": "user", "content": record.prompt}], args.template, args.system)
        return tokenizer(record.prompt, add_special_tokens=True)["input_ids"]

    bar = progress(total=len(records), desc="Generating", unit="prompt")
    bar.update(len(records) - len(todo))
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        completions = generate(lm.model, tokenizer, [encode(r) for r in chunk], config, decoding=decoding_of(args),
                               prompt_indices=[r.index for r in chunk])  # a seeded answer: the same after a resume
        results = []
        for record, completion in zip(chunk, completions):
            prompt = record.prompt if record.prompt is not None else record.messages
            results.append({"index": record.index, "prompt": prompt, "response": completion.text,
                            "finish_reason": completion.finish_reason,
                            "prompt_tokens": len(completion.prompt_ids),
                            "completion_tokens": len(completion.token_ids), **record.extra})
        append_results(args.output, results)
        bar.update(len(chunk))
    bar.close()
    print(f"wrote {len(todo)} answers to {args.output} ({len(records) - len(todo)} were already there)")
    return 0
