"""Parallel training layouts on this machine: tokens/s and peak memory per rank of each layout vs one process.

    python bench/bench_parallel.py [--quick] [--json OUT] [--layouts single,dp,fsdp,tp,tp3,pp] [--finetuning full,lora]
                                   [--steps N] [--warmup N] [--cutoff_len N] [--batch B] [--accumulation A]

Every run is `danlu train` SFT of the real model (the bundled SmolLM2-135M-Instruct, float32, CPU; no
--model_name_or_path) launched as a user launches it, one fresh job per layout:

    one process:  OMP_NUM_THREADS=C   python -m danlu train --stage sft ... --per_device_train_batch_size B
    N processes:  OMP_NUM_THREADS=C/N python -m torch.distributed.run --nproc_per_node N --standalone \\
                      -m danlu train --stage sft ... --parallel dp=2|fsdp=2|tp=2|tp=3|pp=2

(C = this machine's cores; C/N at least 1). tp=3 (3 processes) is there because tp must divide the model's
attention heads and key/value heads, 9 and 3 in SmolLM2-135M: danlu refuses tp=2 for it before any work (the
run is kept in the table to show that), and on 2 cores tp=3's 3 single-thread processes share 2 cores.

The global batch is the same in every layout: B x A examples per optimizer step (per-device batch B,
A = --gradient_accumulation_steps). dp=2 and fsdp=2 read 2 device batches per
micro-batch, so they run with per-device batch B/2; a tp=2 group and a pp=2 pipeline read one device batch, so
they keep B. pp=2 runs the 1F1B schedule over the A micro-batches of a step (A >= 2), with eval_strategy no.

Data: pp pads every micro-batch to cutoff_len, the other layouts to the longest example of the micro-batch. So
that every layout computes the same tokens, the default data (`--data filled`) are SFT examples of at least
cutoff_len tokens, cut to exactly cutoff_len by danlu: the shipped danlu_instruct/identity instructions, each
with an answer made of the shipped answers joined (written to a scratch dataset_dir). Every micro-batch is then
B x cutoff_len tokens without padding in every layout. `--data shipped` trains on the shipped
identity,danlu_instruct instead (45-116 tokens each: pp then computes up to cutoff_len / length times the
tokens the others do, and its tokens/s drops accordingly).

Measured per run:
  * tokens/s: from danlu's trainer_log.jsonl (--logging_steps 1 --include_num_input_tokens_seen true): each
    record gives the step's tokens/s and, from num_input_tokens_seen, its tokens (non-padding input tokens over
    all data-parallel ranks), so a step's seconds = its tokens / its tokens/s. The rate is the tokens of the timed
    steps (warm-up + 1 .. warm-up + steps) over their seconds. The job runs one step more than that (not timed),
    so that the timed steps' memory is read before the final save starts.
  * peak memory per rank: each rank process's peak resident set (VmHWM of /proc/PID/status, polled every
    --poll seconds from outside; the rank is the RANK of the process's environment). Two figures:
      - "timed steps": when the last warm-up step is logged the bench resets every rank's VmHWM (writing 5 to
        /proc/PID/clear_refs), and reads it when the last timed step is logged: the peak RSS over the timed
        steps (model, gradients, optimizer state, activations, communication buffers, plus whatever the
        process had already mapped: torch's libraries, the allocator's cached pages);
      - "whole process": the highest VmHWM over the process's life (imports, model load, training, the final
        save of checkpoint and model).
    RSS counts pages shared between the ranks (the torch libraries, the page cache of a memory-mapped
    model file) in each rank; the sum over ranks overstates what the job takes. danlu's own `memory_gib` in the
    log is rank 0's current RSS at the end of each step (not a peak, not per rank); it is shown in the details.
  * other processes' share of the CPU during each run (/proc/stat minus this bench's and its children's CPU
    time): a job that others disturbed (above --busy-threshold, 10%) is rerun after waiting for an idle machine,
    up to --retries times, and the least disturbed run is kept; check the "other CPU" column before trusting a
    tokens/s figure (the memory figures hardly depend on it).

On a machine with C cores every layout gets the same C cores (2 ranks x C/2 threads): dp/fsdp/tp/pp cannot be
faster than one process there; the comparison shows their overhead (communication, pipeline bubble, smaller
per-thread matrices) and what they save in memory per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ForeignLoad, least_disturbed, machine_info, print_aligned, print_foreign_load, save_results

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {  # name -> (processes, --parallel, divides the per-device batch by)
    "single": (1, None, 1),
    "dp": (2, "dp=2", 2),
    "fsdp": (2, "fsdp=2", 2),
    "tp": (2, "tp=2", 1),
    "tp3": (3, "tp=3", 1),
    "pp": (2, "pp=2", 1),
}
LAYOUT_LABELS = {"single": "one process", "dp": "dp=2", "fsdp": "fsdp=2", "tp": "tp=2", "tp3": "tp=3",
                 "pp": "pp=2 (1F1B)"}
FINETUNING = {"full": ["--finetuning_type", "full", "--learning_rate", "1e-5"],
              "lora": ["--finetuning_type", "lora", "--lora_target", "all", "--lora_rank", "8", "--lora_alpha", "16",
                       "--learning_rate", "1e-4"]}
FT_LABELS = {"full": "full fine-tuning", "lora": "LoRA r=8, all linear layers"}
MIB = 1024 ** 2


# ---------------------------------------------------------------- data

def filled_dataset(directory: Path, cutoff_len: int) -> str:
    """SFT examples whose every tokenized form exceeds cutoff_len (danlu cuts them to exactly cutoff_len)."""
    shipped = []
    for name in ("identity.json", "danlu_instruct.json"):
        shipped += json.loads((REPO / "data" / name).read_text(encoding="utf-8"))
    answers = [e["output"] for e in shipped]
    chars = 8 * cutoff_len  # a SmolLM2 token is ~4 characters of this English text: twice the length needed
    examples = []
    for i, example in enumerate(shipped):
        parts, n, j = [], 0, i
        while n < chars:
            parts.append(answers[j % len(answers)])
            n, j = n + len(parts[-1]) + 1, j + 1
        examples.append({"instruction": example["instruction"], "input": example.get("input", ""),
                         "output": "\n".join(parts)})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "filled.json").write_text(json.dumps(examples, indent=1), encoding="utf-8")
    (directory / "dataset_info.json").write_text(json.dumps({"bench_filled": {"file_name": "filled.json"}}),
                                                  encoding="utf-8")
    return "bench_filled"


# ---------------------------------------------------------------- one run

def command(layout: str, finetuning: str, args, data_dir: str, dataset: str, out: Path) -> tuple[list, dict]:
    processes, parallel, divisor = LAYOUTS[layout]
    cores = os.cpu_count() or 1
    danlu = ["-m", "danlu", "train", "--stage", "sft", *FINETUNING[finetuning],
             "--dataset_dir", data_dir, "--dataset", dataset, "--cutoff_len", str(args.cutoff_len),
             "--per_device_train_batch_size", str(args.batch // divisor),
             "--gradient_accumulation_steps", str(args.accumulation),
             "--max_steps", str(args.warmup + args.steps + 1), "--lr_scheduler_type", "constant",
             "--eval_strategy", "no", "--logging_steps", "1", "--include_num_input_tokens_seen", "true",
             "--save_steps", "1000000", "--seed", "42", "--output_dir", str(out), "--overwrite_output_dir", "true"]
    if parallel:
        danlu += ["--parallel", parallel]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
               *danlu]
    else:
        cmd = [sys.executable, *danlu]
    env = {"OMP_NUM_THREADS": str(max(1, cores // processes))}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return cmd, env


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(c) for c in text.split()]
    except OSError:
        pass
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def status_kib(pid: int) -> dict:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def rank_of(pid: int, root: int) -> int | None:
    """RANK of a danlu worker (the root itself is rank 0 when it is danlu, one process); None for others."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                   if b"=" in item)
    except OSError:
        return None
    if b"danlu" not in cmdline or b"torch.distributed.run" in cmdline:
        return None
    if b"RANK" in env:
        return int(env[b"RANK"])
    return 0 if pid == root else None


