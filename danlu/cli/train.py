"""`danlu train CONFIG.yaml [--key value ...]`: LLaMA-Factory's `llamafactory-cli train`, same keys."""
from __future__ import annotations

import argparse


def add_parser(sub, name):
    parser = sub.add_parser(name, help="fine-tune (sft, pt) with lora, freeze or full; LLaMA-Factory's arguments",
                            add_help=False)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="[CONFIG.yaml] --key value ...")
    parser.set_defaults(run=run)


def run(args) -> int:
    from danlu.training.arguments import parse_train_arguments
    from danlu.training.topology import Topology
    from danlu.training.train import train

    if not args.argv or args.argv[0] in ("-h", "--help"):
        from danlu.training.arguments import TrainArguments
        import dataclasses

        print("usage: danlu train [CONFIG.yaml] [--key value ...]\nkeys (LLaMA-Factory's names):")
        for f in dataclasses.fields(TrainArguments):
            default = f.default if f.default is not dataclasses.MISSING else None
            print(f"  --{f.name} (default: {default})")
        return 0
    result = train(parse_train_arguments(args.argv))
    if not Topology.from_environment().is_main:  # under torchrun the main rank speaks for the run
        return 0
    final = result.train_losses[-1] if result.train_losses else float("nan")
    print(f"trained {result.state.global_step} steps; last loss {final:.4f}"
          + (f"; last eval_loss {result.eval_losses[-1]:.4f}" if result.eval_losses else "")
          + f"; outputs in {result.output_dir}")
    return 0
