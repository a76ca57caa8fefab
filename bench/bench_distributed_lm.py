"""The MSRA article's distributed algorithms on the bundled LM: LoRA SFT of SmolLM2-135M-Instruct on the shipped
instructions by one process, by a parameter server (ssgd, asgd, dcasgd-c, dcasgd-a) and by local models (average,
ensemble), each reading the same number of examples; the final eval_loss and the wall time side by side.

    python bench/bench_distributed_lm.py [--quick] [--workers K] [--examples N] [--batch B] [--sync_every H[,H...]]
                                         [--seeds S[,S...]] [--ps_delay TAU] [--configs sequential,ssgd,...]
                                         [--json OUT]

Every run is `danlu train` launched as a user launches it (torchrun for the distributed ones). The data budget
is N examples for every configuration: one process takes N / B steps of batch B; a parameter server's asgd and
dcasgd take N / B updates of one worker's batch B, its ssgd N / (B K) rounds of K batches; local models take N /
(B K) steps on each of K workers. The learning rate, schedule and seed are the same for all. On a 2-core CPU the
distributed runs share the cores, so wall time shows their overhead, not a speed-up; the eval_loss is the
question (does staleness cost, does DC-ASGD recover it, does ensemble-compression beat averaging).

Every configuration runs once per seed (`--seed`: the data order and the adapters' initialisation), and the table
gives the mean and standard deviation over the seeds. `--ps_delay TAU` hands the parameter-server workers the
weights of TAU updates ago (injected staleness); local models run at every `--sync_every` given.
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
PARAMETER_SERVER = ("ssgd", "asgd", "dcasgd-c", "dcasgd-a")
LOCAL = ("average", "ensemble")
CONFIGS = ("sequential", *PARAMETER_SERVER, *LOCAL)


def train_flags(args, out: Path, steps: int, seed: int) -> list[str]:
    values = dict(stage="sft", dataset="identity,danlu_instruct", dataset_dir=str(REPO / "data"),
                  finetuning_type="lora", lora_target="all", lora_rank=8, lora_alpha=16, learning_rate=1e-3,
                  lr_scheduler_type="constant", per_device_train_batch_size=args.batch, cutoff_len=256,
                  max_steps=steps, logging_steps=1, save_steps=10 ** 6, eval_strategy="steps", eval_steps=steps,
                  val_size=0.1, per_device_eval_batch_size=8, seed=seed, output_dir=str(out),
                  overwrite_output_dir=True, report_to="none")
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


def command(config: str, args, out: Path, seed: int, sync_every: int) -> list[str]:
    k, per_update = args.workers, args.examples // args.batch
    if config == "sequential":
        return [sys.executable, "-m", "danlu", "train", *train_flags(args, out, per_update, seed)]
    if config in PARAMETER_SERVER:
        steps = per_update // k if config == "ssgd" else per_update
        extra = ["--parallel", f"ps={k}", "--ps_update", config, "--ps_delay", str(args.ps_delay), "--dc_lambda",
                 str(args.dc_lambda_a if config == "dcasgd-a" else args.dc_lambda)]
        nproc = k + 1
    else:
        steps = per_update // k
        extra = ["--parallel", f"local={k}", "--aggregate", config, "--sync_every", str(sync_every)]
        nproc = k
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "-m", "danlu", "train", *train_flags(args, out, steps, seed), *extra]


def runs(args) -> list[tuple[str, int, int]]:
    """(config, sync_every, seed) of every run: local models at each H, the others once (their H is 0)."""
    every = [int(h) for h in str(args.sync_every).split(",")]
    return [(config, h, seed) for seed in args.seeds for config in args.configs.split(",")
            for h in (every if config in LOCAL else [0])]


def run(config: str, sync_every: int, seed: int, args, scratch: Path) -> dict:
    out = scratch / f"{config}-{sync_every}-{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (1 if config == "sequential"
                                                                                   else args.workers)))}
    start = time.perf_counter()
    with ForeignLoad() as load:
        done = subprocess.run(command(config, args, out, seed, sync_every), cwd=REPO, env=env, capture_output=True,
                              text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"config": config, "sync_every": sync_every, "seed": seed, "error": done.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [row.get("lm_loss", row["loss"]) for row in rows if "loss" in row]
    delays = [row["ps_delay"] for row in rows if "ps_delay" in row]
    final_eval = [row for row in rows if "eval_loss" in row][-1]
    # the held-out cross-entropy; under ensemble-compression eval_loss is the distillation objective, and its
    # label term (eval_lm_loss) is the cross-entropy
    return {"config": config, "sync_every": sync_every, "seed": seed, "eval_loss": final_eval.get("eval_lm_loss", final_eval["eval_loss"]),
            "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses), "seconds": seconds,
            "mean_delay": sum(delays) / len(delays) if delays else None, "foreign_cpu": load.share}


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def paired_differences(results: list[dict], key: tuple) -> list[float]:
    """eval cross-entropy of `key` minus that of the first configuration, seed by seed: the seed also draws the
    held-out 10%, so the seeds' eval sets differ and only differences on the same seed compare like with like."""
    first = (results[0]["config"], results[0]["sync_every"])
    by_seed = {r["seed"]: r["eval_loss"] for r in results if (r["config"], r["sync_every"]) == first and "error" not in r}
    return [r["eval_loss"] - by_seed[r["seed"]] for r in results
            if (r["config"], r["sync_every"]) == key and "error" not in r and r["seed"] in by_seed]


