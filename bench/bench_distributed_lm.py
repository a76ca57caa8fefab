"""The MSRA article's distributed algorithms on the bundled LM: LoRA SFT of SmolLM2-135M-Instruct on the shipped
instructions by one process, by a parameter server (ssgd, asgd, dcasgd-c, dcasgd-a) and by local models (average,
ensemble), each reading the same number of examples; the final eval_loss and the wall time side by side.

    python bench/bench_distributed_lm.py [--quick] [--workers K] [--examples N] [--batch B] [--sync_every H]
                                         [--configs sequential,ssgd,...] [--json OUT]

Every run is `danlu train` launched as a user launches it (torchrun for the distributed ones). The data budget
is N examples for every configuration: one process takes N / B steps of batch B; a parameter server's asgd and
dcasgd take N / B updates of one worker's batch B, its ssgd N / (B K) rounds of K batches; local models take N /
(B K) steps on each of K workers. The learning rate, schedule and seed are the same for all. On a 2-core CPU the
distributed runs share the cores, so wall time shows their overhead, not a speed-up; the eval_loss is the
question (does staleness cost, does DC-ASGD recover it, does ensemble-compression beat averaging).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ForeignLoad, machine_info, print_aligned, save_results

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("sequential", "ssgd", "asgd", "dcasgd-c", "dcasgd-a", "average", "ensemble")


def train_flags(args, out: Path, steps: int) -> list[str]:
    values = dict(stage="sft", dataset="identity,danlu_instruct", dataset_dir=str(REPO / "data"),
                  finetuning_type="lora", lora_target="all", lora_rank=8, lora_alpha=16, learning_rate=1e-3,
                  lr_scheduler_type="constant", per_device_train_batch_size=args.batch, cutoff_len=256,
                  max_steps=steps, logging_steps=1, save_steps=10 ** 6, eval_strategy="steps", eval_steps=steps,
                  val_size=0.1, per_device_eval_batch_size=8, seed=42, output_dir=str(out),
                  overwrite_output_dir=True, report_to="none")
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


def command(config: str, args, out: Path) -> list[str]:
    k, per_update = args.workers, args.examples // args.batch
    if config == "sequential":
        return [sys.executable, "-m", "danlu", "train", *train_flags(args, out, per_update)]
    if config in ("ssgd", "asgd", "dcasgd-c", "dcasgd-a"):
        steps = per_update // k if config == "ssgd" else per_update
        extra = ["--parallel", f"ps={k}", "--ps_update", config, "--dc_lambda",
                 str(args.dc_lambda_a if config == "dcasgd-a" else args.dc_lambda)]
        nproc = k + 1
    else:
        steps = per_update // k
        extra = ["--parallel", f"local={k}", "--aggregate", config, "--sync_every", str(args.sync_every)]
        nproc = k
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "-m", "danlu", "train", *train_flags(args, out, steps), *extra]


def run(config: str, args, scratch: Path) -> dict:
    out = scratch / config
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (1 if config == "sequential"
                                                                                   else args.workers)))}
    start = time.perf_counter()
    with ForeignLoad() as load:
        done = subprocess.run(command(config, args, out), cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"config": config, "error": done.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [row.get("lm_loss", row["loss"]) for row in rows if "loss" in row]
    delays = [row["ps_delay"] for row in rows if "ps_delay" in row]
    final_eval = [row for row in rows if "eval_loss" in row][-1]
    # the held-out cross-entropy; under ensemble-compression eval_loss is the distillation objective, and its
    # label term (eval_lm_loss) is the cross-entropy
    return {"config": config, "eval_loss": final_eval.get("eval_lm_loss", final_eval["eval_loss"]),
            "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses), "seconds": seconds,
            "mean_delay": sum(delays) / len(delays) if delays else None, "foreign_cpu": load.share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 examples instead of --examples")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sync_every", type=int, default=4)
    parser.add_argument("--dc_lambda", type=float, default=0.04)
    parser.add_argument("--dc_lambda_a", type=float, default=2.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.examples = 96
    info = machine_info()
    print(json.dumps(info))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for config in args.configs.split(","):
            print(f"-- {config}", flush=True)
            result = run(config, args, Path(scratch))
            print(f"   {result}", flush=True)
            results.append(result)
    lines = [(r["config"], "error" if "error" in r else f"{r['eval_loss']:.4f}",
              "" if "error" in r else f"{r['train_loss_last5']:.4f}", "" if "error" in r else r["steps"],
              "" if r.get("mean_delay") is None else f"{r['mean_delay']:.2f}",
              "" if "error" in r else f"{r['seconds']:.0f}", "" if "error" in r else f"{r['foreign_cpu']:.0%}")
             for r in results]
    print(f"\n{args.examples} examples of identity,danlu_instruct, batch {args.batch}, {args.workers} workers, "
          f"sync_every {args.sync_every}")
    print_aligned(("config", "eval cross-entropy", "train loss (last 5)", "steps", "mean delay", "seconds", "other CPU"),
                  lines)
    save_results({"machine": info, "settings": vars(args), "results": results}, args.json)


if __name__ == "__main__":
    main()