def log_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return records


RUNNING: list = []  # the job under way, ended with the bench if the bench is stopped


def stop_running_job(signum, frame):
    for proc in RUNNING:
        if proc.poll() is None:
            proc.terminate()  # torchrun passes SIGTERM on to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    raise SystemExit(f"bench_parallel: stopped by signal {signum} (the results so far are in --json OUT)")


def run_layout(layout: str, finetuning: str, args, data_dir: str, dataset: str, work: Path) -> dict:
    out = work / f"{finetuning}-{layout}"
    cmd, env = command(layout, finetuning, args, data_dir, dataset, out)
    log_path = work / f"{finetuning}-{layout}.log"
    last_warmup, last_timed = args.warmup, args.warmup + args.steps
    ranks: dict[int, dict] = {}  # rank -> pid, peaks
    agents: dict[int, int] = {}  # torchrun's own processes: pid -> VmHWM KiB
    reset_done = timed_read = False
    reset_step = timed_step = None
    with ForeignLoad() as load, open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        RUNNING[:] = [proc]
        while True:
            done = proc.poll() is not None
            for pid in [proc.pid, *descendants(proc.pid)]:
                rank = rank_of(pid, proc.pid)
                st = status_kib(pid)
                if "VmHWM" not in st:
                    continue
                if rank is None:
                    if pid == proc.pid:  # torchrun itself
                        agents[pid] = max(agents.get(pid, 0), st["VmHWM"])
                    continue
                r = ranks.setdefault(rank, {"pid": pid, "life_kib": 0, "timed_kib": None, "rss_at_reset_kib": None,
                                            "hwm_before_reset_kib": None, "hwm_last_kib": None})
                r["life_kib"] = max(r["life_kib"], st["VmHWM"])
                r["hwm_last_kib"] = st["VmHWM"]
            records = log_records(out / "trainer_log.jsonl")
            step = records[-1]["step"] if records else 0
            if not reset_done and step >= last_warmup:
                for r in ranks.values():
                    try:
                        r["hwm_before_reset_kib"] = status_kib(r["pid"]).get("VmHWM")
                        Path(f"/proc/{r['pid']}/clear_refs").write_text("5")
                        r["rss_at_reset_kib"] = status_kib(r["pid"]).get("VmRSS")
                    except OSError as e:
                        r["reset_error"] = str(e)
                reset_done = True
                reset_step = step
            if reset_done and not timed_read and step >= last_timed:
                for r in ranks.values():
                    r["timed_kib"] = status_kib(r["pid"]).get("VmHWM")
                timed_read, timed_step = True, step
            if done:
                break
            time.sleep(args.poll)
        wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    result = {"layout": layout, "finetuning": finetuning, "command": cmd, "env": env, "returncode": proc.returncode,
              "seconds": wall, "foreign_cpu": round(load.share, 3), "log": str(log_path)}
    records = log_records(out / "trainer_log.jsonl")
    if proc.returncode != 0 or len(records) < last_timed:
        result["error"] = "\n".join(text.strip().splitlines()[-25:])
        said = [line for line in text.splitlines() if line.startswith("danlu train: error:")]
        result["error_line"] = said[0] if said else text.strip().splitlines()[-1] if text.strip() else ""
        return result
    if reset_step != last_warmup or timed_step != last_timed:  # polled too slowly: a step went by unseen
        result["note"] = (f"memory reset seen at step {reset_step} (wanted {last_warmup}), read at step "
                          f"{timed_step} (wanted {last_timed}): lower --poll")
    seen = [0] + [r["num_input_tokens_seen"] for r in records]
    timed = [(seen[i] - seen[i - 1], records[i - 1]) for i in range(last_warmup + 1, last_timed + 1)]
    tokens = sum(t for t, _ in timed)
    seconds = sum(t / rec["tokens_per_s"] for t, rec in timed)
    result.update({
        "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / len(timed),
        "tokens_per_step": tokens / len(timed),
        "losses": [r["loss"] for r in records], "danlu_memory_gib": [r["memory_gib"] for r in records],
        "ranks": {rank: {"pid": r["pid"], "peak_timed_mib": (r["timed_kib"] or 0) / 1024,
                         "peak_life_mib": r["life_kib"] / 1024,
                         "rss_at_reset_mib": (r["rss_at_reset_kib"] or 0) / 1024,
                         "peak_load_warmup_mib": (r["hwm_before_reset_kib"] or 0) / 1024,
                         "peak_after_reset_mib": (r["hwm_last_kib"] or 0) / 1024,
                         **({"reset_error": r["reset_error"]} if "reset_error" in r else {})}
                  for rank, r in sorted(ranks.items())},
        "launcher_peak_mib": [kib / 1024 for kib in agents.values()],
    })
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def run_measured(layout: str, finetuning: str, args, data_dir: str, dataset: str, work: Path) -> dict:
    """One job, rerun (up to --retries times, after waiting for an idle machine) when other processes used more
    than --busy-threshold of the CPU meanwhile; the least disturbed run is kept. A failed job is not rerun."""
    return least_disturbed(lambda: run_layout(layout, finetuning, args, data_dir, dataset, work), args.retries,
                           args.busy_threshold, args.max_wait)


