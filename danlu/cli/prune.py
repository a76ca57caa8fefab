"""`danlu prune MODEL --method magnitude|heads|ffn --sparsity S --output DIR [--calibration FILE.txt|jsonl]
[--scope layer|global] [--force]`: prune a model (danlu.pruning) and write it as a Hugging Face directory that
danlu and transformers load. heads and ffn give a smaller dense model; magnitude zeroes weights in place and
keeps the shape (and the size) of the model."""
from __future__ import annotations

from danlu.cli.common import add_model_argument

METHODS = ("magnitude", "heads", "ffn")


def add_parser(sub, name):
    parser = sub.add_parser(name, help="prune a model: zero small weights, or remove attention heads / FFN neurons",
                            description="magnitude: zero the smallest linear weights (the model keeps its shape "
                                        "and size; dense kernels run no faster). heads: remove whole key/value "
                                        "groups (a key/value head with its query heads) in every layer. ffn: "
                                        "remove FFN neurons in every layer. heads and ffn write a smaller dense "
                                        "model; each layer removes its least important units, scored on "
                                        "--calibration text (else by weight magnitude).")
    add_model_argument(parser)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--sparsity", required=True, type=float,
                        help="fraction removed, in [0, 1): of the linear weights (magnitude), of each layer's "
                             "key/value groups (heads) or FFN neurons (ffn), rounded to whole units")
    parser.add_argument("--scope", choices=("layer", "global"), default=None,
                        help="magnitude: the fraction per layer (default) or one threshold over all layers")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="heads/ffn: a .txt file, or a .jsonl file with a \"text\" field per line, to score "
                             "units by their contribution on it (default: by weight magnitude)")
    parser.add_argument("--calibration-tokens", "--calibration_tokens", dest="calibration_tokens", type=int,
                        default=8192, help="at most this many calibration tokens (default 8192)")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(run=run)


def check_arguments(args) -> None:
    from danlu.pruning.sparsity import check_sparsity

    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {list(METHODS)}, got {args.method!r}")
    check_sparsity(args.sparsity, "--sparsity")
    if args.method == "magnitude" and args.calibration is not None:
        raise ValueError("--calibration is for --method heads or ffn; magnitude pruning needs no data")
    if args.method != "magnitude" and args.scope is not None:
        raise ValueError("--scope is for --method magnitude; heads and ffn remove the same count in every layer")
    if args.calibration_tokens < 2:
        raise ValueError(f"--calibration-tokens must be at least 2, got {args.calibration_tokens}")


def run(args) -> int:
    import torch

    from danlu.checkpoints.hf import save_hf_checkpoint
    from danlu.checkpoints.load import load_pretrained
    from danlu.low_rank.checkpoint import refuse_factorized
    from danlu.models.transformer import count_parameters
    from danlu.pruning.calibration import calibration_batches, read_calibration_texts
    from danlu.pruning.magnitude import prune_magnitude
    from danlu.pruning.structured import ATTENTION, MLP, kept_unit_count, prune_heads, prune_neurons, unit_count
    from danlu.utils.atomic import check_output_directory

    check_arguments(args)
    out = check_output_directory(args.output, "--output", force=args.force)
    texts = read_calibration_texts(args.calibration) if args.calibration else None
    lm = load_pretrained(args.model, dtype="float32", device="cpu", show_progress=True)
    refuse_factorized(lm.model, "danlu prune")
    before = count_parameters(lm.model)
    if args.method == "magnitude":
        scope = args.scope or "layer"
        reached = prune_magnitude(lm.model, args.sparsity, scope)
        summary = (f"zeroed {reached:.1%} of the linear weights ({scope} scope); the model keeps its "
                   f"{before:,} parameters")
    else:
        part = ATTENTION if args.method == "heads" else MLP
        # Checked before the calibration pass, so that a refused fraction costs no forward pass.
        kept_unit_count(unit_count(lm.config, part), args.sparsity, part, "--sparsity")
        batches = None
        if texts is not None:
            if lm.tokenizer is None:
                raise ValueError("--calibration needs the model's tokenizer, and this model has none")
            batches = calibration_batches(lm.tokenizer, texts, max_tokens=args.calibration_tokens)
        prune = prune_heads if args.method == "heads" else prune_neurons
        pruned = prune(lm.model, args.sparsity, batches, "--sparsity")
        units = "key/value groups" if part == ATTENTION else "FFN neurons"
        scored = f"scored on {args.calibration}" if texts is not None else "scored by weight magnitude"
        summary = (f"removed {pruned.removed} of {pruned.total} {units} per layer "
                   f"({pruned.removed / pruned.total:.1%}; --sparsity {args.sparsity:g}), {scored}; "
                   f"parameters {before:,} -> {count_parameters(lm.model):,}")
    save_hf_checkpoint(lm.model.state_dict(), lm.model.config, out, torch.float32, tokenizer=lm.tokenizer,
                       generation_config=dict(lm.generation_defaults), show_progress=True)
    print(f"{summary}; wrote {out}")
    return 0
