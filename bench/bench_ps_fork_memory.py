"""What the parameter server's worker fork costs in memory: under `--parallel ps=K` each torchrun worker rank forks
and its child is the worker (distributed/parameter_server/worker_process.py), so a killed worker does not stop the
job. This runs LoRA SFT of the bundled SmolLM2 with ps=2 and, once the first step is logged, reads every process's
RSS, PSS and private memory from /proc/PID/smaps_rollup (Linux).

    python bench/bench_ps_fork_memory.py [--workers 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info, print_aligned, save_results

REPO = Path(__file__).resolve().parents[1]


def parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    return found


def memory_mib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) // 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(entry[5:] for entry in environ if entry.startswith(b"RANK=")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.workers + 1),
                   "--standalone", "-m", "danlu", "train", "--dataset", "identity,danlu_instruct", "--dataset_dir",
                   str(REPO / "data"), "--finetuning_type", "lora", "--lora_target", "all", "--max_steps", "60",
                   "--per_device_train_batch_size", "2", "--cutoff_len", "128", "--logging_steps", "1",
                   "--save_steps", "1000", "--output_dir", out, "--overwrite_output_dir", "true",
                   "--parallel", f"ps={args.workers}", "--ps_update", "asgd"]
        launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        log = Path(out) / "trainer_log.jsonl"
        while not log.is_file():
            if launcher.poll() is not None:
                raise SystemExit(f"the run ended before its first step:\n{launcher.stderr.read()[-3000:]}")
            time.sleep(0.5)
        tree = parents()
        rows = []
        for pid in sorted((p for p, parent in tree.items() if parent == launcher.pid), key=rank_of):
            rank = rank_of(pid)
            forked = [p for p, parent in tree.items() if parent == pid]
            role = "server" if rank == 0 else "waiting parent" if forked else "worker"
            rows.append({"rank": rank, "process": role, **memory_mib(pid)})
            rows += [{"rank": rank, "process": "forked worker", **memory_mib(child)} for child in forked]
        launcher.communicate()
    print_aligned(("rank", "process", "RSS MiB", "PSS MiB", "private MiB"),
                  [(r["rank"], r["process"], r["rss"], r["pss"], r["private"]) for r in rows])
    save_results({"machine": machine_info(), "workers": args.workers, "processes": rows}, args.json)
    print(json.dumps({"exit": launcher.returncode}))


if __name__ == "__main__":
    main()
