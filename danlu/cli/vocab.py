"""`danlu vocab extend MODEL (--add-tokens FILE | --train-merges CORPUS --size N) --output DIR`: new tokens for
a model's tokenizer, with embedding rows initialised from the old ones (danlu.vocab)."""
from __future__ import annotations

from pathlib import Path

from danlu.checkpoints.bundled import bundled_model_path
from danlu.cli.convert import source_dtype


def add_parser(sub, name):
    parser = sub.add_parser(name, help="extend a model's vocabulary (e.g. for Chinese) before continued pretraining")
    actions = parser.add_subparsers(dest="vocab_command", required=True, metavar="ACTION")
    extend = actions.add_parser(
        "extend", help="add tokens to the tokenizer and rows to the embedding and lm_head",
        description="Add tokens listed in a file, or the pieces of a vocabulary learned on a corpus (sentencepiece "
                    "for a tokenizer.model, tokenizers' BPE for a tokenizer.json), to a model's tokenizer; new "
                    "embedding and lm_head rows are the mean of the rows of the old tokens each new one replaces.")
    extend.add_argument("model", nargs="?", default=None,
                        help=f"Hugging Face directory, .gguf file or hub id (default: the bundled "
                             f"SmolLM2-135M-Instruct at {bundled_model_path()})")
    source = extend.add_mutually_exclusive_group(required=True)
    source.add_argument("--add-tokens", dest="add_tokens", metavar="FILE",
                        help="a UTF-8 file of tokens, one per line (blank lines ignored)")
    source.add_argument("--train-merges", dest="train_merges", metavar="CORPUS",
                        help="learn pieces on this corpus: a .txt file (one document per line) or .jsonl with a "
                             "\"text\" field")
    extend.add_argument("--size", type=int, default=None,
                        help="with --train-merges: the number of pieces of the learned vocabulary")
    extend.add_argument("--output", required=True, metavar="DIR", help="the extended model's directory")
    extend.add_argument("--pad-to-multiple-of", dest="pad_to_multiple_of", type=int, default=None, metavar="M",
                        help="round the vocabulary size up to a multiple of M (e.g. 64, for fast matmuls)")
    extend.add_argument("--eval-text", dest="eval_text", default=None, metavar="FILE",
                        help="measure tokens per character on this text (default: the corpus)")
    extend.add_argument("--dtype", default="auto",
                        help="float32 | bfloat16 | float16 | auto (the source's dtype; float32 for GGUF)")
    extend.add_argument("--force", action="store_true", help="replace DIR if it exists")
    extend.set_defaults(run=run)


def run(args) -> int:
    from danlu.utils.atomic import check_output_directory
    from danlu.vocab import extend_vocabulary

    check_output_directory(args.output, "--output")
    dtype = args.dtype
    if dtype == "auto":
        dtype = source_dtype(Path(args.model)) if args.model is not None else "float32"
    report = extend_vocabulary(args.model, args.output, add_tokens=args.add_tokens, corpus=args.train_merges,
                               size=args.size, eval_text=args.eval_text,
                               pad_to_multiple_of=args.pad_to_multiple_of, dtype=dtype, force=args.force)
    for line in report.lines():
        print(line)
    return 0
