"""`danlu quantize MODEL --method int8|int4 [--group-size N] [--symmetric|--asymmetric] [--head int8|int4|float]
--output DIR`:
weight-only quantization (danlu.quantization), written as the torchao checkpoint transformers loads
(`AutoModelForCausalLM.from_pretrained(DIR)` with torchao installed) and danlu computes on directly."""
from __future__ import annotations

from danlu.cli.common import add_model_argument
from danlu.quantization.transform import HEAD_CHOICES, METHODS


def add_parser(sub, name):
    parser = sub.add_parser(name, help="quantize a model's linear weights to int8 or int4 (weight-only)",
                            description="Round each linear layer's weight to int8 (per output row) or int4 "
                                        "(per group of input features) and write the model as a torchao "
                                        "checkpoint: transformers loads it, and danlu chat / generate / api / "
                                        "eval compute on the packed weights.")
    add_model_argument(parser)
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=None,
                        help="int4: input features per scale (32, 64 or 128; default 64); must divide the "
                             "layers' input sizes")
    scheme = parser.add_mutually_exclusive_group()
    scheme.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None,
                        help="a zero point per group as well as a scale (the default for int4)")
    scheme.add_argument("--symmetric", dest="symmetric", action="store_true",
                        help="a scale only, zero kept exact (the default for int8)")
    parser.add_argument("--head", choices=HEAD_CHOICES, default="int8",
                        help="the output head: int8 per row (default, as llama.cpp's 4-bit files), int4 like "
                             "the body, or float (unquantized)")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(run=run)


def run(args) -> int:
    import torch

    from danlu.checkpoints.load import load_pretrained
    from danlu.checkpoints.torchao import save_torchao_checkpoint
    from danlu.low_rank.checkpoint import refuse_factorized
    from danlu.quantization.transform import check_method, quantize, quantized_state_dict
    from danlu.utils.atomic import check_output_directory

    check_method(args.method, args.group_size)
    out = check_output_directory(args.output, "--output", force=args.force)
    lm = load_pretrained(args.model, dtype="float32", device="cpu", show_progress=True)
    refuse_factorized(lm.model, "danlu quantize")
    replaced = quantize(lm.model, args.method, args.group_size, symmetric=args.symmetric, head=args.head)
    save_torchao_checkpoint(quantized_state_dict(lm.model), lm.config, out, torch.float32,
                            lm.tokenizer, dict(lm.generation_defaults))
    print(f"quantized {len(replaced)} linear layers to {args.method}; wrote {out}")
    return 0