# ---------------------------------------------------------------- report

def machine() -> dict:
    import torch.distributed as dist

    return {**machine_info(), "gloo": dist.is_available() and dist.is_gloo_available()}


def per_rank(r: dict, key: str) -> str:
    return ", ".join(f"{v[key]:.0f}" for v in r["ranks"].values())


def global_batch(layout: str, args) -> str:
    processes, _, divisor = LAYOUTS[layout]
    per_device = args.batch // divisor
    data_parallel = divisor  # dp/fsdp ranks read different batches; tp/pp ranks share one
    return f"{per_device} x {args.accumulation} x {data_parallel} = {per_device * args.accumulation * data_parallel}"


def table(results: list[dict], args) -> tuple[tuple, list[tuple]]:
    header = ("fine-tuning", "layout", "processes x threads", "batch/device x accum x dp = global", "s/step",
              "tokens/s", "tokens/s vs one process", "peak RSS per rank, timed steps (MiB)", "vs one process",
              "peak RSS per rank, whole process (MiB)", "vs one process", f"loss at step {args.warmup + args.steps}",
              "other CPU")
    lines = []
    base = {}
    for r in results:
        if r["layout"] == "single" and "error" not in r:
            base[r["finetuning"]] = r
    for r in results:
        processes = LAYOUTS[r["layout"]][0]
        prefix = (FT_LABELS[r["finetuning"]], LAYOUT_LABELS[r["layout"]],
                  f"{processes} x {r['env']['OMP_NUM_THREADS']}", global_batch(r["layout"], args))
        if "error" in r:
            said = r.get("error_line", "").removeprefix("danlu train: error: ").split(": each ")[0]
            said = said if len(said) <= 160 else said[:157] + "..."
            lines.append(prefix + ("failed",) + ("",) * (len(header) - 7) + (said,
                                                                             f"{r['foreign_cpu']:.0%}"))
            continue
        b = base.get(r["finetuning"])
        timed = [x["peak_timed_mib"] for x in r["ranks"].values()]
        life = [x["peak_life_mib"] for x in r["ranks"].values()]
        ratio = (lambda v, key: f"{v / b[key]:.2f}x" if b else "")
        lines.append(prefix + (
            f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "",
            " / ".join(f"{v:.0f}" for v in timed), ratio(max(timed), "max_timed"),
            " / ".join(f"{v:.0f}" for v in life), ratio(max(life), "max_life"),
            f"{r['losses'][args.warmup + args.steps - 1]:.4f}", f"{r['foreign_cpu']:.0%}"))
    return header, lines