def table(results: list[dict]) -> list[tuple]:
    """One line per (config, sync_every): the mean ± standard deviation over the seeds that ran, and the same of
    the paired difference from the first configuration."""
    lines = []
    for key in dict.fromkeys((r["config"], r["sync_every"]) for r in results):
        group = [r for r in results if (r["config"], r["sync_every"]) == key]
        done = [r for r in group if "error" not in r]
        name = key[0] + (f" H={key[1]}" if key[1] else "")
        if not done:
            lines.append((name, "error", "", "", "", "", "", "", ""))
            continue
        delays = [r["mean_delay"] for r in done if r["mean_delay"] is not None]
        differences = paired_differences(results, key)
        lines.append((name, mean_std([r["eval_loss"] for r in done]),
                      f"{mean_std(differences)}" if differences else "",
                      f"{min(r['eval_loss'] for r in done):.3f}-{max(r['eval_loss'] for r in done):.3f}",
                      mean_std([r["train_loss_last5"] for r in done]), done[0]["steps"],
                      f"{sum(delays) / len(delays):.2f}" if delays else "",
                      f"{sum(r['seconds'] for r in done) / len(done):.0f}",
                      f"{len(done)}/{len(group)}, other CPU {max(r['foreign_cpu'] for r in done):.0%}"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 examples instead of --examples")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sync_every", default="4", help="local models' H; several as 2,4,8")
    parser.add_argument("--seeds", default="42", help="one run per seed, e.g. 42,43,44")
    parser.add_argument("--ps_delay", type=int, default=0, help="injected staleness of the parameter server")
    parser.add_argument("--dc_lambda", type=float, default=0.04)
    parser.add_argument("--dc_lambda_a", type=float, default=2.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.quick:
        args.examples = 96
    info = machine_info()
    print(json.dumps(info))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for config, sync_every, seed in runs(args):
            print(f"-- {config} sync_every {sync_every} seed {seed}", flush=True)
            result = run(config, sync_every, seed, args, Path(scratch))
            print(f"   {result}", flush=True)
            results.append(result)
    print(f"\n{args.examples} examples of identity,danlu_instruct, batch {args.batch}, {args.workers} workers, "
          f"ps_delay {args.ps_delay}, seeds {args.seeds}")
    print_aligned(("config", "eval cross-entropy", f"- {results[0]['config']} (same seed)", "min-max",
                   "train loss (last 5)", "steps", "mean delay",
                   "seconds", "runs"), table(results))
    save_results({"machine": info, "settings": vars(args), "results": results}, args.json)


if __name__ == "__main__":
    main()
