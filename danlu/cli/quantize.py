"""`danlu quantize MODEL --method int8|int4 [--group-size N] [--symmetric|--asymmetric] [--head int8|int4|float]
--output DIR`:
weight-only quantization (danlu.quantization), written as the torchao checkpoint transformers loads
(`AutoModelForCausalLM.from_pretrained(DIR)` with torchao installed) and danlu computes on directly."""
from __future__ import annotations

from pathlib import Path

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
    parser.add_argument("--int8-activations", "--int8_activations", dest="int8_activations", action="store_true",
                        help="int8 only: smooth the model first (SmoothQuant, calibrated on --calibration) and have "
                             "danlu quantize activations to int8 too (W8A8: faster for batches and prefills); "
                             "transformers loads the same file as weight-only")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="with --int8-activations: text to calibrate on (.txt lines, or .jsonl 'text' fields), "
                             "each text a user turn of the model's chat template when it has one; 4,096 tokens "
                             "are used")
    parser.add_argument("--alpha", default="auto",
                        help="with --int8-activations: SmoothQuant's migration strength, 0..1, or auto (chosen per "
                             "group of layers; default)")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(run=run)


def run(args) -> int:
    import torch

    from danlu.checkpoints.load import load_pretrained
    from danlu.checkpoints.torchao import INT8_ACTIVATIONS_FIELD, save_torchao_checkpoint
    from danlu.low_rank.checkpoint import refuse_factorized
    from danlu.quantization.smooth import activation_statistics, calibration_batches, calibration_ids, smooth
    from danlu.quantization.transform import check_method, quantize, quantized_state_dict
    from danlu.utils.atomic import check_output_directory
    from danlu.vocab.text_files import read_corpus

    check_method(args.method, args.group_size)
    alpha = check_smoothing_options(args)
    out = check_output_directory(args.output, "--output", force=args.force)
    lm = load_pretrained(args.model, dtype="float32", device="cpu", show_progress=True)
    refuse_factorized(lm.model, "danlu quantize")
    if args.int8_activations:
        if lm.tokenizer is None:
            raise ValueError(f"{lm.source} has no tokenizer to read --calibration with")
        texts = read_corpus(Path(args.calibration))
        ids = calibration_ids(lm.tokenizer, texts)
        maxima, samples = activation_statistics(lm.model, calibration_batches(ids))
        chosen = smooth(lm.model, maxima, alpha, samples)
        print(f"smoothed {len(chosen)} groups of layers on {len(ids)} calibration tokens")
    replaced = quantize(lm.model, args.method, args.group_size, symmetric=args.symmetric, head=args.head)
    save_torchao_checkpoint(quantized_state_dict(lm.model), lm.config, out, torch.float32,
                            lm.tokenizer, dict(lm.generation_defaults),
                            extra_config={INT8_ACTIVATIONS_FIELD: True} if args.int8_activations else None)
    print(f"quantized {len(replaced)} linear layers to {args.method}"
          f"{' (int8 activations in danlu)' if args.int8_activations else ''}; wrote {out}")
    return 0


def check_smoothing_options(args):
    """--alpha as a number or "auto"; the smoothing options only with --int8-activations, which needs int8 and a
    --calibration file."""
    if not args.int8_activations:
        if args.calibration is not None or args.alpha != "auto":
            raise ValueError("--calibration and --alpha go with --int8-activations")
        return None
    if args.method != "int8":
        raise ValueError("--int8-activations: int8 activations multiply int8 weights; use --method int8")
    if args.calibration is None:
        raise ValueError("--int8-activations needs --calibration FILE: text like the model's inputs, to measure "
                         "the activations' ranges on")
    if not Path(args.calibration).is_file():
        raise ValueError(f"--calibration {args.calibration}: no such file (a .txt file, or .jsonl with 'text')")
    if args.alpha == "auto":
        return "auto"
    try:
        alpha = float(args.alpha)
    except ValueError:
        alpha = -1.0
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must be a number in [0, 1] or auto, got {args.alpha!r}")
    return alpha
