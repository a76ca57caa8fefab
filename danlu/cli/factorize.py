"""`danlu factorize MODEL (--energy E | --rank R) [--targets q_proj,v_proj|all] [--multiple-of N] [--dense]
--output DIR [--force]`: replace linear layers by two low-rank factors from their truncated SVD
(danlu.low_rank) and write the model as a Hugging Face directory with a `low_rank` field in config.json, which
danlu loads everywhere (chat, generate, api, eval, train) and transformers cannot; --dense writes the product
B @ A back as plain weights instead, a model transformers loads (the approximation without the saving)."""
from __future__ import annotations

from danlu.cli.common import add_model_argument

DESCRIPTION = ("Replace each target linear's weight W [out, in] by B [out, r] @ A [r, in] from its truncated SVD, "
               "the rank r chosen per layer: the smallest whose singular values keep --energy of sum(S^2), or the "
               "fixed --rank. A layer whose factors would hold as many weights as W or more stays dense (and is "
               "listed). The output is a Hugging Face directory whose config.json names the factorized layers and "
               "ranks (\"low_rank\"): danlu chat / generate / api / eval / train load it; transformers cannot "
               "(it builds the plain layers, initialises them at random and only warns): pass --dense for a model "
               "transformers loads, the product B @ A written back as each layer's weight (the approximation, "
               "but no fewer parameters).")


def add_parser(sub, name):
    parser = sub.add_parser(name, help="low-rank factorization: replace linear weights by two SVD factors",
                            description=DESCRIPTION)
    add_model_argument(parser)
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--energy", type=float, default=None,
                        help="per layer, the smallest rank whose singular values keep this fraction of sum(S^2), "
                             "in (0, 1] (e.g. 0.9)")
    choice.add_argument("--rank", type=int, default=None, help="the same rank for every target layer (>= 1)")
    parser.add_argument("--targets", default="all",
                        help="comma-separated layer names as for --lora_target (q_proj,v_proj,... or full names), "
                             "or all (default): every q/k/v/o/gate/up/down projection; never the output head")
    parser.add_argument("--multiple-of", "--multiple_of", dest="multiple_of", type=int, default=None,
                        help="--energy: round each chosen rank up to a multiple of this (e.g. 8, for faster kernels)")
    parser.add_argument("--dense", action="store_true",
                        help="write B @ A back as plain weights: a Hugging Face model transformers loads, with "
                             "the factorization's approximation and the original parameter count")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(run=run)


def check_arguments(args) -> list[str]:
    """The targets as a list; bad values refused with the flag named."""
    from danlu.low_rank.svd import check_rank
    from danlu.low_rank.transform import check_choice

    check_choice(args.energy, args.rank, "--energy", "--rank")
    if args.multiple_of is not None:
        if args.rank is not None:
            raise ValueError("--multiple-of rounds the ranks that --energy chooses; with --rank give the rank "
                             "itself")
        check_rank(args.multiple_of, "--multiple-of")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise ValueError("--targets names no layer; give names like q_proj,v_proj or all")
    return targets


def layer_table(reports) -> list[str]:
    lines = [f"{'layer':<40} {'shape':>11} {'rank':>5} {'energy':>7} {'params':>21}"]
    for r in reports:
        shape = f"{r.out_features}x{r.in_features}"
        params = f"{r.params_before:,} -> {r.params_after:,}" if r.factorized else "dense (kept)"
        energy = f"{r.energy:.4f}" if r.factorized else "-"
        lines.append(f"{r.name:<40} {shape:>11} {r.rank:>5} {energy:>7} {params:>21}")
    return lines


def run(args) -> int:
    import torch

    from danlu.checkpoints.hf import save_hf_checkpoint
    from danlu.checkpoints.load import load_pretrained
    from danlu.low_rank.checkpoint import low_rank_config
    from danlu.low_rank.transform import densify, factorization_targets, factorize
    from danlu.models.transformer import count_parameters
    from danlu.utils.atomic import check_output_directory

    targets = check_arguments(args)
    out = check_output_directory(args.output, "--output", force=args.force)
    lm = load_pretrained(args.model, dtype="float32", device="cpu", show_progress=True)
    names = factorization_targets(lm.model, targets, "--targets")
    before = count_parameters(lm.model)
    reports = factorize(lm.model, args.energy, args.rank, names, args.multiple_of or 1)
    after = count_parameters(lm.model)
    for line in layer_table(reports):
        print(line)
    done = [r for r in reports if r.factorized]
    kept_dense = len(reports) - len(done)
    rule = f"--energy {args.energy:g}" if args.energy is not None else f"--rank {args.rank}"
    summary = (f"factorized {len(done)} of {len(reports)} target layers ({rule}"
               + (f"; {kept_dense} left dense: their factors would not be smaller" if kept_dense else "") + "); "
               f"parameters {before:,} -> {after:,} ({after / before:.1%})")
    extra_config = low_rank_config(lm.model)
    if args.dense:
        densify(lm.model)
        extra_config = {}
        summary += f"; --dense: B @ A written back as plain weights ({count_parameters(lm.model):,} parameters)"
    save_hf_checkpoint(lm.model.state_dict(), lm.model.config, out, torch.float32, tokenizer=lm.tokenizer,
                       generation_config=dict(lm.generation_defaults), show_progress=True,
                       extra_config=extra_config or None)
    print(f"{summary}; wrote {out}")
    return 0