def markdown(header: tuple, lines: list[tuple]) -> str:
    rows = ["| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    rows += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: --steps 1 --warmup 1 --cutoff_len 64 "
                                                        "(not a figure)")
    p.add_argument("--json", metavar="OUT", help="also save every figure as JSON")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--finetuning", default="full,lora", help="comma-separated subset of full,lora")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (default 3)")
    p.add_argument("--warmup", type=int, help="warm-up optimizer steps per run, not timed (default 2)")
    p.add_argument("--cutoff_len", type=int, help="danlu's cutoff_len, the same in every layout (default 128)")
    p.add_argument("--batch", type=int, default=4, help="one process's per-device batch; dp/fsdp use half (even)")
    p.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps (>= 2: pp's micro-batches)")
    p.add_argument("--data", choices=("filled", "shipped"), default="filled",
                   help="filled: examples of >= cutoff_len tokens (no padding anywhere); shipped: "
                        "identity,danlu_instruct")
    p.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                   help="run every job with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: blocks that large are mmapped and "
                        "given back to the system when freed, instead of staying in the heap (RSS)")
    p.add_argument("--retries", type=int, default=2, help="reruns of a job that other processes disturbed")
    p.add_argument("--busy-threshold", type=float, default=0.1,
                   help="other processes' CPU share above which a job counts as disturbed (default 0.1)")
    p.add_argument("--max-wait", type=float, default=180, help="seconds to wait for an idle machine before a rerun")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between reads of /proc and the log")
    p.add_argument("--work-dir", help="where the runs write (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep each run's output_dir")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.cutoff_len = args.cutoff_len if args.cutoff_len is not None else (64 if args.quick else 128)
    if args.batch % 2 or args.accumulation < 2 or args.warmup < 1 or args.steps < 1:
        p.error("--batch must be even, --accumulation >= 2, --warmup and --steps >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_running_job)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    modes = [x.strip() for x in args.finetuning.split(",") if x.strip()]
    info = machine()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data == "filled":
        data_dir, dataset = str(work / "data"), filled_dataset(work / "data", args.cutoff_len)
    else:
        data_dir, dataset = str(REPO / "data"), "identity,danlu_instruct"
    print(f"CPU: {info['cpu']} | cores: {info['cores']} | RAM: {info['ram_gb']} GB | python {info['python']} | "
          f"torch {info['torch']} | gloo available: {info['gloo']} (the backend of every parallel run here)")
    print(f"model: the bundled SmolLM2-135M-Instruct (float32, CPU) | danlu train --stage sft | data: {dataset} "
          f"({args.data}) | cutoff_len {args.cutoff_len} in every layout | warm-up {args.warmup} + timed "
          f"{args.steps} (+1 untimed) optimizer steps per run | global batch {args.batch * args.accumulation} "
          f"examples in every layout")
    print(f"note: every layout shares the same {info['cores']} cores (2 ranks x {max(1, info['cores'] // 2)} "
          f"threads, or 3 x 1 for tp=3, vs 1 process x {info['cores']}), so no parallel layout can be faster than "
          f"one process here; the point is the memory per rank and the overhead\n", flush=True)
    results = []
    started = time.perf_counter()
    for mode in modes:
        for layout in layouts:
            print(f"{FT_LABELS[mode]}, {LAYOUT_LABELS[layout]} ...", flush=True)
            r = run_measured(layout, mode, args, data_dir, dataset, work)
            results.append(r)
            if args.json:  # so far, in case the bench is stopped
                Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "runs": results,
                                                       "partial": True}, indent=2) + "\n")
            if "error" in r:
                print(f"   FAILED (exit {r['returncode']}); the end of its output ({r['log']}):\n" + "\n".join(
                    "      " + line for line in r["error"].splitlines()), flush=True)
                continue
            print(f"   {r['seconds_per_step']:.2f} s/step, {r['tokens_per_s']:.0f} tokens/s, peak RSS per rank "
                  f"(timed steps) {per_rank(r, 'peak_timed_mib')} MiB, "
                  f"whole process {per_rank(r, 'peak_life_mib')} MiB "
                  f"(job {r['seconds']:.0f} s, attempt {r['attempt']}; other processes used "
                  f"{r['foreign_cpu']:.0%} of the CPU)"
                  + (f" [{r['note']}]" if "note" in r else ""), flush=True)
    for r in results:
        if r["layout"] == "single" and "error" not in r:
            r["max_timed"] = max(x["peak_timed_mib"] for x in r["ranks"].values())
            r["max_life"] = max(x["peak_life_mib"] for x in r["ranks"].values())
    header, lines = table(results, args)
    print()
    print_aligned(header, lines)
    print("\nmarkdown:\n")
    print(markdown(header, lines))
    print("\ndetails per run: tokens per timed step; rank 0's RSS as danlu logs it (memory_gib, end of each step); "
          "peak RSS per rank over import + load + warm-up; RSS per rank when its peak was reset (after the warm-up); "
          "peak RSS per rank from then to the end (timed steps, the untimed step, the final save); torchrun's own "
          "peak RSS; the losses")
    for r in results:
        if "error" in r:
            continue
        print(f"  {r['finetuning']:4} {r['layout']:6} {r['tokens_per_step']:.0f} tokens/step | danlu memory_gib "
              f"{', '.join(f'{m:.2f}' for m in r['danlu_memory_gib'])} | load + warm-up peak "
              f"{per_rank(r, 'peak_load_warmup_mib')} MiB | RSS at reset {per_rank(r, 'rss_at_reset_mib')} MiB | "
              f"peak after reset {per_rank(r, 'peak_after_reset_mib')} MiB | torchrun "
              f"{', '.join(f'{m:.0f}' for m in r['launcher_peak_mib']) or '-'} MiB | losses "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])} | job {r['seconds']:.0f} s")
    print("\ncommands (cwd: the repository; OUT: the run's output_dir):")
    for r in results:
        cmd = " ".join(r["command"]).replace(sys.executable, "python")
        print(f"  {' '.join(f'{k}={v}' for k, v in r['env'].items())} {cmd}")
    print_foreign_load({f"{r['finetuning']}/{r['layout']}": r["foreign_cpu"] for r in results}, "run")
    print(f"total {time.perf_counter() - started:.0f} s")
    save_results({"machine": info, "args": vars(args), "runs": results}, args.json)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
