"""What choosing tokens row by row costs (generation/sequence.py's SequenceState, one per row: the one sampling core of
generate, chat and the server) beside one batched `next_tokens` call over the same logits, per decode step.

    python bench/bench_sampling.py [--rows 8] [--vocab 49152] [--repeats 200]

The last line compares top-p over the whole sorted vocabulary (transformers' warpers in turn) with top-p over
top-k's survivors (what next_tokens does when both are set; the same tokens are kept).

The step's model forward is not included: compare the figures with a decode step of the model (SmolLM2-135M at
batch 8 on this CPU: ~90-110 ms, BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import time

import torch

from danlu.generation.sampling import (GenerationConfig, filter_top_k, filter_top_k_top_p, filter_top_p,
                                       next_tokens)
from danlu.generation.sequence import SequenceState

SETTINGS = {"greedy": GenerationConfig(temperature=0),
            "sampled (t 0.7, top-k 50, top-p 0.9)": GenerationConfig(temperature=0.7, top_k=50, top_p=0.9, seed=1),
            "sampled + repetition penalty 1.1": GenerationConfig(temperature=0.7, top_k=50, top_p=0.9, seed=1,
                                                                 repetition_penalty=1.1)}


def per_step_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    logits = torch.randn(args.rows, args.vocab) * 3
    for name, config in SETTINGS.items():
        seen = torch.zeros(args.rows, args.vocab, dtype=torch.bool) if config.repetition_penalty != 1.0 else None
        generator = torch.Generator().manual_seed(1) if config.seed is not None else None
        states = [SequenceState([1, 2, 3], config.for_row(i), [], None, args.vocab) for i in range(args.rows)]
        batched = per_step_us(lambda: next_tokens(logits, config, seen, generator), args.repeats)
        per_row = per_step_us(lambda: [state.choose(row) for state, row in zip(states, logits)], args.repeats)
        print(f"{name:38s} {args.rows} rows: batched {batched:7.0f} us/step, per row {per_row:7.0f} us/step "
              f"({per_row / batched:.2f}x, +{(per_row - batched) / 1000:.2f} ms)")
    scaled = logits / 0.7
    whole = per_step_us(lambda: filter_top_p(filter_top_k(scaled, 50), 0.9), args.repeats)
    survivors = per_step_us(lambda: filter_top_k_top_p(scaled, 50, 0.9), args.repeats)
    print(f"top-k 50 then top-p 0.9, {args.rows} rows: the whole vocabulary sorted {whole:7.0f} us/step, "
          f"only the 50 survivors {survivors:7.0f} us/step ({whole / survivors:.1f}x)")


if __name__ == "__main__":
    main()
