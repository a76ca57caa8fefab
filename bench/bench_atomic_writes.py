"""What the fsyncs of an atomic checkpoint write cost: the same safetensors file written through
`atomic_directory` with its fsyncs (file and directories flushed before the rename, as danlu does) and with them
turned off, alternately, in one run.

    python bench/bench_atomic_writes.py [--mib 512] [--repeats 3] [--dir DIR]

DIR must be on the disk the checkpoints go to (default: a folder beside this repository, not /tmp, which may be
memory).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import danlu.utils.atomic as atomic


def write_once(weights: dict, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    with atomic.atomic_directory(target) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / ".bench_atomic_writes"))
    args = parser.parse_args()
    weights = {f"w{i}": torch.randn(256, 1024) for i in range(args.mib)}  # 1 MiB each
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    real_fsync, times = atomic.fsync_path, {"with fsync": [], "without": []}
    try:
        for _ in range(args.repeats):
            for label, fsync in (("with fsync", real_fsync), ("without", lambda path: None)):
                atomic.fsync_path = fsync
                times[label].append(write_once(weights, root / "checkpoint"))
    finally:
        atomic.fsync_path = real_fsync
        shutil.rmtree(root, ignore_errors=True)
    with_, without = (statistics.median(times[k]) for k in ("with fsync", "without"))
    print(f"{args.mib} MiB checkpoint, median of {args.repeats}: {with_:.2f} s with fsync, {without:.2f} s without "
          f"(+{with_ - without:.2f} s, {with_ / without:.2f}x)")


if __name__ == "__main__":
    main()
